"""Fault matrix, failing row groups and killed task processes (no Ray: the local backend).

Every case ends the same way: the recovered run's output equals the fault-free reference and no
row group committed before the recovery was written again ((inode, mtime_ns) unchanged, and the
computed counts add up to exactly the row groups that were missing).
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from tests.faults._faultkit import (
    CHILD,
    RUNNER_STAGES,
    assert_same_as_reference,
    assert_untouched,
    clone_run,
    committed_files,
    count_committed,
    run_child,
)
from winnow.exceptions import RowGroupsFailedError, RunLocked
from winnow.execution import LOCAL
from winnow.faults import ENV_VAR
from winnow.pipeline import run_all, run_partition
from winnow.rowgroups import CommitStore

pytestmark = pytest.mark.timeout(300)


def _all_runner_row_groups(reference) -> int:
    return len(RUNNER_STAGES) * reference.summary["row_groups"]  # every row-group stage of the registry


def _assert_every_visible_file_is_whole(run_root: str) -> None:
    plan = load_plan_for(run_root)
    for path in glob.glob(os.path.join(run_root, "*", "p*", "rg*.parquet")):
        rg = int(os.path.basename(path)[2:11])
        assert pq.read_metadata(path).num_rows >= 0  # a torn file has no footer and fails here
        stage = os.path.relpath(path, run_root).split(os.sep)[0]
        if stage in ("index", "embed", "aesthetic", "nsfw", "dedup"):  # one row per record
            assert pq.read_metadata(path).num_rows == plan.row_group_size(rg), path


def load_plan_for(run_root: str):
    from winnow.data.index import load_index

    return load_index(run_root).plan


def test_injected_exception_in_k_row_groups_reruns_only_those(sample, reference, tmp_path, monkeypatch):
    cfg = sample.config("raise-k")
    once = tmp_path / "once"
    monkeypatch.setenv(ENV_VAR, json.dumps({"stage": "embed", "row_groups": [1, 6], "once_dir": str(once)}))
    with pytest.raises(RowGroupsFailedError) as err:
        run_all(cfg, backend="local")
    msg = str(err.value)
    assert "stage 'embed' partition 0: 1 of 2 row groups failed: [1]" in msg
    assert "stage 'embed' partition 2: 1 of 3 row groups failed: [6]" in msg
    assert "injected test fault" in msg and "Rerun to retry only those" in msg
    store = CommitStore(cfg.run_root)
    assert store.completed("embed", 0) == {0} and store.completed("embed", 2) == {5, 7}
    first_try = count_committed(cfg.run_root)
    before = committed_files(cfg.run_root)

    summary = run_all(cfg, backend="local")  # the retry; the faults fired once and stay quiet
    assert sorted(os.listdir(once)) == ["embed-rg1", "embed-rg6"]
    assert summary["row_groups_by_stage"]["embed"] == {"computed": 2, "skipped": 6}
    assert summary["row_groups_computed"] == _all_runner_row_groups(reference) - first_try
    assert_untouched(before, cfg.run_root)
    assert_same_as_reference(cfg.run_root, summary, reference)


def test_task_process_sigkilled_right_after_a_commit_by_kill_task_hook_resumes(sample, reference, tmp_path):
    cfg = sample.config("kill-task")
    fault = {"stage": "aesthetic", "row_groups": [2], "mode": "kill_task", "once_dir": str(tmp_path / "once")}
    proc = run_child({"cfg": cfg.to_dict(), "call": "run_all", "owner": "nightly-1"}, env={ENV_VAR: json.dumps(fault)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    store = CommitStore(cfg.run_root)
    assert store.completed("aesthetic", 1) == {2}  # killed mid-partition, right after rg 2
    assert not glob.glob(os.path.join(cfg.run_root, "**", "*.tmp-*"), recursive=True)
    _assert_every_visible_file_is_whole(cfg.run_root)
    first_try = count_committed(cfg.run_root)
    before = committed_files(cfg.run_root)
    # The dead run's lease is still live: another owner is refused, naming the way out ...
    with pytest.raises(RunLocked, match="nightly-1.*_lease.json"):
        run_all(cfg, backend="local", owner="someone-else")
    # ... and the same owner (an Airflow retry of the same DAG run) resumes at once.
    summary = run_all(cfg, backend="local", owner="nightly-1")
    assert summary["row_groups_computed"] == _all_runner_row_groups(reference) - first_try
    # aesthetic: rg 0-1 (partition 0) and rg 2 were committed before the kill; 3-7 remain.
    assert summary["row_groups_by_stage"]["aesthetic"] == {"computed": 5, "skipped": 3}
    assert_untouched(before, cfg.run_root)
    assert_same_as_reference(cfg.run_root, summary, reference)


@pytest.mark.parametrize("stage", ["clip_score", "status"])
def test_task_sigkilled_in_the_clip_score_or_status_stage_resumes_with_every_count_exact(sample, reference, tmp_path, stage):
    cfg = sample.config(f"kill-{stage}")
    fault = {"stage": stage, "row_groups": [2], "mode": "kill_task", "once_dir": str(tmp_path / "once")}
    proc = run_child({"cfg": cfg.to_dict(), "call": "run_all", "owner": "nightly-1"}, env={ENV_VAR: json.dumps(fault)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert CommitStore(cfg.run_root).completed(stage, 1) == {2}  # killed right after rg 2 committed
    before = committed_files(cfg.run_root)
    summary = run_all(cfg, backend="local", owner="nightly-1")
    assert summary["row_groups_by_stage"][stage] == {"computed": 5, "skipped": 3}
    assert_untouched(before, cfg.run_root)
    assert_same_as_reference(cfg.run_root, summary, reference)


def test_task_process_sigkilled_while_hanging_inside_a_commit_leaves_no_partial_file(sample, reference, tmp_path):
    cfg = clone_run(reference, "hang-in-commit", drop=("write",))
    marker = tmp_path / "inside-commit"
    target = "write/p00001/rg000000003.parquet"
    spec = {
        "cfg": cfg.to_dict(), "call": "run_partition", "stage": "write", "partition": 1,
        "owner": "dag-run-7", "hang_on": target, "hang_marker": str(marker),
    }
    child = subprocess.Popen([sys.executable, CHILD, json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while not marker.exists():
            assert child.poll() is None, child.communicate()[1][-2000:]
            assert time.time() < deadline, "the child never reached the commit"
            time.sleep(0.05)
    finally:
        child.kill()
        child.communicate()
    part = os.path.join(cfg.run_root, "write", "p00001")
    temps = [n for n in os.listdir(part) if ".tmp-" in n]
    assert temps and all(n.startswith("rg000000003.parquet.tmp-") for n in temps)  # caught inside the commit
    store = CommitStore(cfg.run_root)
    assert store.completed("write", 1) == {2}  # the temp file never counts as a commit
    assert not os.path.exists(os.path.join(cfg.run_root, target))
    _assert_every_visible_file_is_whole(cfg.run_root)
    # rg 3's tar (side file, written before its .parquet marker) is not a commit: it is redone.
    before = {k: v for k, v in committed_files(cfg.run_root).items() if "rg000000003.tar" not in k}

    retry = run_partition(cfg, "write", 1, execution=LOCAL, owner="dag-run-7")
    assert (retry.computed, retry.skipped, retry.failed) == (2, 1, {})
    assert not [n for n in os.listdir(part) if ".tmp-" in n]  # stray temp removed at task start
    summary = run_all(cfg, backend="local", owner="dag-run-7")
    assert summary["row_groups_by_stage"]["write"] == {"computed": 5, "skipped": 3}
    assert summary["row_groups_computed"] == 5
    assert_untouched(before, cfg.run_root)
    assert_same_as_reference(cfg.run_root, summary, reference)
