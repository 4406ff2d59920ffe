"""The test oracles (``benchmarks/_reference``) stay outside the engine: the package never imports
them, and they are gone from the package's namespace. Benchmarks never import ``tests`` (tests may
import benchmarks: the oracles and the shared harness helpers live there)."""

from __future__ import annotations

import re
from pathlib import Path

import winnow.data.index
import winnow.stages.dedup

REPO = Path(__file__).resolve().parents[1]


def _importing(folders: tuple[str, ...], package: str) -> list[Path]:
    """The ``.py`` files under ``folders`` with a line importing ``package`` (in code or in a
    child's source held in a string)."""
    line = re.compile(rf"^\s*(from|import)\s+{package}\b", re.M)
    return [path for folder in folders for path in (REPO / folder).rglob("*.py") if line.search(path.read_text())]


def test_no_engine_module_imports_a_test_oracle():
    assert _importing(("winnow", "operators", "dags", "plugins"), "tests") == []
    assert _importing(("winnow", "operators", "dags", "plugins"), "benchmarks") == []


def test_benchmarks_never_import_tests():
    assert _importing(("benchmarks",), "tests") == []


def test_the_references_live_outside_the_package():
    for gone in ("run_dedup", "ensure_dedup_stage", "read_candidates", "REFERENCE_UPSTREAM"):
        assert not hasattr(winnow.stages.dedup, gone), gone
    for gone in ("_scan_all", "_assemble", "_write_skipped_serial"):
        assert not hasattr(winnow.data.index, gone), gone
    from benchmarks._reference.dedup import run_dedup
    from benchmarks._reference.index import build_index_serial

    assert callable(run_dedup) and callable(build_index_serial)
