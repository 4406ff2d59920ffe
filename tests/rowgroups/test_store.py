"""Commit store: atomic commits, partition-scoped listing, fingerprints, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from winnow.exceptions import StageConfigMismatch, StorageError
from winnow.rowgroups import CommitStore, StageFingerprint


def fp(**config):
    return StageFingerprint(stage="embed", config=config, upstream={"index": "abc"}, num_records=100, buffer_size=10)


def test_layout_and_completed_lists_only_committed_row_groups(tmp_path):
    store = CommitStore(str(tmp_path))
    store.commit_table("embed", 3, 42, pa.table({"x": [1, 2]}))
    store.commit_table("embed", 4, 43, pa.table({"x": [3]}))
    assert (tmp_path / "embed" / "p00003" / "rg000000042.parquet").is_file()
    assert store.completed("embed", 3) == {42}
    assert store.completed("embed", 4) == {43}
    assert store.completed("embed", 5) == set()
    assert store.completed("aesthetic", 3) == set()
    assert store.read_table("embed", 3, 42).column("x").to_pylist() == [1, 2]


def test_temp_files_never_count_and_are_cleaned_on_start(tmp_path):
    store = CommitStore(str(tmp_path))
    store.commit_table("embed", 0, 1, pa.table({"x": [1]}))
    stray = tmp_path / "embed" / "p00000" / "rg000000002.parquet.tmp-999-deadbeef"
    stray.write_bytes(b"half a parquet")
    assert store.completed("embed", 0) == {1}
    assert stray.exists()
    assert store.completed("embed", 0, clean_temp=True) == {1}
    assert not stray.exists()


def test_missing_row_group_read_names_stage_and_row_group(tmp_path):
    with pytest.raises(Exception, match=r"row group 7 of stage 'embed'"):
        CommitStore(str(tmp_path)).read_table("embed", 0, 7)


def test_fingerprint_recorded_then_matched(tmp_path):
    store = CommitStore(str(tmp_path))
    assert store.ensure_stage(fp(model="a", threshold=5.0)) is None
    stored = json.loads((tmp_path / "embed" / "_stage.json").read_text())
    assert stored["config"] == {"model": "a", "threshold": 5.0}
    assert stored["num_records"] == 100 and stored["buffer_size"] == 10
    assert store.ensure_stage(fp(model="a", threshold=5.0)) is None  # same: no-op


def test_fingerprint_mismatch_names_each_changed_key_and_touches_nothing(tmp_path):
    store = CommitStore(str(tmp_path))
    store.ensure_stage(fp(model="a", threshold=5.0))
    store.commit_table("embed", 0, 0, pa.table({"x": [1]}))
    with pytest.raises(StageConfigMismatch) as err:
        store.ensure_stage(fp(model="b", threshold=6.0))
    msg = str(err.value)
    assert "config.model: 'a' -> 'b'" in msg and "config.threshold: 5.0 -> 6.0" in msg
    assert "overwrite" in msg
    assert {c[0] for c in err.value.changes} == {"config.model", "config.threshold"}
    assert store.completed("embed", 0) == {0}
    assert json.loads((tmp_path / "embed" / "_stage.json").read_text())["config"]["model"] == "a"


def test_plan_change_is_a_mismatch(tmp_path):
    store = CommitStore(str(tmp_path))
    store.ensure_stage(fp(model="a"))
    other = StageFingerprint(stage="embed", config={"model": "a"}, upstream={"index": "abc"}, num_records=100, buffer_size=20)
    with pytest.raises(StageConfigMismatch, match="buffer_size: 10 -> 20"):
        store.ensure_stage(other)


def test_overwrite_moves_old_stage_aside_and_deletes_nothing(tmp_path):
    store = CommitStore(str(tmp_path))
    store.ensure_stage(fp(model="a"))
    store.commit_table("embed", 0, 0, pa.table({"x": [1]}))
    moved = store.ensure_stage(fp(model="b"), overwrite=True)
    assert moved is not None and os.path.basename(moved).startswith("embed.replaced-")
    assert os.path.isfile(os.path.join(moved, "p00000", "rg000000000.parquet"))
    assert store.completed("embed", 0) == set()
    assert store.read_fingerprint("embed")["config"] == {"model": "b"}


def test_output_without_fingerprint_is_refused(tmp_path):
    store = CommitStore(str(tmp_path))
    store.commit_table("embed", 0, 0, pa.table({"x": [1]}))
    with pytest.raises(StageConfigMismatch, match="_stage.json"):
        store.ensure_stage(fp(model="a"))


def test_uri_run_root_works(tmp_path):
    store = CommitStore(f"file://{tmp_path}/run")
    store.commit_table("embed", 0, 5, pa.table({"x": [1]}))
    assert store.completed("embed", 0) == {5}
    assert (tmp_path / "run" / "embed" / "p00000" / "rg000000005.parquet").is_file()


def test_unwritable_output_is_a_clear_storage_error(tmp_path):
    # A file where the stage folder should be: fails for root too, unlike chmod.
    (tmp_path / "embed").write_text("not a folder")
    with pytest.raises(StorageError, match="could not write .*rg000000000.parquet"):
        CommitStore(str(tmp_path)).commit_table("embed", 0, 0, pa.table({"x": [1]}))


CHILD = textwrap.dedent(
    """
    import os, sys, time
    import pyarrow as pa
    from winnow.rowgroups import CommitStore
    import winnow.rowgroups.store as store_mod

    root, hang_at, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    store = CommitStore(root)
    payload = pa.table({"x": pa.array(range(200_000), pa.int64())})
    real_fsync = os.fsync
    state = {"rg": None}

    def fsync_that_hangs(fd):  # fault injection: stall the write of one row group mid-commit
        if state["rg"] == hang_at:
            open(ready, "w").close()
            time.sleep(600)
        real_fsync(fd)

    store_mod.os.fsync = fsync_that_hangs
    log = open(os.path.join(root, "writes.log"), "a")
    done = store.completed("embed", 0, clean_temp=True)
    for rg in range(10):
        if rg in done:
            continue
        state["rg"] = rg
        store.commit_table("embed", 0, rg, payload)
        log.write(f"{rg}\\n"); log.flush()
    """
)


def _run_child(root, hang_at, ready):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(hang_at), str(ready)])


def test_sigkill_mid_write_leaves_no_partial_file_and_restart_writes_only_the_rest(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    ready = tmp_path / "ready"
    child = _run_child(root, 4, ready)
    deadline = time.time() + 120
    while not ready.exists():
        assert child.poll() is None, "child exited early"
        assert time.time() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    part = root / "embed" / "p00000"
    temps = [p.name for p in part.iterdir() if ".tmp-" in p.name]
    assert temps, "the kill should have caught row group 4 mid-write"
    store = CommitStore(str(root))
    assert store.completed("embed", 0) == {0, 1, 2, 3}
    for rg in range(4):  # everything visible is whole
        assert pq.read_table(part / f"rg{rg:09d}.parquet").num_rows == 200_000
    restart = _run_child(root, -1, ready)
    assert restart.wait(timeout=120) == 0
    writes = [int(x) for x in (root / "writes.log").read_text().split()]
    assert writes == list(range(10))  # 0-3 in the first run, 4-9 in the restart: none twice
    assert store.completed("embed", 0) == set(range(10))
    assert not [p for p in part.iterdir() if ".tmp-" in p.name]
