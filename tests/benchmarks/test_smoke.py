"""Every benchmark script still runs against today's code: each one's ``--smoke`` mode (tiny data,
figures that mean nothing) as a child process, so a benchmark that calls an API that is gone fails
here, not months later in front of a reader of BENCHMARKS.md.

``gpu_check.py`` is covered by ``test_gpu_check.py`` (its CPU dry run through ``gpu_check.sh``).
The scripts that would start a Ray head of their own for their smoke run (``ATTACH``) attach to the
session's one shared Ray instead (``tests/conftest.py``), through their ``--ray-address`` flag.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._multinode import shared_multinode_fixture

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
#: Scripts whose smoke run is covered elsewhere.
COVERED = {"gpu_check.py": "tests/benchmarks/test_gpu_check.py"}
#: Smoke runs that start a Ray head, Airflow or a browser: tens of seconds, not seconds.
SLOW = {"dedup_scale.py", "job_mode_slots.py", "pipeline_overhead.py", "resume_cost.py", "ui_scale.py"}
#: Smoke runs given the session's shared Ray head (``--ray-address``, with ``--ray-url``: its Jobs
#: API) instead of starting one each.
ATTACH = {"job_mode_slots.py": ("--ray-url",), "pipeline_overhead.py": (), "dedup_scale.py": ()}

cluster = shared_multinode_fixture()


def scripts() -> list[str]:
    """Every runnable script in benchmarks/ (one with a ``__main__`` block), helpers left out."""
    return sorted(p.name for p in BENCHMARKS.glob("*.py")
                  if not p.name.startswith("_") and p.name not in COVERED and "__main__" in p.read_text())


def test_every_benchmark_script_is_smoke_tested_here_or_elsewhere():
    found = {p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    assert found == set(scripts()) | set(COVERED), found
    assert set(scripts()) >= SLOW
    for name in found:
        assert "add_smoke(ap)" in (BENCHMARKS / name).read_text() or name in COVERED, f"{name} has no --smoke"


@pytest.mark.parametrize("script", [pytest.param(s, marks=[pytest.mark.slow] if s in SLOW else []) for s in scripts()])
def test_benchmark_smoke_run_exits_cleanly(script, tmp_path, request):
    if script == "ui_scale.py":
        import shutil

        if not (shutil.which("chromium") or os.path.exists("/usr/bin/chromium")):
            pytest.fail("ui_scale.py needs chromium and chromedriver: run `bash .ci/browser` (Debian packages)")
    import shutil
    import tempfile

    # The scripts' temp folders (samples, run roots, a local Ray's sockets) go to a short path of
    # their own: Ray's Unix sockets do not fit under pytest's long tmp_path.
    tmp = tempfile.mkdtemp(prefix="wsmoke-", dir="/tmp")
    env = {**os.environ, "TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    env.pop("WINNOW_TEST_FAULTS", None)
    args = [sys.executable, str(BENCHMARKS / script), "--smoke"]
    if script in ATTACH:  # started on first use, then shared
        from benchmarks._common import RAY_TOKEN_ENV

        head = request.getfixturevalue("cluster")
        args += ["--ray-address", head.address, *(a for flag in ATTACH[script] for a in (flag, head.dashboard_url))]
        env[RAY_TOKEN_ENV] = head.token
    try:
        proc = subprocess.run(args, capture_output=True, text=True,
                              env=env, cwd=str(tmp_path), timeout=900 if script in SLOW else 300)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == 0, f"{script} --smoke exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
