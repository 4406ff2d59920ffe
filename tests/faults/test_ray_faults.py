"""Fault matrix on a real local Ray: a worker process SIGKILLed mid-row-group (kill hook) and a
model worker SIGKILLed by the test mid-partition, after its first commit, while it waits at a
barrier of the fault hook (``winnow.faults``: ``hold``, ``release``) that the test releases once the
worker is gone. Ray retries what the dead process held; nothing is lost and nothing committed is
computed again.

Every commit (the rename of a row group's ``.parquet`` into place) in Ray's worker processes is
recorded by an audit hook installed through ``worker_process_setup_hook``: the proof that each
row group was committed once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections import Counter

import pytest
import ray
import ray.cloudpickle

from tests._procs import Background, wait_gone
from tests.faults._faultkit import assert_same_as_reference, assert_untouched, committed_files, read_commit_log
from winnow.execution import Execution
from winnow.faults import ENV_VAR
from winnow.pipeline import load_plan, make_stage, run_all, run_index
from winnow.ray.runner import run_stage_partition
from winnow.rowgroups import CommitStore

pytestmark = pytest.mark.timeout(400)

LOG_ENV = "WINNOW_TEST_COMMIT_LOG"
#: The module's Ray (started by ``commit_log`` with the audit hook), attached to as the embedded one.
ON_RAY = Execution()
_COMMIT = re.compile(r"/rg\d{9}\.parquet$")


def _install_commit_log() -> None:
    """Runs in every Ray worker process: log each row-group commit (pid, path) to a file."""
    import os
    import sys

    path = os.environ.get(LOG_ENV)

    def audit(event, args):
        if event == "os.rename" and path and _COMMIT.search(str(args[1])):
            with open(path, "a") as f:
                f.write(f"{os.getpid()} {args[1]}\n")

    sys.addaudithook(audit)


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def commit_log(tmp_path_factory):
    log = str(tmp_path_factory.mktemp("ray-commits") / "commits.log")
    if ray.is_initialized():
        ray.shutdown()  # another module's Ray lacks the hook
    ray.init(
        num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
        runtime_env={"worker_process_setup_hook": _install_commit_log, "env_vars": {LOG_ENV: log}},
    )
    from winnow.ray.cluster import connect

    connect(None)  # attaches to the Ray just started
    yield log
    ray.shutdown()


def _finish_and_compare(cfg, reference, before) -> None:
    summary = run_all(cfg, backend="local")
    assert summary["row_groups_by_stage"]["embed"] == {"computed": 5, "skipped": 3}  # partitions 0 and 1
    assert_untouched(before, cfg.run_root)
    assert_same_as_reference(cfg.run_root, summary, reference)


def test_ray_worker_sigkilled_by_kill_hook_mid_row_group_is_retried_none_lost(sample, reference, commit_log, tmp_path, monkeypatch):
    cfg = sample.config("ray-worker-killed")
    run_index(cfg, execution=ON_RAY)
    once = tmp_path / "once"
    monkeypatch.setenv(ENV_VAR, json.dumps({"stage": "embed", "row_groups": [6], "mode": "kill", "once_dir": str(once)}))
    summary = run_stage_partition(
        make_stage(cfg, "embed"), run_root=cfg.run_root, plan=load_plan(cfg), partition=2, execution=ON_RAY,
        uses_model=True,
    )
    assert os.listdir(once) == ["embed-rg6"]  # the worker computing rg 6 was SIGKILLed before its commit
    assert summary.ok and (summary.computed, summary.skipped) == (3, 0)
    assert CommitStore(cfg.run_root).completed("embed", 2) == {5, 6, 7}
    # (the index's row groups are committed from Ray workers too: count the embed stage's)
    commits = Counter(path for _, path in read_commit_log(commit_log, cfg.run_root) if path.startswith("embed/"))
    assert commits == {f"embed/p00002/rg{rg:09d}.parquet": 1 for rg in (5, 6, 7)}  # each committed once
    monkeypatch.delenv(ENV_VAR)
    _finish_and_compare(cfg, reference, committed_files(cfg.run_root))


def _identity(path: str) -> tuple[int, int]:
    """(inode, mtime_ns): a commit renames a new file into place, so a rewrite changes both."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def test_ray_model_worker_sigkilled_mid_partition_its_row_groups_are_retried_none_lost(
        sample, reference, commit_log, tmp_path, monkeypatch):
    cfg = sample.config("ray-actor-killed")
    run_index(cfg, execution=ON_RAY)
    part = os.path.join(cfg.run_root, "embed", "p00002")  # row groups 5, 6 and 7
    # The barrier: row groups 6 and 7 wait before their commit until the test releases them, so
    # the worker is killed holding one of them, after exactly one commit (row group 5).
    held, release = tmp_path / "held.jsonl", tmp_path / "release"
    monkeypatch.setenv(ENV_VAR, json.dumps({"stage": "embed", "row_groups": [6, 7], "mode": "hold",
                                            "release": str(release), "held": str(held)}))
    run = Background(lambda: run_stage_partition(
        make_stage(cfg, "embed"), run_root=cfg.run_root, plan=load_plan(cfg), partition=2, execution=ON_RAY,
        uses_model=True))
    try:
        lines = run.wait_for("a row group at the barrier", lambda: held.exists() and held.read_text().splitlines())
        holder = json.loads(lines[0])
        committed = sorted(n for n in os.listdir(part) if _COMMIT.search("/" + n))
        assert committed == ["rg000000005.parquet"], committed  # one commit; two row groups still to do
        first = _identity(os.path.join(part, committed[0]))
        os.kill(holder["pid"], signal.SIGKILL)  # the model worker process dies mid-partition
        wait_gone(holder["pid"])
    finally:
        release.touch()  # the retries (and, on a failure above, the held worker) go on
    run.join(timeout=300)
    monkeypatch.delenv(ENV_VAR)
    assert run.error is None, run.error
    summary = run.result
    assert summary.ok and (summary.computed, summary.skipped) == (3, 0), summary
    assert CommitStore(cfg.run_root).completed("embed", 2) == {5, 6, 7}
    assert _identity(os.path.join(part, committed[0])) == first  # the committed one was not redone
    commits = [(pid, path) for pid, path in read_commit_log(commit_log, cfg.run_root) if path.startswith("embed/")]
    assert Counter(path for _, path in commits) == {f"embed/p00002/rg{rg:09d}.parquet": 1 for rg in (5, 6, 7)}
    redone = f"embed/p00002/rg{holder['row_group']:09d}.parquet"
    assert [pid for pid, path in commits if path == redone] != [holder["pid"]]  # by the worker Ray restarted
    _finish_and_compare(cfg, reference, committed_files(cfg.run_root))
