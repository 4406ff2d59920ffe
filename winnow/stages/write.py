"""Write stage: one WebDataset tar per row group holding the kept records' original bytes (image,
``.txt``, ``.json``, copied, never re-encoded), plus the curated Parquet beside it. Which records
are kept is the ``status`` stage's outcome (:mod:`winnow.stages.status`), read, never re-derived.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from winnow.data.reader import read_members
from winnow.exceptions import WriteError
from winnow.rowgroups import CommitStore
from winnow.rowgroups.task import RowGroupTask
from winnow.schemas import VALUE_FIELDS, write_schema

STAGE = "write"
#: The filter columns (winnow.filters) the curated Parquet and the gallery carry.
VALUE_NAMES = tuple(name for name, _ in VALUE_FIELDS)
#: Bumped when the tar layout changes, so old output is not mixed with new (fingerprint).
TAR_FORMAT = "webdataset-v1"
#: Fixed member mtime (2000-01-01T00:00:00Z): the tar's bytes depend on its records only.
TAR_MTIME = 946684800


@dataclass(frozen=True, kw_only=True)
class WriteConfig:
    """:param mtime: modification time stamped on every tar member (bytes stay reproducible).
    :param thumbnail_px: gallery thumbnails fit this many pixels on their longer side.
    :param thumbnails_per_outcome: gallery sample per row group and outcome (0: no gallery).
    """

    mtime: int = TAR_MTIME
    thumbnail_px: int = 256
    thumbnails_per_outcome: int = 4


def write_config(_run: Any = None, _name: str = STAGE) -> WriteConfig:
    """The registry's ``config`` factory: the defaults (nothing a DAG param sets)."""
    return WriteConfig()


def member_key(key: str) -> str:
    """The tar member key of a record: its ``__key__``, made safe to extract.

    Rule (the only place it lives): split the key on ``/``, drop empty, ``.`` and ``..``
    components (so no leading ``/`` and no way out of the extraction folder); if that changed
    anything, append ``_`` and the first 12 hex digits of the key's sha256, so two unsafe keys
    never collide with each other or with a safe key. A safe key is used unchanged. The original
    key is always kept in the Parquet's ``key`` column.

    >>> member_key("shard0/000123")
    'shard0/000123'
    >>> member_key("../../etc/passwd")
    'etc/passwd_3754d6cb3a38'
    """
    parts = [c for c in key.split("/") if c not in ("", ".", "..")]
    safe = "/".join(parts)
    if safe == key and safe:
        return key
    return f"{safe}_{hashlib.sha256(key.encode('utf-8')).hexdigest()[:12]}"


def _tar_bytes(members: list[tuple[str, bytes]], mtime: int) -> bytes:
    """A tar of ``(name, data)`` in the given order, with nothing that varies between runs."""
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = mtime
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return sink.getvalue()


def _decode(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace")


def _aligned(index_ids: np.ndarray, table: pa.Table, stage: str, rg: int) -> pa.Table:
    """``table``'s rows in the index's record order; fails when the record sets differ."""
    ids = table.column("record_id").to_numpy()
    if np.array_equal(ids, index_ids):
        return table
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids[order], index_ids)
    if len(ids) != len(index_ids) or not np.array_equal(ids[order][np.minimum(pos, len(ids) - 1)], index_ids):
        raise WriteError(
            f"row group {rg}: stage {stage!r} holds other records than the index ({len(ids)} rows "
            f"vs {len(index_ids)}); it was computed from another index. Recompute stage {stage!r} "
            "with overwrite=true."
        )
    return table.take(pa.array(order[pos]))


class WriteStage:
    """Row group -> ``write/p*/rg*.tar`` (committed here) and its ``write_schema`` table.

    Kept = the ``status`` stage's outcome ``kept``. Members are sorted
    by record_id and named ``<member_key>.<image_ext>``, ``<member_key>.txt``,
    ``<member_key>.json`` (see :func:`member_key`); a key repeated inside one row group (same
    key in two shards) gets ``_r<record_id>`` appended from its second occurrence on.
    """

    name: ClassVar[str] = STAGE

    def __init__(self, config: WriteConfig | None = None) -> None:
        self.config = config or WriteConfig()

    def fingerprint_config(self) -> dict[str, Any]:
        # Thumbnails are the gallery's side product: they change neither the tars nor the
        # Parquet, so they stay out (a run root written before them resumes as it is).
        return {"format": TAR_FORMAT, "mtime": self.config.mtime}

    def setup(self) -> None:
        pass

    def _joined(self, store: CommitStore, p: int, rg: int) -> pa.Table:
        index = store.read_table("index", p, rg).sort_by("record_id")
        ids = index.column("record_id").to_numpy()
        embed = _aligned(ids, store.read_table("embed", p, rg, columns=["record_id", "embedding", "error"]), "embed", rg)
        status = _aligned(ids, store.read_table("status", p, rg), "status", rg)
        for name in ("embedding", "error"):
            index = index.append_column(name, embed.column(name))
        # A filter column the index holds already (an image's width...) is the index's own.
        for name in ("outcome", "reason", *(v for v in VALUE_NAMES if v not in index.column_names), "duplicate_of",
                     "duplicate_of_key"):
            index = index.append_column(name, status.column(name))
        return index

    def process(self, task: RowGroupTask) -> pa.Table:
        store = task.store()
        joined = self._joined(store, task.partition, task.row_group)
        kept_mask = np.asarray(joined.column("outcome").to_pylist(), dtype=object) == "kept"
        if self.config.thumbnails_per_outcome > 0:
            # Side files go first: the row group's .parquet (returned below) is the commit marker.
            write_gallery(store, task, joined, self.config)
        kept = joined.filter(pa.array(kept_mask))
        images = read_members(kept, "image", storage=task.storage)
        texts = read_members(kept, "txt", storage=task.storage)
        jsons = read_members(kept, "json", storage=task.storage)

        members: list[tuple[str, bytes]] = []
        used: set[str] = set()
        keys = kept.column("key").to_pylist()
        for i, (key, rid, ext) in enumerate(
            zip(keys, kept.column("record_id").to_pylist(), kept.column("image_ext").to_pylist())
        ):
            name = member_key(key)
            if name in used:
                name = f"{name}_r{rid}"
            used.add(name)
            members.append((f"{name}.{ext}", images[i]))
            if texts[i] is not None:
                members.append((f"{name}.txt", texts[i]))
            if jsons[i] is not None:
                members.append((f"{name}.json", jsons[i]))
        store.commit_bytes(STAGE, task.partition, task.row_group, _tar_bytes(members, self.config.mtime), suffix=".tar")

        embedding = kept.column("embedding")
        dim = embedding.type.list_size
        return pa.table(
            {
                "record_id": kept.column("record_id"),
                "uid": kept.column("uid"),
                "key": kept.column("key"),
                "shard": kept.column("shard"),
                "caption": pa.array([_decode(t) for t in texts], pa.string()),
                "json": pa.array([_decode(j) for j in jsons], pa.string()),
                **{name: kept.column(name) for name in VALUE_NAMES},
                "embedding": embedding,
            },
            schema=write_schema(dim),
        )


def write_gallery(store: CommitStore, task: RowGroupTask, joined: pa.Table, config: WriteConfig) -> None:
    """Commit ``rg<id>.thumbs`` and ``rg<id>.gallery`` (Parquet) (see winnow.stages.thumbnails).

    The outcome, the reason (the ``error`` column: the status stage's reason, else the decode
    error) and the scores are the status stage's; a sampled near duplicate also gets the thumbnail
    of its kept twin (an exact duplicate's twin has the same bytes: its own thumbnail shows it).
    """
    from winnow.stages.thumbnails import GALLERY_SCHEMA, GALLERY_SUFFIX, THUMBS_SUFFIX, make_thumbnail, sample_rows

    ids = joined.column("record_id").to_numpy()
    dup_of = joined.column("duplicate_of").to_pylist()
    kinds = joined.column("outcome").to_pylist()
    rows = sample_rows(kinds, ids, config.thumbnails_per_outcome)
    sample = joined.take(pa.array(rows, pa.int64()))
    images = read_members(sample, "image", storage=task.storage) if rows else []
    twins = sorted({dup_of[r] for r in rows if kinds[r] == "duplicate" and dup_of[r] is not None})
    originals = _originals(store, task, twins)
    blob = io.BytesIO()

    def put(data: bytes | None) -> tuple[int | None, int | None]:
        thumb = make_thumbnail(data, px=config.thumbnail_px) if data is not None else None
        if thumb is None:
            return None, None
        offset = blob.tell()
        blob.write(thumb)
        return offset, len(thumb)

    orig_thumbs = {rid: (put(data), key) for rid, (data, key) in originals.items()}
    cols: dict[str, list] = {f.name: [] for f in GALLERY_SCHEMA}
    keys = joined.column("key").to_pylist()
    errors = [r if r is not None else e for e, r in zip(joined.column("error").to_pylist(),
                                                          joined.column("reason").to_pylist())]
    values = {name: joined.column(name).to_pylist() for name in VALUE_NAMES}
    twin_keys = joined.column("duplicate_of_key").to_pylist()
    for j, r in enumerate(rows):
        off, size = put(images[j]) if kinds[r] != "undecodable" else (None, None)
        of = dup_of[r]
        (o_off, o_size), o_key = orig_thumbs.get(of, ((None, None), None)) if of is not None else ((None, None), None)
        for name, value in (("record_id", int(ids[r])), ("key", keys[r]), ("outcome", kinds[r]), ("error", errors[r]),
                            *((name, column[r]) for name, column in values.items()), ("duplicate_of", of),
                            ("duplicate_of_key", o_key if o_key is not None else twin_keys[r]),
                            ("thumb_offset", off), ("thumb_size", size),
                            ("original_thumb_offset", o_off), ("original_thumb_size", o_size)):
            cols[name].append(value)
    store.commit_bytes(STAGE, task.partition, task.row_group, blob.getvalue(), suffix=THUMBS_SUFFIX)
    table = pa.table(cols, schema=GALLERY_SCHEMA)
    from winnow.rowgroups.store import table_to_parquet_bytes

    store.commit_bytes(STAGE, task.partition, task.row_group, table_to_parquet_bytes(table), suffix=GALLERY_SUFFIX)


def _originals(store: CommitStore, task: RowGroupTask, record_ids: list[int]) -> dict[int, tuple[bytes | None, str]]:
    """Image bytes and key of the records that sampled duplicates duplicate (any row group)."""
    plan = task.plan
    by_rg: dict[int, list[int]] = {}
    for rid in record_ids:
        by_rg.setdefault(rid // plan.buffer_size, []).append(rid)
    out: dict[int, tuple[bytes | None, str]] = {}
    for rg, rids in by_rg.items():
        index = store.read_table("index", plan.partition_of(rg), rg)
        mask = np.isin(index.column("record_id").to_numpy(), np.array(rids, dtype=np.int64))
        rows = index.filter(pa.array(mask))
        for rid, key, data in zip(rows.column("record_id").to_pylist(), rows.column("key").to_pylist(),
                                  read_members(rows, "image", storage=task.storage)):
            out[int(rid)] = (data, key)
    return out
