"""Stage x row-group map of a run: committed, failed (with its error) or pending, from listings;
stages that commit units of their own (k-means centroids, dedup buckets) by those units.

Besides the index and the run summary, the only files read are the stages' fingerprints (one
stat and one small read of ``_stage.json`` per stage per call), the failure records and the
centroids file's footer (which fixes the bucket count), listed with one listing of ``pairwise/``. The map
travels run-length encoded (``"120c3f57."``): a running stage is a few long runs, whatever the
row-group count.

Listings and the settled-partition cache. A partition whose row groups are all committed is
*settled*: winnow never recomputes a committed row group, so while the stage's fingerprint stays
the same, a settled partition's map and commit times do not change. This process keeps, per
(run root, stage, fingerprint, plan), the settled partitions with the first and last commit time
(mtime) of each, in an LRU of at most :data:`CACHE_ENTRIES` keys guarded by a lock (the
api-server answers polls from several threads). A call then

* answers a stage whose partitions are all settled from the cache, with no listing;
* when some partitions are settled and at most :data:`MAX_PARTITION_LISTINGS` are not, lists
  only those, one non-recursive listing each;
* else makes one recursive listing of the stage folder (one paginated listing on an object
  store), as without a cache;

and adds the partitions it found settled to the cache. The counts, records, first/last commit
times and failures come out as from a full listing. The fingerprint part of the key is the
``_stage.json`` content's digest, size and mtime: a new config, or a run root deleted and run
again (a fingerprint file written later, so with another mtime), gets a new key and is listed
afresh. A stage without a ``_stage.json`` is always listed in
full and not cached. Not seen through the cache: a committed row-group file deleted or rewritten
by hand while the fingerprint file stays. ``row_group_map(..., cache=False)`` neither reads nor
fills the cache.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from winnow.rowgroups import CommitStore, RowGroupPlan, RunRoot
from winnow.rowgroups.failures import FAILED_SUFFIX, read_failure
from winnow.rowgroups.fs import read_small
from winnow.rowgroups.store import STAGE_FILE, TEMP_MARK, parse_partition_folder, parse_row_group_name, read_json

COMMITTED, FAILED, PENDING = "c", "f", "."
#: Failure texts sent per stage; the map still marks every failed row group.
MAX_ERRORS_PER_STAGE = 200
#: At most this many (run root, stage, fingerprint, plan) keys keep their settled partitions.
CACHE_ENTRIES = 64
#: With more open (not settled) partitions than this, one recursive listing of the stage replaces
#: the per-partition listings: fewer calls for the same files.
MAX_PARTITION_LISTINGS = 64


def run_length(states: bytearray | bytes) -> str:
    """``b"ccf.."`` -> ``"2c1f2."``.

    >>> run_length(b"ccf..")
    '2c1f2.'
    """
    out: list[str] = []
    i, n = 0, len(states)
    while i < n:
        j = i
        while j < n and states[j] == states[i]:
            j += 1
        out.append(f"{j - i}{chr(states[i])}")
        i = j
    return "".join(out)


#: Per partition: first and last commit mtime in ns (None where the filesystem gives none).
_Times = tuple[int | None, int | None]


@dataclass
class _StageScan:
    states: bytearray
    first: float | None = None
    last: float | None = None
    records: int = 0
    failed: list[tuple[int, int]] | None = None  # (partition, row group)


_cache: OrderedDict[tuple, dict[int, _Times]] = OrderedDict()
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every settled partition this process has cached."""
    with _cache_lock:
        _cache.clear()


def _cached(key: tuple) -> dict[int, _Times]:
    """A copy of the settled partitions cached under ``key`` (empty when none)."""
    with _cache_lock:
        entry = _cache.get(key)
        if entry is None:
            return {}
        _cache.move_to_end(key)
        return dict(entry)


def _remember(key: tuple, settled: dict[int, _Times]) -> None:
    """Cache ``settled`` under ``key``; the least recently used keys beyond
    :data:`CACHE_ENTRIES` are dropped. Nothing is stored for an empty ``settled``."""
    if not settled:
        return
    with _cache_lock:
        entry = _cache.get(key)
        _cache[key] = {**entry, **settled} if entry else dict(settled)
        _cache.move_to_end(key)
        while len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)


def _fingerprint_identity(store: CommitStore, stage: str) -> tuple[str, int | None, int | None] | None:
    """(content digest, size, mtime_ns) of the stage's ``_stage.json``; None without one.

    The mtime tells a fingerprint written again with the same content (a run root deleted and
    run again with the same config) from the one the cached partitions were settled under."""
    path = f"{store.stage_dir(stage)}/{STAGE_FILE}"
    info = store.fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return None
    data = read_small(store.fs, path)
    if data is None:
        return None
    return hashlib.sha256(data).hexdigest(), info.size, info.mtime_ns


def _list(store: CommitStore, folder: str, *, recursive: bool) -> list[pafs.FileInfo]:
    try:
        return store.fs.get_file_info(pafs.FileSelector(folder, recursive=recursive, allow_not_found=True))
    except FileNotFoundError:
        return []


def _collect(infos: list[pafs.FileInfo], stage_folder: str, plan: RowGroupPlan, states: bytearray,
             times: dict[int, _Times], failed: dict[int, int]) -> None:
    """Mark the commits of ``infos`` in ``states``, widen their partition's ``times`` and note
    the failure records in ``failed`` (row group -> partition).

    Counted: ``rg#########.parquet`` and failure records directly in ``<stage>/p<partition>/``
    (the folder :meth:`CommitStore.partition_dir` names, ``stage_folder`` being the stage
    folder's own name) for a row group the plan puts in that partition. Temp files and
    everything else are ignored."""
    g, parts = plan.num_row_groups, plan.num_partitions
    c = ord(COMMITTED)
    for info in infos:
        path = info.path
        slash = path.rfind("/")
        name = path[slash + 1:]
        if not name.startswith("rg") or TEMP_MARK in name:
            continue
        parsed = parse_row_group_name(name)
        if not parsed or parsed[1] not in (".parquet", FAILED_SUFFIX):
            continue
        up = path.rfind("/", 0, slash)
        folder = path[up + 1:slash]
        p = parse_partition_folder(folder)
        if p is None:
            continue
        rg = parsed[0]
        if path[path.rfind("/", 0, up) + 1:up] != stage_folder:
            continue  # not <stage>/p<partition>/ (e.g. a copy moved aside inside the stage folder)
        # Only row groups in the partition the plan puts them in (p*G//P <= rg < (p+1)*G//P).
        if not (p < parts and p * g // parts <= rg < (p + 1) * g // parts):
            continue
        if parsed[1] == ".parquet":
            states[rg] = c
            t = info.mtime_ns
            if t is not None:
                old = times.get(p)
                times[p] = (t, t) if old is None else (min(old[0], t), max(old[1], t))
        else:
            failed[rg] = p


def _scan(store: CommitStore, stage: str, plan: RowGroupPlan,
          settled: dict[int, _Times] | None = None) -> tuple[_StageScan, dict[int, _Times]]:
    """The stage's map, and every partition settled now (all committed) with its commit times.

    ``settled``: partitions known to be settled (from the cache); they are not listed. With
    none, or with more than :data:`MAX_PARTITION_LISTINGS` others, one recursive listing of the
    stage folder (one paginated listing on an object store) rather than one per partition: on a
    run of 10^5 row groups the per-call overhead dominated. Else one listing per open partition.
    """
    g, parts = plan.num_row_groups, plan.num_partitions
    c = ord(COMMITTED)
    settled = {p: t for p, t in (settled or {}).items() if p < parts}
    open_parts = [p for p in range(parts) if p not in settled]
    states = bytearray(PENDING.encode()) * g
    times: dict[int, _Times] = {}
    failed: dict[int, int] = {}
    stage_dir = store.stage_dir(stage)
    stage_folder = stage_dir[stage_dir.rfind("/") + 1:]
    full = not settled or len(open_parts) > MAX_PARTITION_LISTINGS
    if full:  # the one listing sees every partition again, the settled ones too
        _collect(_list(store, stage_dir, recursive=True), stage_folder, plan, states, times, failed)
    else:
        for p, t in settled.items():
            lo, hi = p * g // parts, (p + 1) * g // parts
            states[lo:hi] = COMMITTED.encode() * (hi - lo)
            if t[0] is not None:
                times[p] = t
        for p in open_parts:
            _collect(_list(store, store.partition_dir(stage, p), recursive=False), stage_folder, plan,
                     states, times, failed)
    now_settled = {} if full else dict(settled)
    for p in range(parts) if full else open_parts:
        lo, hi = p * g // parts, (p + 1) * g // parts
        if states.count(c, lo, hi) == hi - lo:
            now_settled[p] = times.get(p, (None, None))
    scan = _StageScan(states=states, failed=[])
    for rg, p in sorted(failed.items()):
        if states[rg] != c:  # a later commit wins over an old failure
            states[rg] = ord(FAILED)
            scan.failed.append((p, rg))
    # Every row group holds B records except the last one.
    scan.records = states.count(c) * plan.buffer_size
    if g and states[g - 1] == c:
        scan.records -= g * plan.buffer_size - plan.num_records
    if times:
        scan.first = min(t[0] for t in times.values()) / 1e9
        scan.last = max(t[1] for t in times.values()) / 1e9
    return scan, now_settled


def _stage_scan(store: CommitStore, stage: str, plan: RowGroupPlan, *, cache: bool) -> _StageScan:
    """:func:`_scan` through the settled-partition cache (see the module docstring)."""
    fingerprint = _fingerprint_identity(store, stage) if cache else None
    if fingerprint is None:
        return _scan(store, stage, plan)[0]
    key = (store.run_root, stage, fingerprint, (plan.num_records, plan.buffer_size, plan.num_partitions))
    scan, settled = _scan(store, stage, plan, _cached(key))
    _remember(key, settled)
    return scan


def committed_row_groups(store: CommitStore, stage: str, plan: RowGroupPlan) -> int:
    """How many row groups of ``stage`` are committed (through the settled-partition cache)."""
    return _stage_scan(store, stage, plan, cache=True).states.count(ord(COMMITTED))


#: What a stage's units are called in the map, by the registry's scope (row-group stages aside).
UNIT_NAMES = {"bucket": "bucket", "global": "output"}
#: Task-instance states of a stage that is being worked on (or about to be, or retrying).
ACTIVE_TASK_STATES = frozenset({"running", "queued", "scheduled", "up_for_retry", "up_for_reschedule",
                                "deferred", "restarting"})


def _status(committed: int, failed: int, units: int | None) -> str:
    """A stage's state as storage tells it: ``done`` (every unit committed), ``failed`` (a failure
    record stands) or ``pending`` (not all committed yet; whether a task works on it is Airflow's)."""
    if units is not None and committed == units:
        return "done"
    return "failed" if failed else "pending"


def _row_group_stage(store: CommitStore, name: str, plan: RowGroupPlan, *, cache: bool) -> dict[str, Any]:
    scan = _stage_scan(store, name, plan, cache=cache)
    committed = scan.states.count(ord(COMMITTED))
    errors = []
    for p, rg in scan.failed[:MAX_ERRORS_PER_STAGE]:
        rec = read_failure(store, name, p, rg) or {}
        errors.append({"row_group": rg, "partition": p, "error": rec.get("error", ""),
                       "failed_at": rec.get("failed_at")})
    span = (scan.last - scan.first) if scan.first is not None and scan.last is not None else 0.0
    return {
        "stage": name,
        "unit": "row group",
        "units": plan.num_row_groups,
        "status": _status(committed, len(scan.failed), plan.num_row_groups),
        "committed": committed,
        "failed": len(scan.failed),
        "pending": plan.num_row_groups - committed - len(scan.failed),
        "records": scan.records,
        "records_per_s": round(scan.records / span, 2) if span > 0 and committed > 1 else None,
        "first_commit": scan.first,
        "last_commit": scan.last,
        "map": run_length(scan.states),
        "errors": errors,
    }


def _unit_stage(store: CommitStore, spec: Any) -> dict[str, Any]:
    """A stage that commits units of its own (the k-means centroids, dedup buckets): how many,
    which are committed, read by the stage's unit reader named in the registry. Its failures
    are not recorded in storage: the Airflow task states tell them (:func:`with_task_states`)."""
    total, done = spec.load_units()(store)
    committed = len(done) if total is None else sum(1 for u in done if 0 <= u < total)
    states = bytearray(PENDING.encode()) * (total or 0)
    for u in done:
        if 0 <= u < len(states):
            states[u] = ord(COMMITTED)
    return {
        "stage": spec.name,
        "unit": UNIT_NAMES.get(spec.scope, "unit"),
        "units": total,
        "status": _status(committed, 0, total),
        "committed": committed,
        "failed": 0,
        "pending": None if total is None else total - committed,
        "records": None,
        "records_per_s": None,
        "first_commit": None,
        "last_commit": None,
        "map": run_length(states),
        "errors": [],
    }


def with_task_states(stages: list[dict[str, Any]], tasks: dict[str, dict[int, str]], run_state: str | None) -> None:
    """Complete each stage's storage ``status`` with what Airflow says of its task instances
    (``tasks``: stage -> {map index: state}): a stage not done is ``running`` while one of its
    tasks is active, ``failed`` when one failed, and ``not run`` once the DAG run has ended
    without it (upstream failed). A stage that storage says is done stays done."""
    finished = run_state in ("success", "failed")
    for s in stages:
        if s["status"] == "done":
            continue
        states = set((tasks.get(s["stage"]) or {}).values())
        if states & ACTIVE_TASK_STATES:
            s["status"] = "running"
        elif "failed" in states:
            s["status"] = "failed"
        elif finished and s["status"] == "pending":
            s["status"] = "not run"


def row_group_map(run_root: RunRoot | str, stages: tuple[str, ...] | None = None, *, cache: bool = True) -> dict[str, Any]:
    """Per stage: its units (row groups, or the stage's own units), counts, status, records/s,
    the run-length encoded map and the failed row groups' errors.

    Row-group stages (``unit`` "row group") are read from their row-group files. The stages that
    commit no row-group files (the k-means ``centroids``: one ``output``; ``pairwise``: one unit
    per ``bucket``) are read by their unit reader from the registry: their ``map`` is over their
    units, ``units`` is None while not known yet (the buckets before the centroids). ``status``
    is ``done``, ``failed`` or ``pending`` from storage (see :func:`with_task_states`).
    ``records_per_s`` is the stage's committed records over the span between its first and
    last commit (None until two commits exist): the stage's own pace, not the run's.
    ``cache=False`` lists every stage in full and leaves the settled-partition cache alone.
    """
    from winnow.data.index import load_index
    from winnow.pipeline import SUMMARY_FILE
    from winnow.registry import stage_order, stage_spec

    store = CommitStore(run_root)
    plan = load_index(run_root).plan
    out_stages = []
    for name in stages or stage_order():
        spec = stage_spec(name)
        if spec.has_row_groups:
            out_stages.append(_row_group_stage(store, name, plan, cache=cache))
        else:
            out_stages.append(_unit_stage(store, spec))
    summary = read_json(store.fs, store.path(SUMMARY_FILE))
    return {
        "run_root": store.run_root.uri,
        "records": plan.num_records,
        "buffer_size": plan.buffer_size,
        "row_groups": plan.num_row_groups,
        "partitions": plan.num_partitions,
        "stages": out_stages,
        "summary": summary,
    }
