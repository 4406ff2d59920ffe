"""Removing records from a run root's output row groups (a takedown, or a publish that leaves out
what a takedown listed): the tar, the curated Parquet and the gallery files, each replaced by one
whole-object write (:func:`~winnow.rowgroups.store.write_atomic`).

Every rewrite is computed from what the files hold now and is idempotent: run again on a file that
no longer holds the records it changes nothing (and writes nothing). The order makes a crash
anywhere safe to resume: first every gallery (``rg*.thumbs``, then ``rg*.gallery``), then per row
group the tar, then its ``rg*.parquet`` last, because the Parquet is what says which records a row
group holds (and so which tar members and gallery entries belong to them).

The gallery's thumbnail blob keeps its length: a removed record's thumbnail bytes are overwritten
with zeros in place, its gallery row is dropped, and the entries that showed it as their twin's
picture (``original_thumb_*``; an exact duplicate's own thumbnail, which is the same picture) are
nulled. The offsets of every other entry stay valid, so a reader that reads the gallery before the
rewrite and the blob after it gets a blank thumbnail, never another record's picture.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from winnow.exceptions import CorpusError
from winnow.rowgroups.fs import RunRoot, display_uri, fs_error, is_local
from winnow.rowgroups.store import (
    TEMP_MARK,
    CommitStore,
    list_folder,
    parse_row_group_name,
    table_to_parquet_bytes,
    write_atomic,
)
from winnow.stages.write import STAGE as WRITE_STAGE
from winnow.stages.write import TAR_MTIME, _tar_bytes, member_key

GALLERY_SUFFIX = ".gallery"  # winnow.stages.thumbnails.GALLERY_SUFFIX (not imported: it pulls in PIL)
THUMBS_SUFFIX = ".thumbs"
#: Gallery outcomes whose own thumbnail is their twin's picture (the same image bytes).
SAME_PICTURE = ("exact_duplicate",)


def write_folder(store: CommitStore) -> str:
    """The write stage's folder relative to the run root (``write``; ``output`` in old roots)."""
    return store.stage_dir(WRITE_STAGE)[len(store.root) + 1:]


def sibling(rel: str, suffix: str) -> str:
    """``write/p00000/rg000000003.tar`` -> the same row group's file with ``suffix``."""
    return rel[: rel.rindex(".")] + suffix


def list_write_files(store: CommitStore) -> list[pafs.FileInfo]:
    """Every committed file of the write stage (one recursive listing), temp files left out."""
    infos = list_folder(store.fs, store.stage_dir(WRITE_STAGE), recursive=True)
    return sorted((i for i in infos if i.type == pafs.FileType.File and TEMP_MARK not in i.base_name
                   and parse_row_group_name(i.base_name) is not None), key=lambda i: i.path)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise CorpusError(f"{display_uri(fs, path)} is missing: the run root lost an output file the corpus "
                          "names") from exc
    except OSError as exc:
        if is_local(fs):
            raise
        raise fs_error(fs, path, exc) from exc


def read_table(fs: pafs.FileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    try:
        with fs.open_input_file(path) as f:
            return pq.read_table(f, columns=columns)
    except FileNotFoundError as exc:
        raise CorpusError(f"{display_uri(fs, path)} is missing: the run root lost an output file the corpus "
                          "names") from exc
    except pa.ArrowInvalid as exc:
        raise CorpusError(f"{display_uri(fs, path)}: not a readable Parquet file ({exc})") from exc


def tar_member_names(fs: pafs.FileSystem, path: str) -> list[str]:
    """The member names of a tar, in order, from its headers (one sequential read)."""
    try:
        with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            return [info.name for info in tar if info.isfile()]
    except FileNotFoundError as exc:
        raise CorpusError(f"{display_uri(fs, path)} is missing: the row group's Parquet is committed, so its "
                          "tar must be there") from exc
    except tarfile.TarError as exc:
        raise CorpusError(f"{display_uri(fs, path)}: a damaged tar ({exc})") from exc


def _base(name: str) -> str:
    """A member's record part: the name up to the first dot of its basename (the WebDataset
    rule of :func:`winnow.data.tarscan.split_key`)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return name if dot < 0 else name[:dot]


def record_members(keys: list[str], record_ids: list[int], names: list[str], where: str) -> list[list[str]]:
    """Each row's members in a written tar: the write stage names a record's members
    ``<member_key(key)>.<ext>`` (``_r<record_id>`` appended where the key repeats in the row group,
    :class:`winnow.stages.write.WriteStage`), image first. Resolved against the tar's own names,
    so it holds after a takedown removed an earlier row of a repeated key."""
    by_base: dict[str, list[str]] = {}
    for name in names:
        by_base.setdefault(_base(name), []).append(name)
    out = []
    for key, rid in zip(keys, record_ids):
        plain = member_key(key)
        base = f"{plain}_r{rid}" if f"{plain}_r{rid}" in by_base else plain
        members = by_base.get(base)
        if not members:
            raise CorpusError(f"{where}: holds no member of record {key!r} (record_id {rid}) that its Parquet lists; "
                              "the row group is damaged or was written by another winnow")
        out.append(members)
    return out


@dataclass
class RunRemoval:
    """What to remove from one run root: per row group (its tar, relative to the run root) the
    record ids; the galleries that show a removed record; and the uids removed anywhere (a
    gallery of another run may show one as a corpus duplicate's twin)."""

    run_root: str
    row_groups: dict[str, list[int]] = field(default_factory=dict)
    galleries: list[str] = field(default_factory=list)

    def files(self, thumbs: Iterable[str] = ()) -> list[str]:
        """The run-root files this removal rewrites, relative to the run root, in write order."""
        thumbs = set(thumbs)
        out = []
        for g in self.galleries:
            if sibling(g, THUMBS_SUFFIX) in thumbs:
                out.append(sibling(g, THUMBS_SUFFIX))
            out.append(g)
        for tar in sorted(self.row_groups):
            out += [tar, sibling(tar, ".parquet")]
        return out

    def to_dict(self) -> dict:
        return {"run_root": self.run_root, "row_groups": {k: sorted(v) for k, v in sorted(self.row_groups.items())},
                "galleries": sorted(self.galleries)}

    @classmethod
    def from_dict(cls, data: dict) -> RunRemoval:
        return cls(data["run_root"], {k: list(v) for k, v in data["row_groups"].items()}, list(data["galleries"]))


def removed_record_ids(store: CommitStore, tar_rel: str, pairs: set[tuple[str, str]]) -> list[int]:
    """The record ids of the rows of a row group's Parquet whose (uid, key) is in ``pairs``."""
    t = read_table(store.fs, store.path(sibling(tar_rel, ".parquet")), ["record_id", "uid", "key"])
    return [rid for rid, uid, key in zip(*(t.column(c).to_pylist() for c in ("record_id", "uid", "key")))
            if (uid, key) in pairs]


def _gallery_changes(t: pa.Table, ids: set[int], uids: set[str]) -> tuple[list[dict], list[tuple[int, int]], bool]:
    """(rows after the removal, thumbnail ranges to blank, whether anything changes)."""
    rows = t.to_pylist()
    out, blank, changed = [], [], False
    for r in rows:
        if r.get("record_id") in ids:
            if r.get("thumb_offset") is not None and r.get("thumb_size"):
                blank.append((r["thumb_offset"], r["thumb_size"]))
            changed = True
            continue
        twin_gone = (r.get("duplicate_of") in ids and r.get("outcome") != "corpus_duplicate") or \
            (r.get("duplicate_of_uid") is not None and r.get("duplicate_of_uid") in uids)
        if twin_gone:
            r = dict(r)
            for prefix, own in (("original_thumb", False), ("thumb", True)):
                if own and r.get("outcome") not in (*SAME_PICTURE, "corpus_duplicate"):
                    continue
                off, size = r.get(f"{prefix}_offset"), r.get(f"{prefix}_size")
                if off is not None:
                    if size:
                        blank.append((off, size))
                    r[f"{prefix}_offset"] = r[f"{prefix}_size"] = None
                    changed = True
        out.append(r)
    return out, blank, changed


def rewrite_gallery(store: CommitStore, gallery_rel: str, ids: set[int], uids: set[str],
                    wrote: Callable[[str], None]) -> None:
    """Blank the removed thumbnails in ``rg*.thumbs`` (written first), then drop / null their
    entries in ``rg*.gallery``. Nothing to change: nothing written."""
    path = store.path(gallery_rel)
    t = read_table(store.fs, path)
    rows, blank, changed = _gallery_changes(t, ids, uids)
    if blank:
        thumbs_path = store.path(sibling(gallery_rel, THUMBS_SUFFIX))
        blob = bytearray(read_bytes(store.fs, thumbs_path))
        before = bytes(blob)
        for off, size in blank:
            blob[off:off + size] = bytes(min(size, max(0, len(blob) - off)))
        if bytes(blob) != before:
            write_atomic(store.fs, thumbs_path, bytes(blob))
            wrote(thumbs_path)
    if changed:
        write_atomic(store.fs, path, table_to_parquet_bytes(pa.Table.from_pylist(rows, schema=t.schema)))
        wrote(path)


def rewrite_row_group(store: CommitStore, tar_rel: str, ids: set[int], wrote: Callable[[str], None]) -> None:
    """The row group's tar without the members of records ``ids`` (written first), then its
    Parquet without their rows. A row group that no longer holds them is left as it is."""
    pq_path = store.path(sibling(tar_rel, ".parquet"))
    table = read_table(store.fs, pq_path)
    rids = table.column("record_id").to_pylist()
    gone = [i for i, rid in enumerate(rids) if rid in ids]
    if not gone:
        return
    tar_path = store.path(tar_rel)
    data = read_bytes(store.fs, tar_path)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            infos = [i for i in tar.getmembers() if i.isfile()]
            members = [(i.name, tar.extractfile(i).read()) for i in infos]
    except tarfile.TarError as exc:
        raise CorpusError(f"{display_uri(store.fs, tar_path)}: a damaged tar ({exc})") from exc
    names = [n for n, _ in members]
    keys = table.column("key").to_pylist()
    # The members of the removed rows; a tar rewritten before a crash no longer has them.
    by_base = {_base(n) for n in names}
    drop: set[str] = set()
    for i in gone:
        plain = member_key(keys[i])
        alt = f"{plain}_r{rids[i]}"
        drop.add(alt if alt in by_base else plain)
    kept = [(n, d) for n, d in members if _base(n) not in drop]
    if len(kept) != len(members):
        mtime = int(infos[0].mtime) if infos else TAR_MTIME
        write_atomic(store.fs, tar_path, _tar_bytes(kept, mtime))
        wrote(tar_path)
    mask = pa.array([rid not in ids for rid in rids], pa.bool_())
    write_atomic(store.fs, pq_path, table_to_parquet_bytes(table.filter(mask)))
    wrote(pq_path)


def apply_removal(removal: RunRemoval, storage, uids: set[str], wrote: Callable[[str], None]) -> None:
    """Every rewrite of one run root, in the crash-safe order (module docstring)."""
    store = CommitStore(RunRoot(removal.run_root, storage))
    ids = {rid for rids in removal.row_groups.values() for rid in rids}
    for gallery in sorted(removal.galleries):
        rewrite_gallery(store, gallery, ids, uids, wrote)
    for tar in sorted(removal.row_groups):
        rewrite_row_group(store, tar, set(removal.row_groups[tar]), wrote)


def plan_galleries(store: CommitStore, ids: set[int], uids: set[str]) -> tuple[list[str], list[str]]:
    """(galleries of the run that show a removed record, those of them whose blob changes),
    relative to the run root: every ``rg*.gallery`` of the run is read (they are small)."""
    galleries, thumbs = [], []
    if not ids and not uids:
        return galleries, thumbs
    for info in list_write_files(store):
        if not info.base_name.endswith(GALLERY_SUFFIX):
            continue
        rel = info.path[len(store.root) + 1:]
        t = read_table(store.fs, info.path)
        if not ids and "duplicate_of_uid" not in t.column_names:
            continue
        _rows, blank, changed = _gallery_changes(t, ids, uids)
        if changed:
            galleries.append(rel)
            if blank:
                thumbs.append(sibling(rel, THUMBS_SUFFIX))
    return galleries, thumbs
