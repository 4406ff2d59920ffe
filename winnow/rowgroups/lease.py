"""A lease on a run root, so two runs never write the same run root at once.

The lease is ``<run_root>/_lease.json`` with an owner (the DAG run id: every task of one run
shares it) and an expiry. A task of another owner fails fast while the lease is live; an
expired lease (its holder died) is taken over. Tasks renew it as they work.

Without rename or file locks on object stores, the lease is taken by a create-if-absent PUT
(``If-None-Match: *``) and an expired one is taken over by a replace-if-unchanged PUT
(``If-Match: <ETag>``), so of two racing runs exactly one wins. A store without conditional
writes falls back to read-then-write: two runs starting within the same second could both pass.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass

from winnow.exceptions import RunLocked, StorageError
from winnow.rowgroups.fs import (
    ConditionalWritesUnsupported,
    conditional_writes,
    delete_file,
    display_uri,
)
from winnow.rowgroups.store import CommitStore, is_local, read_json, write_json

logger = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
DEFAULT_TTL_S = 30 * 60
#: A renewal that fails (the store down or throttling past the storage deadline) is no reason to
#: stop while the lease this process holds has at least this long left.
RENEW_MARGIN_S = 60.0

#: Leases this process holds now: (lease path, owner) -> expiry. A process owner of this
#: process that is not here is a run of this process that ended without releasing its lease
#: (the store was down): that lease is provably abandoned.
_HELD: dict[tuple[str, str], float] = {}
_HELD_LOCK = threading.Lock()


#: Owners that are one process (``run_all`` without Airflow) start with this; their lease is
#: stale as soon as that process is gone, so a crashed ``run_all`` can be rerun at once. A DAG
#: run's owner spans many task processes and is only freed by expiry.
PROCESS_OWNER_PREFIX = "process:"


def process_owner() -> str:
    """A lease owner for a run held by this one process."""
    return f"{PROCESS_OWNER_PREFIX}{os.uname().nodename}:{os.getpid()}:{time.time_ns()}"


@dataclass(frozen=True)
class Lease:
    owner: str
    expires_at: float
    pid: int = 0
    host: str = ""

    @property
    def live(self) -> bool:
        """Whether the holder may still be using the run root: the lease has not expired, and
        its holder is not provably gone. A process owner on this host is gone when its process
        no longer exists, or when it is this very process and no run of it holds that owner
        any more (it ended while the store was down and could not release)."""
        if self.expires_at <= time.time():
            return False
        if self.owner.startswith(PROCESS_OWNER_PREFIX) and self.host == os.uname().nodename and self.pid:
            if self.pid == os.getpid():
                with _HELD_LOCK:
                    return any(owner == self.owner for _, owner in _HELD)
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False  # its one process died: nobody is using the run root
            except PermissionError:
                pass
        return True


def read_lease(store: CommitStore) -> Lease | None:
    return _lease_from(read_json(store.fs, store.path(LEASE_FILE)))


def _lease_from(data: dict | None) -> Lease | None:
    if not data:
        return None
    return Lease(
        owner=str(data.get("owner", "")),
        expires_at=float(data.get("expires_at", 0)),
        pid=int(data.get("pid", 0) or 0),
        host=str(data.get("host", "")),
    )


def acquire(store: CommitStore, owner: str, *, ttl_s: float = DEFAULT_TTL_S) -> Lease:
    """Take or renew the lease for ``owner``; raise :class:`RunLocked` if another owner holds it.

    A renewal that fails on storage (after the storage layer's own retries) while this process
    holds the lease with more than :data:`RENEW_MARGIN_S` left is logged, not raised: the run
    goes on, and the next renewal tries again."""
    key = (store.path(LEASE_FILE), owner)
    try:
        lease = _acquire(store, owner, ttl_s=ttl_s)
    except (StorageError, OSError) as exc:
        with _HELD_LOCK:
            held = _HELD.get(key, 0.0)
        left = held - time.time()
        if left <= RENEW_MARGIN_S:
            raise
        logger.warning("could not renew the run lease %s (%s); it has %.0f s left, so the run goes on and "
                       "renews it at its next step", display_uri(store.fs, key[0]), exc, left)
        return Lease(owner=owner, expires_at=held, pid=os.getpid(), host=os.uname().nodename)
    with _HELD_LOCK:
        _HELD[key] = lease.expires_at
    return lease


def forget(store: CommitStore, owner: str) -> None:
    """This process no longer holds ``owner``'s lease (released, or abandoned: a process
    owner's abandoned lease is then taken over at once by this process's next run)."""
    with _HELD_LOCK:
        _HELD.pop((store.path(LEASE_FILE), owner), None)


def _acquire(store: CommitStore, owner: str, *, ttl_s: float) -> Lease:
    path = store.path(LEASE_FILE)
    now = time.time()
    lease = Lease(owner=owner, expires_at=now + ttl_s, pid=os.getpid(), host=os.uname().nodename)
    payload = {"owner": owner, "expires_at": lease.expires_at, "pid": os.getpid(), "host": os.uname().nodename}
    if is_local(store.fs):
        try:  # First taker wins atomically; everyone else reads what is there.
            os.makedirs(store.root, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f)
            return lease
        except FileExistsError:
            pass
        except OSError as exc:  # read-only or full storage: say so, naming the path
            raise StorageError(
                f"could not take the run lease {path}: {exc.strerror or exc}. The output root must "
                "be writable (check the mount, permissions and free space)."
            ) from exc
    else:
        cond = conditional_writes(store.fs)
        if cond.supported:
            try:
                return _acquire_conditional(store, cond, owner, lease, payload, ttl_s)
            except ConditionalWritesUnsupported:
                pass  # the store rejected the headers: read-then-write below
    current = read_lease(store)
    if current is not None and current.owner != owner and current.live:
        raise _locked(store, current, now)
    write_json(store.fs, path, payload)
    return lease


def _locked(store: CommitStore, current: Lease, now: float) -> RunLocked:
    left = int(current.expires_at - now)
    return RunLocked(
        f"run root {store.run_root} is in use by run {current.owner!r} (lease expires in {left} s). "
        "Two runs must not write one run root at once: wait for that run to finish, use another "
        f"run_key, or, if that run is dead, delete {display_uri(store.fs, store.path(LEASE_FILE))} to take "
        "over now."
    )


def _acquire_conditional(store: CommitStore, cond, owner: str, lease: Lease, payload: dict, ttl_s: float) -> Lease:
    """The lease on an object store with conditional PUTs: create, or replace what we read."""
    path = store.path(LEASE_FILE)
    body = json.dumps(payload).encode()
    for _ in range(3):  # each lost race re-reads; a live other owner ends it at once
        # Read first: a task of a run renewing its own fresh lease makes this one request.
        got = cond.read(path)
        if got is None:
            if cond.create(path, body):
                return lease
            continue  # created by another between our read and our create
        data, etag = got
        try:
            current = _lease_from(json.loads(data))
        except ValueError:
            current = None  # unreadable lease: take it over like an expired one
        if current is not None and current.owner != owner and current.live:
            raise _locked(store, current, time.time())
        if current is not None and current.owner == owner and 0 < ttl_s / 2 < current.expires_at - time.time():
            return current  # ours for a while yet: a renewal PUT per task would only cost requests
        if cond.replace(path, body, etag):
            return lease
    raise RunLocked(
        f"run root {store.run_root}: the lease {display_uri(store.fs, path)} kept changing while taking "
        "it; another run is starting on the same run root. Retry, or use another run_key."
    )


def release(store: CommitStore, owner: str) -> None:
    """Drop the lease if ``owner`` holds it (at the end of a run). Storage errors are raised
    after the storage layer's retries; this process forgets the lease either way."""
    try:
        current = read_lease(store)
        if current is not None and current.owner == owner:
            delete_file(store.fs, store.path(LEASE_FILE))
    finally:
        forget(store, owner)


def release_quietly(store: CommitStore, owner: str) -> bool:
    """:func:`release` for a run that is failing anyway: a store that does not answer within
    the storage deadline is logged, not raised (the error the run stops with is the one that
    matters). A process owner's lease left behind is taken over at once by the next run on
    this host (:attr:`Lease.live`); True when released."""
    try:
        release(store, owner)
        return True
    except (StorageError, OSError) as exc:
        logger.warning("could not release the run lease %s (%s); the next run on this host takes it over at once",
                       display_uri(store.fs, store.path(LEASE_FILE)), exc)
        return False
