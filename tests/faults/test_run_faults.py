"""Fault matrix, whole-run problems: a changed config on rerun, two runs on one run root, and
storage that is full or read-only.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import threading
import time

import pyarrow.parquet as pq
import pytest

from tests.faults._faultkit import (
    assert_same_as_reference,
    assert_untouched,
    child_result,
    clone_run,
    committed_files,
    run_child,
    tree_state,
)
from winnow.exceptions import RunLocked, StageConfigMismatch
from winnow.pipeline import run_all
from winnow.rowgroups import CommitStore
from winnow.rowgroups.lease import read_lease

pytestmark = pytest.mark.timeout(300)


def _contents(root: str) -> dict[str, str]:
    return {path: state[2] for path, state in tree_state(root).items()}


def test_changed_threshold_on_rerun_is_a_stage_config_mismatch_and_touches_no_file(reference):
    cfg = clone_run(reference, "changed-config")
    before = _contents(cfg.run_root)
    changed = type(cfg)(**{**cfg.to_dict(), "aesthetic_threshold": 1.0})
    with pytest.raises(StageConfigMismatch) as err:
        run_all(changed, backend="local")
    # Thresholds are the thresholds step's (scores hold none): that is the stage that changed.
    assert err.value.stage == "thresholds"
    assert [c[0] for c in err.value.changes] == ["config.aesthetic_threshold"]
    msg = str(err.value)
    assert "thresholds" in msg and "aesthetic_threshold" in msg and "overwrite=true" in msg and "new run key" in msg
    assert _contents(cfg.run_root) == before  # every file, byte for byte; no lease left behind


def test_second_run_on_the_same_run_root_fails_fast_with_run_locked_and_the_first_is_unharmed(sample, reference):
    cfg = sample.config("two-runs")
    result: dict = {}

    def run_a():
        try:
            result["summary"] = run_all(cfg, backend="local", owner="run-A")
        except BaseException as exc:  # surfaced by the assertion below
            result["error"] = exc

    a = threading.Thread(target=run_a)
    a.start()
    lease_path = os.path.join(cfg.run_root, "_lease.json")
    deadline = time.time() + 120
    while not os.path.exists(lease_path) and a.is_alive():
        assert time.time() < deadline
        time.sleep(0.01)
    assert a.is_alive(), f"run A ended before run B could try: {result}"
    t0 = time.perf_counter()
    with pytest.raises(RunLocked) as err:
        run_all(cfg, backend="local", owner="run-B")
    seconds = time.perf_counter() - t0
    running = a.is_alive()
    assert "in use by run 'run-A'" in str(err.value) and lease_path in str(err.value)
    assert seconds < 10, f"run B took {seconds:.1f}s to fail"
    lease = read_lease(CommitStore(cfg.run_root))
    if running:  # B's failure did not take A's lease away (A may have finished since)
        assert (lease is None and not a.is_alive()) or lease.owner == "run-A"
    a.join(timeout=240)
    assert "error" not in result, result.get("error")
    assert_same_as_reference(cfg.run_root, result["summary"], reference)
    assert not os.path.exists(lease_path)  # A released it when it completed


def test_disk_full_via_rlimit_fsize_is_a_storage_error_naming_the_path_and_resume_completes(reference):
    cfg = clone_run(reference, "disk-full", drop=("write",))
    tar_sizes = sorted(os.path.getsize(p) for p in glob.glob(os.path.join(reference.cfg.run_root, "write", "p*", "rg*.tar")))
    limit = tar_sizes[len(tar_sizes) // 2 - 1]  # about half the row groups' tars fit, the others hit EFBIG
    fits = {
        os.path.relpath(p, reference.cfg.run_root)
        for p in glob.glob(os.path.join(reference.cfg.run_root, "write", "p*", "rg*.tar"))
        if os.path.getsize(p) <= limit
    }
    assert 0 < len(fits) < len(tar_sizes)
    proc = run_child({"cfg": cfg.to_dict(), "call": "run_all", "owner": "disk-full", "fsize_limit": limit})
    out = child_result(proc)
    assert proc.returncode == 3 and out["error_type"] == "RowGroupsFailedError", out
    assert "StorageError: could not write " in out["error"] and "File too large" in out["error"]
    assert os.path.join(cfg.run_root, "write") in out["error"]
    # What committed is whole and equal to the reference; what failed left nothing behind.
    committed = {rel for rel in committed_files(cfg.run_root) if rel.startswith("write/")}
    assert {rel for rel in committed if rel.endswith(".tar")} == fits
    for rel in fits:
        assert os.path.exists(os.path.join(cfg.run_root, rel[: -len(".tar")] + ".parquet"))
        assert pq.read_metadata(os.path.join(cfg.run_root, rel[: -len(".tar")] + ".parquet")).num_rows >= 0
    assert not glob.glob(os.path.join(cfg.run_root, "**", "*.tmp-*"), recursive=True)
    assert not os.path.exists(os.path.join(cfg.run_root, "_summary.json"))
    before = committed_files(cfg.run_root)

    summary = run_all(cfg, backend="local", owner="disk-full")  # space is back
    assert summary["row_groups_by_stage"]["write"] == {"computed": len(tar_sizes) - len(fits), "skipped": len(fits)}
    assert_untouched(before, cfg.run_root)
    assert_same_as_reference(cfg.run_root, summary, reference)


def _can_bind_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount --bind / /mnt && mount -o remount,bind,ro /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_bind_mount(), reason="needs mount namespaces and bind mounts (root in a privileged container)")
def test_read_only_run_root_via_ro_bind_mount_is_a_storage_error_naming_the_path(reference):
    cfg = clone_run(reference, "read-only", drop=("write",))
    before = _contents(cfg.run_root)
    # The run root is remounted read-only in the child's own mount namespace only.
    ro = ["unshare", "-m", "--propagation", "private", "sh", "-c",
          'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"', cfg.run_root]
    out = child_result(run_child({"cfg": cfg.to_dict(), "call": "run_all", "owner": "ro"}, prefix=ro))
    assert out["ok"] is False and out["error_type"] == "StorageError", out
    assert "Read-only file system" in out["error"] and cfg.run_root in out["error"]
    assert _contents(cfg.run_root) == before
    summary = run_all(cfg, backend="local", owner="ro")  # writable again: the run completes
    assert summary["row_groups_by_stage"]["write"]["skipped"] == 0
    assert_same_as_reference(cfg.run_root, summary, reference)
