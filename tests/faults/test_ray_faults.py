"""Fault matrix on a real local Ray: a worker process SIGKILLed mid-row-group (kill hook) and a
model worker SIGKILLed mid-partition after its first commit. Ray retries what the dead process
held; nothing is lost and nothing committed is computed again.

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
import threading
import time
from collections import Counter

import pytest
import ray
import ray.cloudpickle

from tests.faults._faultkit import assert_same_as_reference, assert_untouched, committed_files
from winnow.faults import ENV_VAR
from winnow.pipeline import load_plan, make_stage, run_all, run_index
from winnow.ray.runner import run_stage_partition
from winnow.rowgroups import CommitStore

pytestmark = pytest.mark.timeout(400)

LOG_ENV = "WINNOW_TEST_COMMIT_LOG"
#: Run keys whose commits the hook delays by this long, so a kill lands between two commits.
DELAY_S = 1.5
DELAYED_RUN = "ray-actor-killed"
_COMMIT = re.compile(r"/rg\d{9}\.parquet$")


def _install_commit_log() -> None:
    """Runs in every Ray worker process: log each row-group commit (pid, path) to a file."""
    import os
    import sys
    import time

    path = os.environ.get(LOG_ENV)

    def audit(event, args):
        if event == "os.rename" and path and _COMMIT.search(str(args[1])):
            with open(path, "a") as f:
                f.write(f"{os.getpid()} {args[1]}\n")
            if f"/{DELAYED_RUN}/" in str(args[1]):
                time.sleep(DELAY_S)  # test-only delay before the rename: widens the kill window

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


def _commits(log: str, run_root: str) -> list[tuple[int, str]]:
    if not os.path.exists(log):
        return []
    out = []
    with open(log) as f:
        for line in f:
            pid, path = line.split(" ", 1)
            if path.startswith(run_root + "/"):
                out.append((int(pid), os.path.relpath(path.strip(), run_root)))
    return out


def _finish_and_compare(cfg, reference, before) -> None:
    summary = run_all(cfg, backend="local")
    assert summary["row_groups_by_stage"]["embed"] == {"computed": 5, "skipped": 3}  # partitions 0 and 1
    assert_untouched(before, cfg.run_root)
    assert_same_as_reference(cfg.run_root, summary, reference)


def test_ray_worker_sigkilled_by_kill_hook_mid_row_group_is_retried_none_lost(sample, reference, commit_log, tmp_path, monkeypatch):
    cfg = sample.config("ray-worker-killed")
    run_index(cfg)
    once = tmp_path / "once"
    monkeypatch.setenv(ENV_VAR, json.dumps({"stage": "embed", "row_groups": [6], "mode": "kill", "once_dir": str(once)}))
    summary = run_stage_partition(
        make_stage(cfg, "embed"), run_root=cfg.run_root, plan=load_plan(cfg), partition=2, uses_model=True
    )
    assert os.listdir(once) == ["embed-rg6"]  # the worker computing rg 6 was SIGKILLed before its commit
    assert summary.ok and (summary.computed, summary.skipped) == (3, 0)
    assert CommitStore(cfg.run_root).completed("embed", 2) == {5, 6, 7}
    # (the index's row groups are committed from Ray workers too: count the embed stage's)
    commits = Counter(path for _, path in _commits(commit_log, cfg.run_root) if path.startswith("embed/"))
    assert commits == {f"embed/p00002/rg{rg:09d}.parquet": 1 for rg in (5, 6, 7)}  # each committed once
    monkeypatch.delenv(ENV_VAR)
    _finish_and_compare(cfg, reference, committed_files(cfg.run_root))


def test_ray_model_worker_sigkilled_mid_partition_its_row_groups_are_retried_none_lost(sample, reference, commit_log):
    cfg = sample.config(DELAYED_RUN)
    run_index(cfg)
    part = os.path.join(cfg.run_root, "embed", "p00002")
    seen: dict = {}

    def kill_the_worker_after_its_first_commit():
        deadline = time.time() + 240
        while time.time() < deadline:
            done = sorted(n for n in os.listdir(part) if _COMMIT.search("/" + n)) if os.path.isdir(part) else []
            if done:
                first = os.path.join(part, done[0])
                st = os.stat(first)
                seen["first"], seen["stat"] = done[0], (st.st_ino, st.st_mtime_ns)
                pids = {pid for pid, path in _commits(commit_log, cfg.run_root) if path.endswith(done[0])}
                seen["pid"] = pids.pop()
                seen["committed_at_kill"] = len(done)
                os.kill(seen["pid"], signal.SIGKILL)  # the model worker process dies mid-partition
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_worker_after_its_first_commit)
    killer.start()
    summary = run_stage_partition(
        make_stage(cfg, "embed"), run_root=cfg.run_root, plan=load_plan(cfg), partition=2, uses_model=True
    )
    killer.join()
    assert seen.get("committed_at_kill") == 1, seen  # killed with two row groups still to do
    # The kill can land after the first commit but before its task replied: Ray then retries
    # that task too, and the runner finds it committed and skips it instead of redoing it.
    assert summary.ok and summary.computed + summary.skipped == 3 and summary.computed >= 2
    assert CommitStore(cfg.run_root).completed("embed", 2) == {5, 6, 7}
    st = os.stat(os.path.join(part, seen["first"]))
    assert (st.st_ino, st.st_mtime_ns) == seen["stat"]  # the committed one was not redone
    commits = _commits(commit_log, cfg.run_root)
    renamed = Counter(path for _, path in commits)
    assert renamed[f"embed/p00002/{seen['first']}"] == 1
    redone = [pid for pid, path in commits if not path.endswith(seen["first"])]
    assert redone and seen["pid"] not in redone[-2:]  # the rest committed by a restarted worker
    _finish_and_compare(cfg, reference, committed_files(cfg.run_root))
