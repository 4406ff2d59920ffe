"""The test oracles (``tests/_reference``) stay outside the engine: the package never imports
them, and they are gone from the package's namespace."""

from __future__ import annotations

import re
from pathlib import Path

import winnow.data.index
import winnow.stages.dedup

REPO = Path(__file__).resolve().parents[1]


def test_no_engine_module_imports_a_test_oracle():
    for folder in ("winnow", "operators", "dags", "plugins"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            assert not re.search(r"^\s*(from|import)\s+tests\b", text, re.M), path


def test_the_references_live_in_tests_only():
    for gone in ("run_dedup", "ensure_dedup_stage", "read_candidates", "REFERENCE_UPSTREAM"):
        assert not hasattr(winnow.stages.dedup, gone), gone
    for gone in ("_scan_all", "_assemble", "_write_skipped_serial"):
        assert not hasattr(winnow.data.index, gone), gone
    from tests._reference.dedup import run_dedup
    from tests._reference.index import build_index_serial

    assert callable(run_dedup) and callable(build_index_serial)
