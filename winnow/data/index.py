"""The index stage: list the input's shards, scan their tar headers, and commit the run's
global record order as row-group Parquet (``winnow.schemas.INDEX``) through the commit store.

Resumable at two grains: each shard's (serial) or shard group's (parallel) scan is committed on
its own (a rerun scans only what is missing) and each index row group is committed on its own (a
rerun writes only what is missing).

Two ways to build the same index, row for row: ``backend="serial"`` scans every shard in this
process (the reference); ``"ray"`` (what the pipeline uses) or ``"local"`` runs the parallel
algorithm below (shard groups, key partitions and row groups as units: Ray tasks, or a loop in
this process).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from winnow.data.shards import list_shard_infos
from winnow.data.tarscan import SCAN_SCHEMA, ShardScan, scan_shard
from winnow.exceptions import ShardError, StageConfigMismatch, StorageError
from winnow.rowgroups.plan import MAX_MAP_LENGTH, RowGroupPlan
from winnow.rowgroups.store import (
    CommitStore,
    StageFingerprint,
    read_json,
    table_to_parquet_bytes,
    write_atomic,
    write_json,
)
from winnow.schemas import INDEX

STAGE = "index"
INDEX_FILE = "_index.json"
#: Per-shard scans live beside the stage folder, keyed by the listing digest, because the
#: stage folder may only hold output once its fingerprint (which needs N) is written.
SCAN_DIR = "_index_scan"
#: At most this many bad-shard errors are kept in the counts (the count itself is exact).
MAX_BAD_SHARD_ERRORS = 100
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexConfig:
    """What the index stage reads and how it cuts the run into row groups.

    :param input_uri: folder or prefix of WebDataset shards (local path or pyarrow.fs URI).
    :param buffer_size: records per row group (B).
    :param max_partitions: upper bound on partitions (mapped task instances).
    :param skip_bad_shards: skip and count a truncated or unreadable shard instead of failing.
    """

    input_uri: str
    buffer_size: int
    max_partitions: int = 256
    skip_bad_shards: bool = False

    def __post_init__(self) -> None:
        for name in ("buffer_size", "max_partitions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_partitions > MAX_MAP_LENGTH:
            raise ValueError(
                f"max_partitions must be <= {MAX_MAP_LENGTH} (Airflow's max_map_length), got {self.max_partitions}"
            )


@dataclass
class IndexResult:
    """The committed index of a run: its plan, its shards and what was counted."""

    plan: RowGroupPlan
    num_records: int
    shards: list[str]
    counts: dict[str, Any]
    # What this call did (not stored): zero on a rerun that found everything committed.
    shards_scanned: int = 0
    row_groups_committed: int = 0
    fingerprint: dict[str, Any] = field(default_factory=dict)


def _listing_digest(shards: list[str], sizes: list[int]) -> str:
    h = hashlib.sha256()
    for name, size in zip(shards, sizes):
        h.update(f"{name}\0{size}\n".encode())
    return h.hexdigest()[:16]


def _fingerprint(config: IndexConfig, digest: str, num_records: int) -> StageFingerprint:
    return StageFingerprint(
        stage=STAGE,
        config={
            "input_uri": config.input_uri,
            "shards_digest": digest,
            "skip_bad_shards": config.skip_bad_shards,
            # The plan's partition layout decides where row groups live on storage.
            "max_partitions": config.max_partitions,
        },
        num_records=num_records,
        buffer_size=config.buffer_size,
    )


def build_index(
    run_root: str,
    config: IndexConfig,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    backend: str = "serial",
    ray_address: str | None = None,
    group_size: int | None = None,
) -> IndexResult:
    """Index ``config.input_uri`` into ``<run_root>/index``; resume whatever is already there.

    ``backend``: ``"serial"`` scans in this process; ``"ray"`` scans shard groups (of
    ``group_size`` shards, default :func:`default_group_size`) in Ray tasks and commits row
    groups from Ray tasks, this process only plans and sums counts; ``"local"`` is the same
    parallel algorithm as a loop in this process. All three give the same rows and counts.

    Raises :class:`~winnow.exceptions.InputError` when there are no shards,
    :class:`~winnow.exceptions.ShardError` for a bad shard unless ``skip_bad_shards``, and
    :class:`~winnow.exceptions.StageConfigMismatch` when the run root was indexed with
    another input, listing, buffer size or partition bound (``overwrite`` moves it aside).
    """
    say = log or _log.info
    RowGroupPlan(0, config.buffer_size, config.max_partitions)  # validate knobs before any I/O
    store = CommitStore(run_root)
    listing = list_shard_infos(config.input_uri)
    shards = [name for name, _ in listing]
    sizes = [size for _, size in listing]
    digest = _listing_digest(shards, sizes)

    # Fail before scanning when the stored fingerprint already disagrees on anything but N.
    stored = store.read_fingerprint(STAGE)
    if stored is not None and not overwrite:
        probe = _fingerprint(config, digest, int(stored.get("num_records", 0)))
        changes = probe.changes_from(stored)
        if changes:
            raise StageConfigMismatch(STAGE, store.stage_dir(STAGE), changes)

    if backend == "serial":
        scans, counts, scanned = _scan_all(store, shards, digest, config.skip_bad_shards, say)
        table = _assemble(scans, counts)
        n = table.num_rows
        plan = RowGroupPlan(n, config.buffer_size, config.max_partitions)
        fingerprint = _fingerprint(config, digest, n)
        moved = store.ensure_stage(fingerprint, overwrite=overwrite)
        if moved:
            say(f"index: the old index of {run_root} was moved aside to {moved}")

        committed = 0
        for partition in range(plan.num_partitions):
            for rg in store.missing(STAGE, plan, partition):
                start, stop = plan.row_group_range(rg)
                store.commit_table(STAGE, partition, rg, table.slice(start, stop - start))
                committed += 1
    elif backend in ("ray", "local"):
        plan, counts, scanned, committed, fingerprint = _build_parallel(
            store, config, shards, digest, overwrite=overwrite, say=say, backend=backend,
            ray_address=ray_address, group_size=group_size)
        n = plan.num_records
    else:
        raise ValueError(f"backend must be 'serial', 'ray' or 'local', got {backend!r}")
    payload = {
        "num_records": n,
        "buffer_size": config.buffer_size,
        "max_partitions": config.max_partitions,
        "input_uri": config.input_uri,
        "shards": shards,
        "counts": counts,
        "fingerprint_digest": fingerprint.digest,
    }
    # Written only when it changes: a rerun leaves the committed object as it was (no PUT).
    stored_index = read_json(store.fs, store.path(STAGE, INDEX_FILE))
    if json.dumps(stored_index, sort_keys=True, default=str) != json.dumps(payload, sort_keys=True, default=str):
        write_json(store.fs, store.path(STAGE, INDEX_FILE), payload)
    say(
        f"index: {n} records in {plan.num_row_groups} row groups / {plan.num_partitions} partitions "
        f"from {len(shards)} shards ({scanned} scanned now, {committed} row groups committed now); "
        f"skipped: {counts['members_without_image']} without image, {counts['duplicate_keys']} "
        f"duplicate keys, {counts['bad_shards']} bad shards, {counts['zero_byte_shards']} zero-byte shards"
    )
    return IndexResult(
        plan=plan,
        num_records=n,
        shards=shards,
        counts=counts,
        shards_scanned=scanned,
        row_groups_committed=committed,
        fingerprint=store.read_fingerprint(STAGE) or {},
    )


def load_index(run_root: str) -> IndexResult:
    """The index a previous :func:`build_index` committed under ``run_root``."""
    store = CommitStore(run_root)
    path = store.path(STAGE, INDEX_FILE)
    meta = read_json(store.fs, path)
    if meta is None:
        raise StorageError(
            f"run root {run_root} has no index ({path} is missing): run the index stage "
            "(build_index / the `index` task) for this run first."
        )
    plan = RowGroupPlan(meta["num_records"], meta["buffer_size"], meta["max_partitions"])
    return IndexResult(
        plan=plan,
        num_records=meta["num_records"],
        shards=list(meta["shards"]),
        counts=dict(meta["counts"]),
        fingerprint=store.read_fingerprint(STAGE) or {},
    )


def _scan_all(
    store: CommitStore, shards: list[str], digest: str, skip_bad: bool, say: Callable[[str], None]
) -> tuple[list[ShardScan], dict[str, Any], int]:
    counts = _empty_counts(len(shards))
    scans: list[ShardScan] = []
    scanned = 0
    started = last = time.monotonic()
    for i, shard in enumerate(shards):
        path = store.path(SCAN_DIR, digest, f"s{i:06d}.parquet")
        bad_path = store.path(SCAN_DIR, digest, f"s{i:06d}.bad.json")
        scan = _read_scan(store, path)
        if scan is None or scan.shard != shard:
            # A shard found bad before is not rescanned: the digest pins its name and size.
            bad = read_json(store.fs, bad_path)
            error = bad["error"] if bad and bad.get("shard") == shard else None
            if error is None:
                try:
                    scan = scan_shard(shard)
                except ShardError as exc:
                    error = str(exc)
                    write_json(store.fs, bad_path, {"shard": shard, "error": error})
                    scanned += 1
                    if not skip_bad:
                        raise
                else:
                    write_atomic(store.fs, path, table_to_parquet_bytes(scan.table()))
                    scanned += 1
            if error is not None:
                if not skip_bad:
                    raise ShardError(shard, error)
                counts["bad_shards"] += 1
                if len(counts["bad_shard_errors"]) < MAX_BAD_SHARD_ERRORS:
                    counts["bad_shard_errors"].append({"shard": shard, "error": error})
                say(f"index: skipping bad shard {shard}: {error}")
                continue
        scans.append(scan)
        counts["zero_byte_shards"] += int(scan.zero_byte)
        for name in ("members", "members_without_image", "duplicate_keys", "extra_images", "ignored_members"):
            counts[name] += getattr(scan, name)
        now = time.monotonic()
        if now - last >= 5 or i + 1 == len(shards):
            last = now
            say(f"index: {i + 1}/{len(shards)} shards ({scanned} scanned, {now - started:.1f}s)")
    return scans, counts, scanned


def _empty_counts(num_shards: int) -> dict[str, Any]:
    return {
        "shards": num_shards,
        "zero_byte_shards": 0,
        "bad_shards": 0,
        "bad_shard_errors": [],
        "members": 0,
        "members_without_image": 0,
        "duplicate_keys": 0,
        "duplicate_keys_across_shards": 0,
        "extra_images": 0,
        "ignored_members": 0,
        "records": 0,
    }


def _read_scan(store: CommitStore, path: str) -> ShardScan | None:
    try:
        with store.fs.open_input_file(path) as f:
            return ShardScan.from_table(pq.read_table(io.BytesIO(f.read())))
    except FileNotFoundError:
        return None
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None  # an unreadable cached scan is rescanned, never trusted


def _assemble(scans: list[ShardScan], counts: dict[str, Any]) -> pa.Table:
    """Concatenate shard scans in shard order, drop keys already seen in an earlier shard, and
    number the records: record_id is the global position."""
    parts = []
    seen: set[str] = set()
    examples: list[str] = []
    for scan in scans:
        if not scan.keys:
            continue
        t = scan.table()
        keys = scan.keys
        keep = [k not in seen for k in keys]
        dropped = len(keys) - sum(keep)
        if dropped:
            counts["duplicate_keys_across_shards"] += dropped
            examples.extend(k for k, ok in zip(keys, keep) if not ok)
            t = t.filter(pa.array(keep))
        seen.update(keys)
        t = t.add_column(0, "shard", pa.array([scan.shard] * t.num_rows, pa.string()))
        parts.append(t.replace_schema_metadata(None))
    counts["duplicate_keys"] += counts["duplicate_keys_across_shards"]
    if examples:
        counts["duplicate_key_examples"] = examples[:20]
    if parts:
        body = pa.concat_tables(parts)
    else:
        body = SCAN_SCHEMA.empty_table().add_column(0, "shard", pa.array([], pa.string()))
    ids = pa.array(range(body.num_rows), pa.int64())
    table = body.add_column(0, "record_id", ids).select(INDEX.names).cast(INDEX)
    counts["records"] = table.num_rows
    return table


# ---- the parallel index: shard groups, key partitions and row groups as Ray tasks -----------
#
# 1. scan: shards are cut into groups of ``group_size``; one Ray task per group scans its
#    shards' tar headers and commits ``<SCAN_DIR>/<digest>/g<size>/g<group>.parquet`` (the
#    records with their shard position; per-shard counts and bad-shard errors in the footer).
# 2. keys: a key kept in an earlier shard is dropped from later ones. One Ray task per key
#    partition (a stable hash of the key) reads the key columns of every group and commits the
#    drops of its keys: memory is 1/H of the keys, never the whole index.
# 3. records ids: per-shard counts minus drops, prefix sums -> each shard's first record id;
#    so the order is today's (shard order, then member order).
# 4. row groups: one Ray task per partition commits its missing index row groups from the
#    groups that overlap its record range.
# The caller's process (the Airflow index task) only lists, plans, sums counts and checks.

#: Most shards per scan task (fewer when there are few shards, so every CPU gets some).
MAX_GROUP_SIZE = 64
#: Most key partitions (Ray tasks of the cross-shard key check).
MAX_KEY_PARTITIONS = 64
_GROUP_META = b"winnow.scan_group"


def default_group_size(num_shards: int) -> int:
    """Shards per scan task: about 16 tasks for a small input, at most 64 shards each.

    >>> default_group_size(3), default_group_size(1000), default_group_size(10**6)
    (1, 63, 64)
    """
    return max(1, min(MAX_GROUP_SIZE, -(-num_shards // 16)))


def _group_dir(store: CommitStore, digest: str, group_size: int) -> str:
    return store.path(SCAN_DIR, digest, f"g{group_size}")


def _scan_group_unit(shards: list[str], run_root: str, digest: str, group_size: int, group: int) -> dict[str, Any]:
    store = CommitStore(run_root)
    first = group * group_size
    names = shards[first : first + group_size]
    tables, meta = [], []
    for i, shard in enumerate(names, start=first):
        try:
            scan = scan_shard(shard)
        except ShardError as exc:
            meta.append({"pos": i, "shard": shard, "error": str(exc)})
            continue
        meta.append({"pos": i, "shard": shard, "error": None, "counts": scan.counts()})
        t = scan.table().replace_schema_metadata(None)
        tables.append(t.append_column("shard_pos", pa.array([i] * t.num_rows, pa.int32())))
    schema = SCAN_SCHEMA.append(pa.field("shard_pos", pa.int32()))
    body = pa.concat_tables(tables) if tables else schema.empty_table()
    body = body.replace_schema_metadata({_GROUP_META: json.dumps(meta)})
    write_atomic(store.fs, f"{_group_dir(store, digest, group_size)}/g{group:06d}.parquet", table_to_parquet_bytes(body))
    return {"shards": len(names), "records": body.num_rows}


def _group_meta(store: CommitStore, path: str) -> list[dict[str, Any]] | None:
    try:
        with store.fs.open_input_file(path) as f:
            return json.loads(pq.ParquetFile(f).schema_arrow.metadata[_GROUP_META])
    except FileNotFoundError:
        return None
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException):
        return None  # unreadable: rescanned, never trusted


def _key_partition(keys: list[str], partitions: int) -> np.ndarray:
    """A stable hash partition of each key (Python's own str hash is salted per process)."""
    return np.fromiter((zlib.crc32(k.encode("utf-8", "surrogatepass")) % partitions for k in keys), np.int64, len(keys))


def _keys_unit(run_root: str, digest: str, group_size: int, num_groups: int, partitions: int, part: int) -> dict[str, Any]:
    """Drops of the keys of one hash partition: a key seen in an earlier shard is dropped."""
    store = CommitStore(run_root)
    seen: set[str] = set()
    drop_pos, drop_member, drop_key = [], [], []
    for g in range(num_groups):
        with store.fs.open_input_file(f"{_group_dir(store, digest, group_size)}/g{g:06d}.parquet") as f:
            t = pq.read_table(f, columns=["key", "shard_pos"])
        keys = t.column("key").to_pylist()
        pos = t.column("shard_pos").to_numpy()
        mine = np.flatnonzero(_key_partition(keys, partitions) == part)
        # Member index of each row inside its shard (rows are in shard then member order).
        starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]]) if len(pos) else np.empty(0, np.int64)
        member = np.arange(len(pos)) - np.repeat(starts, np.diff(np.r_[starts, len(pos)]))
        # Keys are unique inside a shard (the scan dropped repeats), so a key's first shard is
        # where it is first seen; a shard's keys join ``seen`` once the shard is done.
        new: list[str] = []
        current = -1
        for i in mine.tolist():
            if pos[i] != current:
                seen.update(new)
                new, current = [], pos[i]
            k = keys[i]
            if k in seen:
                drop_pos.append(int(pos[i]))
                drop_member.append(int(member[i]))
                drop_key.append(k)
            else:
                new.append(k)
        seen.update(new)
    table = pa.table({"shard_pos": pa.array(drop_pos, pa.int32()), "member": pa.array(drop_member, pa.int64()),
                      "key": pa.array(drop_key, pa.string())})
    table = table.sort_by([("shard_pos", "ascending"), ("member", "ascending")])
    write_atomic(store.fs, f"{_group_dir(store, digest, group_size)}/drops-{partitions}-{part:03d}.parquet",
                 table_to_parquet_bytes(table))
    return {"drops": table.num_rows}


def _read_drops(store: CommitStore, digest: str, group_size: int, partitions: int, columns=None, filters=None) -> pa.Table:
    parts = []
    for h in range(partitions):
        with store.fs.open_input_file(f"{_group_dir(store, digest, group_size)}/drops-{partitions}-{h:03d}.parquet") as f:
            parts.append(pq.read_table(f, columns=columns, filters=filters))
    return pa.concat_tables(parts)


def _rows_unit(run_root: str, plan_dict: dict, shards: list[str], first_id: list[int], digest: str, group_size: int,
               partitions: int, todo: dict[int, list[int]], partition: int) -> dict[str, Any]:
    """Commit the missing index row groups of one partition."""
    store = CommitStore(run_root)
    plan = RowGroupPlan(**plan_dict)
    starts = np.asarray(first_id, dtype=np.int64)  # first record id of each shard; len S + 1
    committed = 0
    for rg in todo[partition]:
        lo, hi = plan.row_group_range(rg)
        # Shards holding records [lo, hi): those whose id range [starts[s], starts[s+1]) meets it.
        s0 = int(np.searchsorted(starts, lo, side="right")) - 1
        s1 = int(np.searchsorted(starts, hi, side="left"))
        pieces = []
        for g in range(s0 // group_size, (s1 - 1) // group_size + 1):
            with store.fs.open_input_file(f"{_group_dir(store, digest, group_size)}/g{g:06d}.parquet") as f:
                t = pq.read_table(f, filters=[("shard_pos", ">=", s0), ("shard_pos", "<", s1)])
            pieces.append(t.replace_schema_metadata(None))
        body = pa.concat_tables(pieces)
        drops = _read_drops(store, digest, group_size, partitions, columns=["shard_pos", "member"],
                            filters=[("shard_pos", ">=", s0), ("shard_pos", "<", s1)])
        pos = body.column("shard_pos").to_numpy()
        seg = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]]) if len(pos) else np.empty(0, np.int64)
        member = np.arange(len(pos)) - np.repeat(seg, np.diff(np.r_[seg, len(pos)]))
        keep = np.ones(len(pos), bool)
        if drops.num_rows:
            dropped = set(zip(drops.column("shard_pos").to_pylist(), drops.column("member").to_pylist()))
            keep = np.fromiter(((p, m) not in dropped for p, m in zip(pos.tolist(), member.tolist())), bool, len(pos))
        body = body.filter(pa.array(keep))
        kept_pos = body.column("shard_pos").to_numpy()
        ids = np.arange(len(kept_pos)) + starts[s0]
        sel = np.flatnonzero((ids >= lo) & (ids < hi))
        body = body.take(pa.array(sel))
        shard_col = pa.array([shards[p] for p in body.column("shard_pos").to_pylist()], pa.string())
        table = (body.drop_columns(["shard_pos"]).add_column(0, "shard", shard_col)
                 .add_column(0, "record_id", pa.array(ids[sel], pa.int64())).select(INDEX.names).cast(INDEX))
        store.commit_table(STAGE, partition, rg, table)
        committed += 1
    return {"committed": committed}


def _build_parallel(
    store: CommitStore, config: IndexConfig, shards: list[str], digest: str, *, overwrite: bool,
    say: Callable[[str], None], backend: str, ray_address: str | None, group_size: int | None,
) -> tuple[RowGroupPlan, dict[str, Any], int, int, StageFingerprint]:
    from winnow.ray.units import run_units

    gs = group_size or default_group_size(len(shards))
    num_groups = -(-len(shards) // gs)
    gdir = _group_dir(store, digest, gs)
    metas: list[list[dict[str, Any]] | None] = [_group_meta(store, f"{gdir}/g{g:06d}.parquet") for g in range(num_groups)]
    todo = [g for g, m in enumerate(metas) if m is None]
    summary = run_units("index scan", functools.partial(_scan_group_unit, shards, store.run_root, digest, gs), todo,
                        skipped=num_groups - len(todo), backend=backend, ray_address=ray_address, log=say)
    if summary.failed:
        g = min(summary.failed)
        raise StorageError(f"index: scanning shard group {g} (shards {g * gs}..{min((g + 1) * gs, len(shards)) - 1}) "
                           f"failed: {summary.failed[g]}. Rerun to retry only the failed groups.")
    scanned = sum(int(r.get("shards", 0)) for r in summary.results)
    for g in todo:
        metas[g] = _group_meta(store, f"{gdir}/g{g:06d}.parquet")

    counts = _empty_counts(len(shards))
    records = np.zeros(len(shards), dtype=np.int64)
    for entry in (e for m in metas for e in (m or [])):
        if entry["error"] is not None:
            if not config.skip_bad_shards:
                raise ShardError(entry["shard"], entry["error"])
            counts["bad_shards"] += 1
            if len(counts["bad_shard_errors"]) < MAX_BAD_SHARD_ERRORS:
                counts["bad_shard_errors"].append({"shard": entry["shard"], "error": entry["error"]})
            say(f"index: skipping bad shard {entry['shard']}: {entry['error']}")
            continue
        c = entry["counts"]
        records[entry["pos"]] = c["records"]
        counts["zero_byte_shards"] += int(c["zero_byte"])
        for name in ("members", "members_without_image", "duplicate_keys", "extra_images", "ignored_members"):
            counts[name] += c[name]

    parts = max(1, min(MAX_KEY_PARTITIONS, num_groups))
    have = {info.base_name for info in store._list(gdir)}
    key_todo = [h for h in range(parts) if f"drops-{parts}-{h:03d}.parquet" not in have]
    keys = run_units("index keys", functools.partial(_keys_unit, store.run_root, digest, gs, num_groups, parts),
                     key_todo, skipped=parts - len(key_todo), backend=backend, ray_address=ray_address, log=say)
    if keys.failed:
        raise StorageError(f"index: the cross-shard key check failed: {keys.failed[min(keys.failed)]}. Rerun to retry.")
    drops = _read_drops(store, digest, gs, parts, columns=["shard_pos", "key"])
    drops = drops.sort_by([("shard_pos", "ascending")]) if drops.num_rows else drops
    dropped_per_shard = np.bincount(drops.column("shard_pos").to_numpy(), minlength=len(shards)) if drops.num_rows else 0
    counts["duplicate_keys_across_shards"] = drops.num_rows
    counts["duplicate_keys"] += drops.num_rows
    if drops.num_rows:
        # Examples in shard then member order, as the serial index gives them.
        first = _read_drops(store, digest, gs, parts).sort_by([("shard_pos", "ascending"), ("member", "ascending")])
        counts["duplicate_key_examples"] = first.column("key").to_pylist()[:20]
    kept = records - dropped_per_shard
    first_id = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
    n = int(first_id[-1])
    counts["records"] = n

    plan = RowGroupPlan(n, config.buffer_size, config.max_partitions)
    fingerprint = _fingerprint(config, digest, n)
    moved = store.ensure_stage(fingerprint, overwrite=overwrite)
    if moved:
        say(f"index: the old index of {store.run_root} was moved aside to {moved}")
    missing = {p: store.missing(STAGE, plan, p) for p in range(plan.num_partitions)}
    missing = {p: rgs for p, rgs in missing.items() if rgs}
    rows = run_units("index rows", functools.partial(_rows_unit, store.run_root, plan.to_dict(), shards,
                                                       first_id.tolist(), digest, gs, parts, missing),
                     sorted(missing), backend=backend, ray_address=ray_address, log=say)
    if rows.failed:
        p = min(rows.failed)
        raise StorageError(f"index: committing the row groups of partition {p} failed: {rows.failed[p]}. Rerun to retry.")
    committed = sum(int(r.get("committed", 0)) for r in rows.results)
    return plan, counts, scanned, committed, fingerprint
