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


def test_this_processes_own_abandoned_lease_is_taken_over_at_once(tmp_path):
    """A run_all of this process that ended without releasing (the store was down) left its
    lease: this process's next run takes it over; a run of this process still holding it is
    respected."""
    from winnow.rowgroups import lease

    store = CommitStore(str(tmp_path / "run"))
    first = lease.process_owner()
    acquire(store, first)
    second = lease.process_owner()
    with pytest.raises(RunLocked):
        acquire(store, second)  # the first run still holds it
    lease.forget(store, first)  # it ended, its release failed
    acquire(store, second)
    assert read_lease(store).owner == second


def test_a_failed_renewal_with_time_left_is_logged_and_the_run_goes_on_by_injected_fault(tmp_path, monkeypatch, caplog):
    """A store that cannot be reached for a renewal (injected: the renewal raises) does not stop
    a run whose lease has time left; one whose lease runs out within the margin does stop."""
    from winnow.exceptions import StorageError
    from winnow.rowgroups import lease

    store = CommitStore(str(tmp_path / "run"))
    held = acquire(store, "dag/run-1")

    def store_down(*args, **kwargs):  # the injected fault
        raise StorageError("s3://b/run/_lease.json: cannot reach the object store (injected)")

    monkeypatch.setattr(lease, "_acquire", store_down)
    with caplog.at_level("WARNING", logger="winnow.rowgroups.lease"):
        renewed = acquire(store, "dag/run-1")
    assert renewed.expires_at == held.expires_at and "could not renew the run lease" in caplog.text
    with pytest.raises(StorageError):
        acquire(store, "dag/run-2")  # not held by this process: nothing to go on with
    with lease._HELD_LOCK:
        lease._HELD[(store.path(lease.LEASE_FILE), "dag/run-1")] = time.time() + 10
    with pytest.raises(StorageError):
        acquire(store, "dag/run-1")  # 10 s left: within the margin, the run stops
