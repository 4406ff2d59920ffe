"""Run-root lease: one run at a time per run root, expiry lets a dead run's root be taken over."""

from __future__ import annotations

import time

import pytest

from winnow.rowgroups import CommitStore, RunLocked
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
