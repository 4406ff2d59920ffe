"""The index stage: list the input's shards, scan their tar headers, and commit the run's
global record order as row-group Parquet (``winnow.schemas.INDEX``) through the commit store.

Resumable at two grains: each shard's scan is committed on its own (a rerun scans only what is
missing) and each index row group is committed on its own (a rerun writes only what is missing).
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from winnow.data.errors import ShardError
from winnow.data.shards import list_shard_infos
from winnow.data.tarscan import SCAN_SCHEMA, ShardScan, scan_shard
from winnow.rowgroups.errors import StageConfigMismatch, StorageError
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
) -> IndexResult:
    """Index ``config.input_uri`` into ``<run_root>/index``; resume whatever is already there.

    Raises :class:`~winnow.data.errors.InputError` when there are no shards,
    :class:`~winnow.data.errors.ShardError` for a bad shard unless ``skip_bad_shards``, and
    :class:`~winnow.rowgroups.errors.StageConfigMismatch` when the run root was indexed with
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
    payload = {
        "num_records": n,
        "buffer_size": config.buffer_size,
        "max_partitions": config.max_partitions,
        "input_uri": config.input_uri,
        "shards": shards,
        "counts": counts,
        "fingerprint_digest": fingerprint.digest,
    }
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
    counts: dict[str, Any] = {
        "shards": len(shards),
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
