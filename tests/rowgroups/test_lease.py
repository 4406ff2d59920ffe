"""Run-root lease: one run at a time per run root, expiry lets a dead run's root be taken over."""

from __future__ import annotations

import time

import pytest

from winnow.exceptions import RunLocked
from winnow.rowgroups import CommitStore
from winnow.rowgroups.lease import acquire, read_lease, release


def test_second_owner_fails_fast_while_first_holds_the_lease(tmp_path):
    store = CommitStore(str(tmp_path / "run"))
    acquire(store, "run-a")
    acquire(store, "run-a")  # renewals by the same run are fine
    with pytest.raises(RunLocked, match="in use by run 'run-a'"):
        acquire(store, "run-b")
    assert read_lease(store).owner == "run-a"


def test_expired_lease_is_taken_over(tmp_path):
    store = CommitStore(str(tmp_path / "run"))
    acquire(store, "run-a", ttl_s=0.01)
    time.sleep(0.05)
    acquire(store, "run-b")
    assert read_lease(store).owner == "run-b"


def test_release_only_by_owner(tmp_path):
    store = CommitStore(str(tmp_path / "run"))
    acquire(store, "run-a")
    release(store, "run-b")
    assert read_lease(store).owner == "run-a"
    release(store, "run-a")
    assert read_lease(store) is None
    acquire(store, "run-b")


def test_lease_of_a_dead_single_process_run_is_taken_over_at_once(tmp_path):
    import subprocess
    import sys

    store = CommitStore(str(tmp_path / "run"))
    child = subprocess.run(
        [sys.executable, "-c",
         "import sys; from winnow.rowgroups import CommitStore; from winnow.rowgroups.lease import acquire, process_owner; "
         "acquire(CommitStore(sys.argv[1]), process_owner())", str(tmp_path / "run")],
        check=True,
    )
    assert child.returncode == 0
    held = read_lease(store)
    assert held.owner.startswith("process:") and not held.live  # its process has exited
    acquire(store, "run-b")
    assert read_lease(store).owner == "run-b"


def test_lease_of_a_live_single_process_run_is_respected(tmp_path):
    from winnow.rowgroups.lease import process_owner

    store = CommitStore(str(tmp_path / "run"))
    acquire(store, process_owner())  # this very process: alive
    with pytest.raises(RunLocked):
        acquire(store, "run-b")
