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
#: The status columns of a run with a corpus (winnow.stages.status.status_schema) the gallery
#: carries: the corpus record a ``corpus_duplicate`` duplicates.
CORPUS_COLUMNS = ("duplicate_of_run", "duplicate_of_uid")
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
    :param corpus_uri: the run's corpus (:mod:`winnow.corpus`), None for a run without one: the
        gallery of a run with a corpus shows, beside a sampled ``corpus_duplicate``, the picture
        of the corpus record it duplicates.
    """

    mtime: int = TAR_MTIME
    thumbnail_px: int = 256
    thumbnails_per_outcome: int = 4
    corpus_uri: str | None = None


def write_config(run: Any = None, _name: str = STAGE) -> WriteConfig:
    """The registry's ``config`` factory: the defaults, and the run's ``corpus_uri``."""
    return WriteConfig(corpus_uri=getattr(run, "corpus_uri", None))


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
        # The corpus is named only when there is one: a run without a corpus keeps the
        # fingerprint (and so the run root) it had before corpora existed.
        corpus = {"corpus_uri": self.config.corpus_uri} if self.config.corpus_uri is not None else {}
        return {"format": TAR_FORMAT, "mtime": self.config.mtime, **corpus}

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
                     "duplicate_of_key", *(c for c in CORPUS_COLUMNS if c in status.column_names)):
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


#: The gallery columns of a run with a corpus, after :data:`~winnow.stages.thumbnails.GALLERY_SCHEMA`'s.
CORPUS_GALLERY_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("duplicate_of_run", pa.string()),  # a corpus_duplicate: the run key of the corpus record
    ("duplicate_of_uid", pa.string()),  # ... and its uid (a takedown of it blanks this row's pictures)
    ("takedown_reason", pa.string()),  # a takedown: the reason the takedown recorded
    ("takedown_date", pa.string()),  # ... and its date
)


def gallery_schema(corpus: bool) -> pa.Schema:
    """The layout of ``rg<id>.gallery``: :data:`~winnow.stages.thumbnails.GALLERY_SCHEMA`, and in
    a run with a corpus :data:`CORPUS_GALLERY_FIELDS` after it."""
    from winnow.stages.thumbnails import GALLERY_SCHEMA

    return pa.schema([*GALLERY_SCHEMA, *(pa.field(n, t) for n, t in CORPUS_GALLERY_FIELDS)]) if corpus else GALLERY_SCHEMA


def write_gallery(store: CommitStore, task: RowGroupTask, joined: pa.Table, config: WriteConfig) -> None:
    """Commit ``rg<id>.thumbs`` and ``rg<id>.gallery`` (Parquet) (see winnow.stages.thumbnails).

    The outcome, the reason (the ``error`` column: the status stage's reason, else the decode
    error) and the scores are the status stage's; a sampled near duplicate also gets the thumbnail
    of its kept twin (an exact duplicate's twin has the same bytes: its own thumbnail shows it).

    In a run with a corpus (``config.corpus_uri``) the gallery also has the corpus columns
    (:func:`gallery_schema`): a sampled ``corpus_duplicate`` names the
    corpus record it duplicates (run key, key, uid) and gets that record's picture as its
    original thumbnail (:func:`corpus_originals`: read from the earlier run's output tar; none
    when the record was taken down since); a sampled ``takedown`` gets no thumbnail at all (no
    picture of a taken-down image is made), and the takedown's reason and date.
    """
    from winnow.stages.thumbnails import GALLERY_SUFFIX, THUMBS_SUFFIX, make_thumbnail, sample_rows

    corpus = config.corpus_uri is not None
    schema = gallery_schema(corpus)
    ids = joined.column("record_id").to_numpy()
    dup_of = joined.column("duplicate_of").to_pylist()
    kinds = joined.column("outcome").to_pylist()
    rows = sample_rows(kinds, ids, config.thumbnails_per_outcome)
    # A taken-down record's image is never read (nor shown): the sample reads the others only.
    shown = [r for r in rows if kinds[r] != "takedown"]
    sample = joined.take(pa.array(shown, pa.int64()))
    read = read_members(sample, "image", storage=task.storage) if shown else []
    images = dict(zip(shown, read))
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
    cols: dict[str, list] = {f.name: [] for f in schema}
    keys = joined.column("key").to_pylist()
    errors = [r if r is not None else e for e, r in zip(joined.column("error").to_pylist(),
                                                          joined.column("reason").to_pylist())]
    values = {name: joined.column(name).to_pylist() for name in VALUE_NAMES}
    twin_keys = joined.column("duplicate_of_key").to_pylist()
    extra: dict[int, dict[str, Any]] = {r: {} for r in rows}
    if corpus:
        extra = _corpus_gallery_columns(store, task, joined, rows, config)
    for r in rows:
        off, size = put(images[r]) if r in images and kinds[r] != "undecodable" else (None, None)
        of = dup_of[r]
        (o_off, o_size), o_key = orig_thumbs.get(of, ((None, None), None)) if of is not None else ((None, None), None)
        more = extra[r]
        if "original" in more:  # a corpus duplicate: the corpus record's picture
            original = more.pop("original")
            o_off, o_size = (off, size) if original is _SAME_BYTES else put(original)
        for name, value in (("record_id", int(ids[r])), ("key", keys[r]), ("outcome", kinds[r]), ("error", errors[r]),
                            *((name, column[r]) for name, column in values.items()), ("duplicate_of", of),
                            ("duplicate_of_key", o_key if o_key is not None else twin_keys[r]),
                            ("thumb_offset", off), ("thumb_size", size),
                            ("original_thumb_offset", o_off), ("original_thumb_size", o_size), *more.items()):
            cols[name].append(value)
    store.commit_bytes(STAGE, task.partition, task.row_group, blob.getvalue(), suffix=THUMBS_SUFFIX)
    table = pa.table(cols, schema=schema)
    from winnow.rowgroups.store import table_to_parquet_bytes

    store.commit_bytes(STAGE, task.partition, task.row_group, table_to_parquet_bytes(table), suffix=GALLERY_SUFFIX)


#: A corpus duplicate whose image bytes are the corpus record's (the same uid): its own thumbnail
#: is the original's picture, nothing is read.
_SAME_BYTES = object()


def _corpus_gallery_columns(store: CommitStore, task: RowGroupTask, joined: pa.Table, rows: list[int],
                            config: WriteConfig) -> dict[int, dict[str, Any]]:
    """Per sampled row: the corpus columns of its gallery row (and, for a corpus duplicate, the
    ``original`` image bytes to make its original thumbnail from: None when the corpus no longer
    holds the record, :data:`_SAME_BYTES` when they are its own)."""
    names = joined.column_names
    kinds = joined.column("outcome").to_pylist()
    runs = joined.column("duplicate_of_run").to_pylist() if "duplicate_of_run" in names else [None] * joined.num_rows
    of_uids = joined.column("duplicate_of_uid").to_pylist() if "duplicate_of_uid" in names else [None] * joined.num_rows
    uids = joined.column("uid").to_pylist()
    out: dict[int, dict[str, Any]] = {r: {"duplicate_of_run": runs[r], "duplicate_of_uid": of_uids[r],
                                          "takedown_reason": None, "takedown_date": None} for r in rows}
    dups = [r for r in rows if kinds[r] == "corpus_duplicate"]
    wanted = sorted({of_uids[r] for r in dups if of_uids[r]})
    # Where the corpus holds each record now (a record taken down since is not there); the
    # picture is read only where it is not the row's own (the same uid is the same bytes).
    found = corpus_originals(config.corpus_uri, task.storage, wanted,
                             read={of_uids[r] for r in dups if of_uids[r] and of_uids[r] != uids[r]}) if wanted else {}
    for r in dups:
        if of_uids[r] in found:
            out[r]["original"] = _SAME_BYTES if of_uids[r] == uids[r] else found[of_uids[r]]
        else:
            out[r]["original"] = None
    ids = joined.column("record_id").to_numpy()
    taken = [int(ids[r]) for r in rows if kinds[r] == "takedown"]
    if taken:
        reasons = _takedown_reasons(store, config.corpus_uri, task.storage, taken)
        for r in rows:
            if kinds[r] == "takedown":
                out[r]["takedown_reason"], out[r]["takedown_date"] = reasons.get(int(ids[r]), (None, None))
    return out


def corpus_originals(corpus_uri: str, storage: Any, uids: list[str], *, read: set[str] | None = None) -> dict[str, bytes | None]:
    """uid -> the image bytes of the corpus record with that uid, for the ``uids`` the corpus
    holds now (a record taken down since is left out); the bytes are read only for the uids in
    ``read`` (default: all; the others map to None), from the record's run's output tar (the
    manifest's ``run_root`` + ``tar``, its first member: None when the tar no longer has it).

    Reads the uid partitions and manifest buckets those uids fall in (only their rows, by a
    Parquet filter on ``uid``), and each tar that holds a record to read once, sequentially up
    to the last member wanted."""
    # The corpus's read side only (winnow.corpus itself imports this module).
    from winnow.corpus.layout import bucket_dir, open_corpus
    from winnow.rowgroups.fs import RunRoot

    read = set(uids) if read is None else read
    corpus = open_corpus(corpus_uri, storage)
    generation = corpus.head().generation
    buckets: dict[int, set[str]] = {}
    for uid, (bucket,) in corpus.uid_rows(uids, ("bucket",), generation=generation).items():
        buckets.setdefault(int(bucket), set()).add(uid)
    out: dict[str, bytes | None] = {}
    where: dict[tuple[str, str], dict[str, str]] = {}  # (run_root, tar) -> member -> uid
    for bucket, want in sorted(buckets.items()):
        for _g, path in corpus.generation_files(bucket_dir(bucket), generation):
            t = corpus.read_parquet(path, ["uid", "run_root", "tar", "members"], filters=[("uid", "in", sorted(want))])
            for uid, run_root, tar, members in zip(*(t.column(c).to_pylist() for c in ("uid", "run_root", "tar", "members"))):
                if uid in want and uid not in out:  # the earliest record of a uid
                    out[uid] = None
                    if uid in read and members:
                        where.setdefault((run_root, tar), {})[members[0]] = uid
    for (run_root, tar), members in sorted(where.items()):
        for name, data in _tar_members(CommitStore(RunRoot(run_root, storage)), tar, set(members)).items():
            out[members[name]] = data
    return out


def _tar_members(store: CommitStore, tar_rel: str, names: set[str]) -> dict[str, bytes]:
    """The bytes of the members ``names`` of a tar (one sequential read, stopped after the last
    of them); a tar or member that is gone (a takedown rewrote the tar) is left out."""
    out: dict[str, bytes] = {}
    try:
        with store.fs.open_input_stream(store.path(tar_rel)) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                if info.isfile() and info.name in names:
                    member = tar.extractfile(info)
                    if member is not None:
                        out[info.name] = member.read()
                    if len(out) == len(names):
                        break
    except (FileNotFoundError, tarfile.TarError):
        pass
    return out


def _takedown_reasons(store: CommitStore, corpus_uri: str, storage: Any,
                      record_ids: list[int]) -> dict[int, tuple[str | None, str | None]]:
    """record id -> (reason, date) of the takedown that lists it (the run's corpus check names the
    identifier, ``<kind>:<identifier>``; the corpus's takedown files say which takedown listed
    it); absent when not known (a takedown still in progress when the run checked)."""
    from winnow.corpus.layout import open_corpus
    from winnow.stages.corpus_matches import matches

    want = set(record_ids)
    rows = matches(store, "checked", min(record_ids), max(record_ids) + 1)
    listed: dict[int, tuple[str, str]] = {}
    for rid, ident in zip(rows.column("record_id").to_pylist(), rows.column("identifier").to_pylist()):
        kind, sep, value = (ident or "").partition(":")
        if int(rid) in want and sep:
            listed[int(rid)] = (kind, value)
    if not listed:
        return {}
    corpus = open_corpus(corpus_uri, storage)
    wanted = set(listed.values())
    found: dict[tuple[str, str], tuple[str | None, str | None]] = {}
    for entry in corpus.head().takedowns:
        if not entry.get("file"):
            continue
        t = corpus.read_parquet(corpus.path(entry["file"]), ["identifier", "kind"])
        for ident, kind in zip(t.column("identifier").to_pylist(), t.column("kind").to_pylist()):
            if (kind, ident) in wanted and (kind, ident) not in found:
                found[(kind, ident)] = (entry.get("reason"), entry.get("date"))
    return {rid: found[k] for rid, k in listed.items() if k in found}


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
