"""The serial index reference: every shard scanned in this process, one after another, the
records assembled in one table. :func:`winnow.data.index.build_index` (the parallel algorithm, as
Ray tasks or a loop in one process) is tested row for row, count for count and skipped row for
skipped row against it.

It writes what ``build_index`` writes (the index row groups, ``index/_skipped/``, ``_stage.json``
and ``_index.json``, through the package's own helpers), so a run root it built is an ordinary
one; its scan cache (``<SCAN_DIR>/<listing digest>-serial-<caption field digest>/s<shard>.parquet``,
one file per shard) is its own. Resumable: a rerun scans only the shards whose scan is missing and
commits only missing row groups. A cached scan of another layout than :data:`SCAN_SCHEMA` (one from
before a column was added: the image size, the caption words) is rescanned, never trusted.

Each row comes from :func:`winnow.data.tarscan.scan_shard` (the uid, the image size read from the
header, the caption words from the sidecars): what the reference checks is the assembly (shard
order, cross-shard key drops, record ids, exact duplicates, skipped rows), not the member scan.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from winnow.data.index import (
    MAX_BAD_SHARD_ERRORS,
    MAX_EXAMPLES,
    SCAN_DIR,
    STAGE,
    IndexConfig,
    IndexResult,
    _drop_reason,
    _empty_counts,
    _fingerprint,
    _finish,
    _log,
    _missing_skipped,
    _skipped_dir,
    _skipped_files,
    _skipped_table,
    _start,
)
from winnow.data.tarscan import SCAN_SCHEMA, ShardScan, scan_shard
from winnow.exceptions import ShardError
from winnow.rowgroups.plan import RowGroupPlan
from winnow.rowgroups.store import CommitStore, RunRoot, read_json, table_to_parquet_bytes, write_atomic, write_json
from winnow.schemas import INDEX


def build_index_serial(
    run_root: RunRoot | str,
    config: IndexConfig,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> IndexResult:
    """What :func:`winnow.data.index.build_index` builds (same rows, counts, skipped rows and
    fingerprint), scanning every shard in this process."""
    say = log or _log.info
    store, shards, digest = _start(run_root, config, overwrite=overwrite)
    scans, counts, scanned = _scan_all(store, shards, digest, config.skip_bad_shards, say, config.caption_field)
    table, skipped = _assemble(scans, counts)
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
    _write_skipped_serial(store, shards, skipped)
    return _finish(store, config, shards, plan, counts, fingerprint, scanned=scanned, committed=committed, say=say)


def _scan_all(
    store: CommitStore, shards: list[str], digest: str, skip_bad: bool, say: Callable[[str], None],
    caption_field: str = "caption",
) -> tuple[list[ShardScan], dict[str, Any], int]:
    counts = _empty_counts(len(shards))
    scans: list[ShardScan] = []
    scanned = 0
    started = last = time.monotonic()
    # The cached scans hold the caption words counted in this caption field.
    cache = f"{digest}-serial-{hashlib.sha256(caption_field.encode()).hexdigest()[:8]}"
    for i, shard in enumerate(shards):
        path = store.path(SCAN_DIR, cache, f"s{i:06d}.parquet")
        bad_path = store.path(SCAN_DIR, cache, f"s{i:06d}.bad.json")
        scan = _read_scan(store, path)
        if scan is None or scan.shard != shard:
            # A shard found bad before is not rescanned: the digest pins its name and size.
            bad = read_json(store.fs, bad_path)
            error = bad["error"] if bad and bad.get("shard") == shard else None
            if error is None:
                try:
                    scan = scan_shard(shard, caption_field=caption_field, storage=store.run_root.storage)
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
            return _scan_from_table(pq.read_table(io.BytesIO(f.read())))
    except FileNotFoundError:
        return None
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None  # an unreadable cached scan is rescanned, never trusted


def _scan_from_table(table: pa.Table) -> ShardScan:
    """The :class:`ShardScan` that ``scan.table()`` wrote (records and counts), for the scan cache."""
    if not table.schema.remove_metadata().equals(SCAN_SCHEMA.remove_metadata()):
        raise ValueError("a cached scan of another layout")  # rescanned by the caller
    meta = json.loads(table.schema.metadata[b"winnow.scan"])
    scan = ShardScan(**{k: meta[k] for k in ("shard", "size", "members", "members_without_image", "duplicate_keys",
                                             "extra_images", "ignored_members", "zero_byte")},
                     examples=meta.get("examples", {}), skipped=[tuple(row) for row in meta["skipped"]])
    cols = table.to_pydict()
    scan.keys = cols.pop("key")
    for name, values in cols.items():  # image_ext, image_offset ... uid: the ShardScan field of that name
        setattr(scan, name, values)
    return scan


def _assemble(scans: list[ShardScan], counts: dict[str, Any]) -> tuple[pa.Table, dict[str, list[tuple]]]:
    """Concatenate shard scans in shard order, drop keys already seen in an earlier shard, number
    the records (record_id is the global position) and mark exact duplicates (a uid seen in an
    earlier record). Also: the skipped rows of each shard ``(key, outcome, reason,
    duplicate_of_key)``, the scan's own first, then the cross-shard key drops."""
    parts = []
    seen: dict[str, str] = {}  # key -> the shard that kept it
    examples: list[str] = []
    skipped: dict[str, list[tuple]] = {}
    for scan in scans:
        rows = skipped.setdefault(scan.shard, [])
        rows.extend((k, outcome, reason, k if outcome == "duplicate_key" else None)
                    for k, outcome, reason in scan.skipped)
        if not scan.keys:
            continue
        t = scan.table()
        keys = scan.keys
        keep = [k not in seen for k in keys]
        dropped = len(keys) - sum(keep)
        if dropped:
            counts["duplicate_keys_across_shards"] += dropped
            examples.extend(k for k, ok in zip(keys, keep) if not ok)
            rows.extend((k, "duplicate_key", _drop_reason(seen[k]), k) for k, ok in zip(keys, keep) if not ok)
            t = t.filter(pa.array(keep))
        for k in keys:
            seen.setdefault(k, scan.shard)
        t = t.add_column(0, "shard", pa.array([scan.shard] * t.num_rows, pa.string()))
        parts.append(t.replace_schema_metadata(None))
    counts["duplicate_keys"] += counts["duplicate_keys_across_shards"]
    if examples:
        counts["duplicate_key_examples"] = examples[:MAX_EXAMPLES]
    if parts:
        body = pa.concat_tables(parts)
    else:
        body = SCAN_SCHEMA.empty_table().add_column(0, "shard", pa.array([], pa.string()))
    first: dict[str, int] = {}
    twin: list[int | None] = []
    for i, uid in enumerate(body.column("uid").to_pylist()):
        j = first.setdefault(uid, i)
        twin.append(None if j == i else j)
    ids = pa.array(range(body.num_rows), pa.int64())
    body = body.append_column("exact_duplicate_of", pa.array(twin, pa.int64()))
    table = body.add_column(0, "record_id", ids).select(INDEX.names).cast(INDEX)
    counts["records"] = table.num_rows
    exact = [i for i, j in enumerate(twin) if j is not None]
    counts["exact_duplicates"] = len(exact)
    if exact:
        counts["exact_duplicate_examples"] = table.column("key").take(pa.array(exact[:MAX_EXAMPLES])).to_pylist()
    return table, skipped


def _write_skipped_serial(store: CommitStore, shards: list[str], skipped: dict[str, list[tuple]]) -> int:
    """Commit the skipped-rows files still missing (a rerun writes nothing)."""
    per, _ = _skipped_files(len(shards))
    written = 0
    for j in _missing_skipped(store, len(shards)):
        names, rows = [], []
        for shard in shards[j * per : (j + 1) * per]:
            mine = skipped.get(shard, [])
            names += [shard] * len(mine)
            rows += mine
        write_atomic(store.fs, f"{_skipped_dir(store)}/g{j:06d}.parquet",
                     table_to_parquet_bytes(_skipped_table(names, rows)))
        written += 1
    return written


