"""The index stage: list the input's shards, scan their tar headers, and commit the run's
global record order as row-group Parquet (``winnow.schemas.INDEX``) through the commit store.

Resumable at two grains: each shard group's scan is committed on its own (a rerun scans only
what is missing) and each index row group is committed on its own (a rerun writes only what is
missing).

Each record gets ``uid`` (:func:`winnow.data.tarscan.image_uid`, from its image bytes) and, when
an earlier indexed record (shard order, then member order) has the same uid, ``exact_duplicate_of``
(that record's id): exact duplicates stay indexed records, marked, and are never decoded nor
embedded. Members the scan skipped (no image, a key repeated inside a shard or across shards) are
committed as rows under ``index/_skipped/`` (:func:`read_skipped`), for the status rows.

One algorithm (below: shard groups, key partitions and row groups as units), run as Ray tasks
(an :class:`~winnow.execution.Execution` with ``backend="ray"``, what the pipeline uses) or as a
loop in this process (``"local"``). The
tests check it row for row against a serial reference that scans every shard in one process
(``benchmarks/_reference/index.py``, not part of the package).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from winnow.checks import DEFAULT_MAX_PARTITIONS, bool_problem, check
from winnow.data.captions import CAPTION_WORDS, caption_field_problem
from winnow.data.image_size import HEADER_SIZE
from winnow.data.shards import list_shard_infos
from winnow.data.tarscan import SCAN_SCHEMA, SKIPPED_SCHEMA, UID_ALGORITHM, scan_shard
from winnow.exceptions import ShardError, StageConfigMismatch, StorageError
from winnow.execution import LOCAL, Execution
from winnow.rowgroups.plan import RowGroupPlan
from winnow.rowgroups.store import (
    CommitStore,
    RunRoot,
    StageFingerprint,
    read_json,
    stage_fingerprint,
    table_to_parquet_bytes,
    write_atomic,
    write_json,
)
from winnow.schemas import INDEX

STAGE = "index"
INDEX_FILE = "_index.json"
#: Shard scans live beside the stage folder, keyed by the listing digest, because the stage
#: folder may only hold output once its fingerprint (which needs N) is written.
SCAN_DIR = "_index_scan"
#: At most this many bad-shard errors are kept in the counts (the count itself is exact).
MAX_BAD_SHARD_ERRORS = 100
#: At most this many example keys of duplicates are kept in the counts.
MAX_EXAMPLES = 20
#: Folder (inside the index stage folder) of the skipped members' rows: ``g<j>.parquet`` holds
#: those of shards ``[j*G, (j+1)*G)``, ``G = default_group_size(number of shards)``.
SKIPPED_DIR = "_skipped"
#: Columns of the skipped members' rows (:func:`read_skipped`).
SKIPPED_ROWS = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("outcome", pa.string()),  # "no_image" | "duplicate_key"
        ("reason", pa.string()),
        ("duplicate_of_key", pa.string()),  # the kept record's key (the same key); null for no_image
    ]
)
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexConfig:
    """What the index stage reads and how it cuts the run into row groups.

    :param input_uri: folder or prefix of WebDataset shards (local path or pyarrow.fs URI).
    :param buffer_size: records per row group (B).
    :param max_partitions: upper bound on partitions (mapped task instances).
    :param skip_bad_shards: skip and count a truncated or unreadable shard instead of failing.
    :param caption_field: the ``.json`` sidecar field that is a record's caption when it has no
        ``.txt`` (:mod:`winnow.data.captions`): the index records its caption's words.
    """

    input_uri: str
    buffer_size: int
    max_partitions: int = DEFAULT_MAX_PARTITIONS
    skip_bad_shards: bool = False
    caption_field: str = "caption"

    def __post_init__(self) -> None:
        RowGroupPlan(0, self.buffer_size, self.max_partitions)  # the plan checks its own knobs
        check(bool_problem("skip_bad_shards", self.skip_bad_shards), caption_field_problem(self.caption_field))


def index_config(run: Any, _name: str = STAGE) -> IndexConfig:
    """The index's config from a run's ``CurationConfig`` (the registry's ``config`` factory)."""
    return IndexConfig(input_uri=run.input_uri, buffer_size=run.buffer_size, max_partitions=run.max_partitions,
                       skip_bad_shards=run.skip_bad_shards, caption_field=run.caption_field)


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
    """The index's fingerprint (it reads no stage): built before its plan is, for a probe with the
    stored N, so it takes N itself."""
    return stage_fingerprint(
        None,
        STAGE,
        {
            "input_uri": config.input_uri,
            "shards_digest": digest,
            "skip_bad_shards": config.skip_bad_shards,
            # The plan's partition layout decides where row groups live on storage.
            "max_partitions": config.max_partitions,
            # What the uid column is (an index without one is refused, not mixed with).
            "uid": UID_ALGORITHM,
            # What the width and height columns are (an index without them is not mixed with).
            "image_size": HEADER_SIZE,
            # What caption_words counts, and in which sidecar field.
            "caption_words": CAPTION_WORDS,
            "caption_field": config.caption_field,
        },
        RowGroupPlan(num_records, config.buffer_size, config.max_partitions),
    )


def build_index(
    run_root: RunRoot | str,
    config: IndexConfig,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    execution: Execution = LOCAL,
    group_size: int | None = None,
) -> IndexResult:
    """Index ``config.input_uri`` into ``<run_root>/index``; resume whatever is already there.
    The input and the run root are both reached with the run root's storage settings (a
    :class:`~winnow.rowgroups.fs.RunRoot`; a plain string is a local path).

    ``execution``: with ``backend="ray"`` shard groups (of ``group_size`` shards, default
    :func:`default_group_size`) are scanned in Ray tasks and row groups committed from Ray tasks,
    this process only plans and sums counts; the local backend (the default) is the same
    algorithm as a loop in this process, without Ray. Both give the same rows and counts (and the same as the serial
    reference the tests check them against, ``benchmarks/_reference/index.py``).

    Raises :class:`~winnow.exceptions.InputError` when there are no shards,
    :class:`~winnow.exceptions.ShardError` for a bad shard unless ``skip_bad_shards``, and
    :class:`~winnow.exceptions.StageConfigMismatch` when the run root was indexed with
    another input, listing, buffer size or partition bound (``overwrite`` moves it aside).
    """
    say = log or _log.info
    store, shards, digest = _start(run_root, config, overwrite=overwrite)
    plan, counts, scanned, committed, fingerprint = _build_parallel(
        store, config, shards, digest, overwrite=overwrite, say=say, execution=execution, group_size=group_size)
    return _finish(store, config, shards, plan, counts, fingerprint, scanned=scanned, committed=committed, say=say)


def _start(run_root: RunRoot | str, config: IndexConfig, *, overwrite: bool) -> tuple[CommitStore, list[str], str]:
    """List the shards and fail before any scan when the stored fingerprint already disagrees on
    anything but N. Returns the store, the shards and their listing digest."""
    store = CommitStore(run_root)
    listing = list_shard_infos(config.input_uri, store.run_root.storage)
    shards = [name for name, _ in listing]
    sizes = [size for _, size in listing]
    digest = _listing_digest(shards, sizes)
    stored = store.read_fingerprint(STAGE)
    if stored is not None and not overwrite:
        probe = _fingerprint(config, digest, int(stored.get("num_records", 0)))
        changes = probe.changes_from(stored)
        if changes:
            raise StageConfigMismatch(STAGE, store.stage_dir(STAGE), changes)
    return store, shards, digest


def _finish(
    store: CommitStore, config: IndexConfig, shards: list[str], plan: RowGroupPlan, counts: dict[str, Any],
    fingerprint: StageFingerprint, *, scanned: int, committed: int, say: Callable[[str], None],
) -> IndexResult:
    """Record ``_index.json`` (only when it changes) and say what the index holds."""
    n = plan.num_records
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
        f"duplicate keys, {counts['bad_shards']} bad shards, {counts['zero_byte_shards']} zero-byte shards; "
        f"{counts['exact_duplicates']} exact duplicates (indexed, marked, never embedded)"
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


def load_index(run_root: RunRoot | str, *, fingerprint: bool = True) -> IndexResult:
    """The index a previous :func:`build_index` committed under ``run_root``; with
    ``fingerprint=False`` without its stored fingerprint (one read less: what the plan needs)."""
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
        fingerprint=(store.read_fingerprint(STAGE) or {}) if fingerprint else {},
    )


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
        "exact_duplicates": 0,
    }


def _drop_reason(kept_shard: str) -> str:
    return f"key already indexed from shard {kept_shard}; the record of the first shard with this key is kept"


# ---- skipped members: rows for the status stage ----------------------------------------------


def _skipped_dir(store: CommitStore) -> str:
    return f"{store.stage_dir(STAGE)}/{SKIPPED_DIR}"


def _skipped_files(num_shards: int) -> tuple[int, int]:
    """(shards per skipped-rows file, number of files): one file per default scan group."""
    per = default_group_size(num_shards)
    return per, -(-num_shards // per)


def _missing_skipped(store: CommitStore, num_shards: int) -> list[int]:
    _, files = _skipped_files(num_shards)
    have = {info.base_name for info in store._list(_skipped_dir(store))}
    return [j for j in range(files) if f"g{j:06d}.parquet" not in have]


def _skipped_table(shard_names: list[str], rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows)) if rows else [(), (), (), ()]
    return pa.Table.from_arrays([pa.array(shard_names, pa.string())] + [pa.array(list(c), pa.string()) for c in cols],
                                schema=SKIPPED_ROWS)


def read_skipped(run_root: RunRoot | str) -> Iterator[pa.Table]:
    """The members the index skipped, as tables of :data:`SKIPPED_ROWS` (``shard``, ``key``,
    ``outcome`` ``no_image`` | ``duplicate_key``, ``reason``, ``duplicate_of_key``), one per
    file of ``index/_skipped/`` (shard order; in a shard its scan's skips in member order, then
    the records dropped because an earlier shard has their key). Each member once; memory is one
    file at a time. Raises :class:`StorageError` when the index or one of the files is missing."""
    result = load_index(run_root)
    store = CommitStore(run_root)
    missing = _missing_skipped(store, len(result.shards))
    if missing:
        raise StorageError(
            f"run root {run_root}: the index's skipped-member rows are incomplete "
            f"({_skipped_dir(store)}/g{missing[0]:06d}.parquet is missing): rerun the index stage "
            "(build_index / the `index` task), which writes only what is missing."
        )
    _, files = _skipped_files(len(result.shards))
    for j in range(files):
        with store.fs.open_input_file(f"{_skipped_dir(store)}/g{j:06d}.parquet") as f:
            yield pq.read_table(f).cast(SKIPPED_ROWS)


# ---- the parallel index: shard groups, key partitions and row groups as Ray tasks -----------
#
# 1. scan: shards are cut into groups of ``group_size``; one Ray task per group scans its
#    shards (tar headers, image bytes hashed into uids) and commits
#    ``<SCAN_DIR>/<digest>/v2-g<size>/g<group>.parquet`` (the records with their shard position;
#    per-shard counts and bad-shard errors in the footer), after its sibling
#    ``g<group>.skipped.parquet`` (the members the scan skipped).
# 2. keys: a key kept in an earlier shard is dropped from later ones. One Ray task per key
#    partition (a stable hash of the key) reads the key columns of every group and commits the
#    drops of its keys (``drops-<H>-<h>.parquet``): memory is 1/H of the keys.
# 3. uids: among the records that survive the keys, a uid seen in an earlier record marks an
#    exact duplicate. One Ray task per uid partition (the uid's leading hex digits: it is a hash
#    already) reads the uid columns of every group and the drops of its uids, and commits its
#    twins (``exact-<H>-<h>.parquet``: shard position and member of the duplicate and of the
#    first record): memory is 1/H of the uids. A dropped record is nobody's twin.
# 4. records ids: per-shard counts minus drops, prefix sums -> each shard's first record id;
#    so the order is today's (shard order, then member order).
# 5. row groups: one Ray task per partition commits its missing index row groups from the
#    groups that overlap its record range (a twin's id from its shard's first id and drops).
# 6. skipped: one Ray task per missing ``index/_skipped/g<j>.parquet`` writes the skipped rows
#    of its shards from the scans' siblings and the drops.
# The caller's process (the Airflow index task) only lists, plans, sums counts and checks.

#: Most shards per scan task (fewer when there are few shards, so every CPU gets some).
MAX_GROUP_SIZE = 64
#: Most key partitions (Ray tasks of the cross-shard key check; as many uid partitions).
MAX_KEY_PARTITIONS = 64
_GROUP_META = b"winnow.scan_group"
#: Layout version of the parallel scan cache (v2: uid column, skipped siblings, uid drops; v3:
#: width, height and caption_words).
_GROUP_LAYOUT = "v3"


def default_group_size(num_shards: int) -> int:
    """Shards per scan task: about 16 tasks for a small input, at most 64 shards each.

    >>> default_group_size(3), default_group_size(1000), default_group_size(10**6)
    (1, 63, 64)
    """
    return max(1, min(MAX_GROUP_SIZE, -(-num_shards // 16)))


def _group_dir(store: CommitStore, digest: str, group_size: int) -> str:
    return store.path(SCAN_DIR, digest, f"{_GROUP_LAYOUT}-g{group_size}")


_GROUP_SKIPPED = pa.schema([pa.field("shard_pos", pa.int32()), *SKIPPED_SCHEMA])


def _scan_group_unit(shards: list[str], run_root: RunRoot | str, digest: str, group_size: int, caption_field: str,
                     group: int) -> dict[str, Any]:
    store = CommitStore(run_root)
    first = group * group_size
    names = shards[first : first + group_size]
    tables, skipped, meta = [], [], []
    for i, shard in enumerate(names, start=first):
        try:
            scan = scan_shard(shard, caption_field=caption_field, storage=store.run_root.storage)
        except ShardError as exc:
            meta.append({"pos": i, "shard": shard, "error": str(exc)})
            continue
        meta.append({"pos": i, "shard": shard, "error": None, "counts": scan.counts()})
        t = scan.table().replace_schema_metadata(None)
        tables.append(t.append_column("shard_pos", pa.array([i] * t.num_rows, pa.int32())))
        sk = scan.skipped_table()
        skipped.append(sk.add_column(0, "shard_pos", pa.array([i] * sk.num_rows, pa.int32())))
    schema = SCAN_SCHEMA.append(pa.field("shard_pos", pa.int32()))
    body = pa.concat_tables(tables) if tables else schema.empty_table()
    body = body.replace_schema_metadata({_GROUP_META: json.dumps(meta)})
    gdir = _group_dir(store, digest, group_size)
    # The sibling first: the group file is the commit marker of both.
    sk_body = pa.concat_tables(skipped) if skipped else _GROUP_SKIPPED.empty_table()
    write_atomic(store.fs, f"{gdir}/g{group:06d}.skipped.parquet", table_to_parquet_bytes(sk_body))
    write_atomic(store.fs, f"{gdir}/g{group:06d}.parquet", table_to_parquet_bytes(body))
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


def _uid_partition(uids: list[str], partitions: int) -> np.ndarray:
    """A stable partition of each uid: its leading 32 bits (a uid is a hash already)."""
    return np.fromiter((int(u[:8], 16) % partitions for u in uids), np.int64, len(uids))


def _members(pos: np.ndarray) -> np.ndarray:
    """Member index of each row inside its shard (rows are in shard then member order)."""
    if not len(pos):
        return np.empty(0, np.int64)
    starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
    return np.arange(len(pos)) - np.repeat(starts, np.diff(np.r_[starts, len(pos)]))


def _read_group(store: CommitStore, digest: str, group_size: int, g: int, columns=None, filters=None) -> pa.Table:
    with store.fs.open_input_file(f"{_group_dir(store, digest, group_size)}/g{g:06d}.parquet") as f:
        return pq.read_table(f, columns=columns, filters=filters).replace_schema_metadata(None)


def _keys_unit(run_root: RunRoot | str, digest: str, group_size: int, num_groups: int, partitions: int, part: int) -> dict[str, Any]:
    """Drops of the keys of one hash partition: a key seen in an earlier shard is dropped."""
    store = CommitStore(run_root)
    seen: dict[str, int] = {}  # key -> position of the shard that kept it
    drop_pos, drop_member, drop_key, drop_kept, drop_uid = [], [], [], [], []
    for g in range(num_groups):
        t = _read_group(store, digest, group_size, g, columns=["key", "shard_pos", "uid"])
        keys = t.column("key").to_pylist()
        pos = t.column("shard_pos").to_numpy()
        mine = np.flatnonzero(_key_partition(keys, partitions) == part)
        member = _members(pos)
        uids = t.column("uid")
        # Keys are unique inside a shard (the scan dropped repeats), so a key's first shard is
        # where it is first seen; a shard's keys join ``seen`` once the shard is done.
        new: list[str] = []
        current = -1
        for i in mine.tolist():
            if pos[i] != current:
                seen.update(dict.fromkeys(new, current))
                new, current = [], int(pos[i])
            k = keys[i]
            if k in seen:
                drop_pos.append(current)
                drop_member.append(int(member[i]))
                drop_key.append(k)
                drop_kept.append(seen[k])
                drop_uid.append(uids[i].as_py())
            else:
                new.append(k)
        seen.update(dict.fromkeys(new, current))
    table = pa.table({"shard_pos": pa.array(drop_pos, pa.int32()), "member": pa.array(drop_member, pa.int64()),
                      "key": pa.array(drop_key, pa.string()), "kept_pos": pa.array(drop_kept, pa.int32()),
                      "uid_part": pa.array(_uid_partition(drop_uid, partitions), pa.int32())})
    table = table.sort_by([("shard_pos", "ascending"), ("member", "ascending")])
    write_atomic(store.fs, f"{_group_dir(store, digest, group_size)}/drops-{partitions}-{part:03d}.parquet",
                 table_to_parquet_bytes(table))
    return {"drops": table.num_rows}


def _read_parts(store: CommitStore, digest: str, group_size: int, partitions: int, kind: str, columns=None,
                filters=None) -> pa.Table:
    """The ``<kind>-<H>-<h>.parquet`` files of every partition h (``drops`` or ``exact``)."""
    parts = []
    for h in range(partitions):
        with store.fs.open_input_file(f"{_group_dir(store, digest, group_size)}/{kind}-{partitions}-{h:03d}.parquet") as f:
            parts.append(pq.read_table(f, columns=columns, filters=filters))
    return pa.concat_tables(parts)


def _read_drops(store: CommitStore, digest: str, group_size: int, partitions: int, columns=None, filters=None) -> pa.Table:
    return _read_parts(store, digest, group_size, partitions, "drops", columns, filters)


def _uids_unit(run_root: RunRoot | str, digest: str, group_size: int, num_groups: int, partitions: int, part: int) -> dict[str, Any]:
    """Twins of the uids of one partition: a record (not dropped by its key) whose uid an
    earlier such record has is an exact duplicate of the first one."""
    store = CommitStore(run_root)
    drops = _read_drops(store, digest, group_size, partitions, columns=["shard_pos", "member"],
                        filters=[("uid_part", "=", part)])
    dropped = set(zip(drops.column("shard_pos").to_pylist(), drops.column("member").to_pylist()))
    first: dict[str, tuple[int, int]] = {}  # uid -> (shard position, member) of its first record
    out: dict[str, list] = {"shard_pos": [], "member": [], "key": [], "of_pos": [], "of_member": []}
    for g in range(num_groups):
        t = _read_group(store, digest, group_size, g, columns=["uid", "shard_pos", "key"])
        pos = t.column("shard_pos").to_numpy()
        member = _members(pos)
        mine = np.flatnonzero(_uid_partition(t.column("uid").to_pylist(), partitions) == part)
        sub = t.take(pa.array(mine, pa.int64()))
        for i, uid, key in zip(mine.tolist(), sub.column("uid").to_pylist(), sub.column("key").to_pylist()):
            here = (int(pos[i]), int(member[i]))
            if here in dropped:
                continue
            was = first.setdefault(uid, here)
            if was != here:
                for name, value in zip(out, (*here, key, *was)):
                    out[name].append(value)
    table = pa.table({"shard_pos": pa.array(out["shard_pos"], pa.int32()), "member": pa.array(out["member"], pa.int64()),
                      "key": pa.array(out["key"], pa.string()), "of_pos": pa.array(out["of_pos"], pa.int32()),
                      "of_member": pa.array(out["of_member"], pa.int64())})
    table = table.sort_by([("shard_pos", "ascending"), ("member", "ascending")])
    write_atomic(store.fs, f"{_group_dir(store, digest, group_size)}/exact-{partitions}-{part:03d}.parquet",
                 table_to_parquet_bytes(table))
    return {"exact": table.num_rows}


def _record_ids(store: CommitStore, digest: str, group_size: int, partitions: int, starts: np.ndarray,
                pos: list[int], member: list[int]) -> np.ndarray:
    """Record ids of the (kept) records at (shard position, member): the shard's first id plus
    the member minus the drops before it in that shard."""
    if not pos:
        return np.empty(0, np.int64)
    drops = _read_drops(store, digest, group_size, partitions, columns=["shard_pos", "member"],
                        filters=[("shard_pos", "in", sorted(set(pos)))])
    by_shard: dict[int, np.ndarray] = {}
    if drops.num_rows:
        drops = drops.sort_by([("shard_pos", "ascending"), ("member", "ascending")])
        dp, dm = drops.column("shard_pos").to_numpy(), drops.column("member").to_numpy()
        for p in np.unique(dp).tolist():
            by_shard[p] = dm[dp == p]
    empty = np.empty(0, np.int64)
    return np.fromiter((starts[p] + m - np.searchsorted(by_shard.get(p, empty), m) for p, m in zip(pos, member)),
                       np.int64, len(pos))


def _rows_unit(run_root: RunRoot | str, plan_dict: dict, shards: list[str], first_id: list[int], digest: str, group_size: int,
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
        in_range = [("shard_pos", ">=", s0), ("shard_pos", "<", s1)]
        pieces = [_read_group(store, digest, group_size, g, filters=in_range)
                  for g in range(s0 // group_size, (s1 - 1) // group_size + 1)]
        body = pa.concat_tables(pieces)
        drops = _read_drops(store, digest, group_size, partitions, columns=["shard_pos", "member"], filters=in_range)
        pos = body.column("shard_pos").to_numpy()
        member = _members(pos)
        keep = np.ones(len(pos), bool)
        if drops.num_rows:
            dropped = set(zip(drops.column("shard_pos").to_pylist(), drops.column("member").to_pylist()))
            keep = np.fromiter(((p, m) not in dropped for p, m in zip(pos.tolist(), member.tolist())), bool, len(pos))
        body = body.filter(pa.array(keep))
        member = member[keep]
        kept_pos = body.column("shard_pos").to_numpy()
        ids = np.arange(len(kept_pos)) + starts[s0]
        sel = np.flatnonzero((ids >= lo) & (ids < hi))
        body = body.take(pa.array(sel))
        # Exact duplicates among these records: their first record's id.
        exact = _read_parts(store, digest, group_size, partitions, "exact",
                            columns=["shard_pos", "member", "of_pos", "of_member"], filters=in_range)
        twin: list[int | None] = [None] * len(sel)
        if exact.num_rows:
            where = {(p, m): i for i, (p, m) in enumerate(zip(kept_pos[sel].tolist(), member[sel].tolist()))}
            hits = [(where[(p, m)], op, om) for p, m, op, om in zip(*(exact.column(c).to_pylist() for c in
                    ("shard_pos", "member", "of_pos", "of_member"))) if (p, m) in where]
            if hits:
                of = _record_ids(store, digest, group_size, partitions, starts, [h[1] for h in hits], [h[2] for h in hits])
                for (row, _, _), rid in zip(hits, of.tolist()):
                    twin[row] = rid
        shard_col = pa.array([shards[p] for p in body.column("shard_pos").to_pylist()], pa.string())
        table = (body.drop_columns(["shard_pos"]).add_column(0, "shard", shard_col)
                 .add_column(0, "record_id", pa.array(ids[sel], pa.int64()))
                 .append_column("exact_duplicate_of", pa.array(twin, pa.int64())).select(INDEX.names).cast(INDEX))
        store.commit_table(STAGE, partition, rg, table)
        committed += 1
    return {"committed": committed}


def _skipped_unit(run_root: RunRoot | str, shards: list[str], digest: str, group_size: int, partitions: int, j: int) -> dict[str, Any]:
    """Commit ``index/_skipped/g<j>.parquet``: the skipped rows of its shards, each shard's scan
    skips (member order) then its records dropped by the cross-shard key rule (member order)."""
    store = CommitStore(run_root)
    per, _ = _skipped_files(len(shards))
    s0, s1 = j * per, min((j + 1) * per, len(shards))
    in_range = [("shard_pos", ">=", s0), ("shard_pos", "<", s1)]
    gdir = _group_dir(store, digest, group_size)
    pieces = []
    for g in range(s0 // group_size, (s1 - 1) // group_size + 1):
        with store.fs.open_input_file(f"{gdir}/g{g:06d}.skipped.parquet") as f:
            pieces.append(pq.read_table(f, filters=in_range))
    scan_rows = pa.concat_tables(pieces) if pieces else _GROUP_SKIPPED.empty_table()
    drops = _read_drops(store, digest, group_size, partitions, columns=["shard_pos", "member", "key", "kept_pos"],
                        filters=in_range).sort_by([("shard_pos", "ascending"), ("member", "ascending")])
    sk_pos = scan_rows.column("shard_pos").to_pylist()
    sk_key = scan_rows.column("key").to_pylist()
    sk_out = scan_rows.column("outcome").to_pylist()
    sk_why = scan_rows.column("reason").to_pylist()
    rows = [(p, 0, i, k, o, r, k if o == "duplicate_key" else None)
            for i, (p, k, o, r) in enumerate(zip(sk_pos, sk_key, sk_out, sk_why))]
    rows += [(p, 1, i, k, "duplicate_key", _drop_reason(shards[kp]), k) for i, (p, k, kp) in enumerate(zip(
        drops.column("shard_pos").to_pylist(), drops.column("key").to_pylist(), drops.column("kept_pos").to_pylist()))]
    rows.sort(key=lambda r: r[:3])
    table = _skipped_table([shards[r[0]] for r in rows], [r[3:] for r in rows])
    write_atomic(store.fs, f"{_skipped_dir(store)}/g{j:06d}.parquet", table_to_parquet_bytes(table))
    return {"rows": table.num_rows}


def _first_rows(store: CommitStore, digest: str, group_size: int, partitions: int, kind: str, n: int) -> tuple[int, list[str]]:
    """(rows of all ``kind`` files, keys of the first ``n`` in shard then member order), reading
    at most one batch of each file: the driver never holds them all."""
    total, heads = 0, []
    for h in range(partitions):
        with store.fs.open_input_file(f"{_group_dir(store, digest, group_size)}/{kind}-{partitions}-{h:03d}.parquet") as f:
            pf = pq.ParquetFile(f)
            total += pf.metadata.num_rows
            if pf.metadata.num_rows:
                batch = next(pf.iter_batches(batch_size=n, columns=["shard_pos", "member", "key"]))
                heads.append(pa.Table.from_batches([batch]))
    if not heads:
        return total, []
    first = pa.concat_tables(heads).sort_by([("shard_pos", "ascending"), ("member", "ascending")])
    return total, first.column("key").to_pylist()[:n]


def _build_parallel(
    store: CommitStore, config: IndexConfig, shards: list[str], digest: str, *, overwrite: bool,
    say: Callable[[str], None], execution: Execution, group_size: int | None,
) -> tuple[RowGroupPlan, dict[str, Any], int, int, StageFingerprint]:
    from winnow.ray.units import run_units

    # The scan cache holds what the scan read with this caption field (the caption words).
    scan_key = f"{digest}-{hashlib.sha256(config.caption_field.encode()).hexdigest()[:8]}"

    gs = group_size or default_group_size(len(shards))
    num_groups = -(-len(shards) // gs)
    gdir = _group_dir(store, scan_key, gs)
    metas: list[list[dict[str, Any]] | None] = [_group_meta(store, f"{gdir}/g{g:06d}.parquet") for g in range(num_groups)]
    todo = [g for g, m in enumerate(metas) if m is None]
    scan = functools.partial(_scan_group_unit, shards, store.run_root, scan_key, gs, config.caption_field)
    summary = run_units("index scan", scan, todo,
                        skipped=num_groups - len(todo), execution=execution, log=say)
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
    keys = run_units("index keys", functools.partial(_keys_unit, store.run_root, scan_key, gs, num_groups, parts),
                     key_todo, skipped=parts - len(key_todo), execution=execution, log=say)
    if keys.failed:
        raise StorageError(f"index: the cross-shard key check failed: {keys.failed[min(keys.failed)]}. Rerun to retry.")
    # After the drops (a record dropped by its key is nobody's twin). Every file here is a
    # function of the listing and the group size, so a redone one equals the lost one.
    uid_todo = [h for h in range(parts) if f"exact-{parts}-{h:03d}.parquet" not in have]
    uids = run_units("index uids", functools.partial(_uids_unit, store.run_root, scan_key, gs, num_groups, parts),
                     uid_todo, skipped=parts - len(uid_todo), execution=execution, log=say)
    if uids.failed:
        raise StorageError(f"index: the exact-duplicate check failed: {uids.failed[min(uids.failed)]}. Rerun to retry.")
    drops = _read_drops(store, scan_key, gs, parts, columns=["shard_pos"])
    dropped_per_shard = np.bincount(drops.column("shard_pos").to_numpy(), minlength=len(shards)) if drops.num_rows else 0
    counts["duplicate_keys_across_shards"] = drops.num_rows
    counts["duplicate_keys"] += drops.num_rows
    del drops
    if counts["duplicate_keys_across_shards"]:
        # Examples in shard then member order, as the serial index gives them.
        counts["duplicate_key_examples"] = _first_rows(store, scan_key, gs, parts, "drops", MAX_EXAMPLES)[1]
    kept = records - dropped_per_shard
    first_id = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
    n = int(first_id[-1])
    counts["records"] = n
    counts["exact_duplicates"], exact_examples = _first_rows(store, scan_key, gs, parts, "exact", MAX_EXAMPLES)
    if exact_examples:
        counts["exact_duplicate_examples"] = exact_examples

    plan = RowGroupPlan(n, config.buffer_size, config.max_partitions)
    fingerprint = _fingerprint(config, digest, n)
    moved = store.ensure_stage(fingerprint, overwrite=overwrite)
    if moved:
        say(f"index: the old index of {store.run_root} was moved aside to {moved}")
    missing = {p: store.missing(STAGE, plan, p) for p in range(plan.num_partitions)}
    missing = {p: rgs for p, rgs in missing.items() if rgs}
    rows = run_units("index rows", functools.partial(_rows_unit, store.run_root, plan.to_dict(), shards,
                                                       first_id.tolist(), scan_key, gs, parts, missing),
                     sorted(missing), execution=execution, log=say)
    if rows.failed:
        p = min(rows.failed)
        raise StorageError(f"index: committing the row groups of partition {p} failed: {rows.failed[p]}. Rerun to retry.")
    committed = sum(int(r.get("committed", 0)) for r in rows.results)
    skipped_todo = _missing_skipped(store, len(shards))
    sk = run_units("index skipped", functools.partial(_skipped_unit, store.run_root, shards, scan_key, gs, parts),
                   skipped_todo, skipped=_skipped_files(len(shards))[1] - len(skipped_todo), execution=execution, log=say)
    if sk.failed:
        j = min(sk.failed)
        raise StorageError(f"index: committing the skipped-member rows file {j} failed: {sk.failed[j]}. Rerun to retry.")
    return plan, counts, scanned, committed, fingerprint
