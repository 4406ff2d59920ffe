"""Ranged reads of record members (image, ``.txt``, ``.json``) straight out of the shards, by
the offsets and sizes the index recorded: each shard is opened once per call, nothing is untarred.

Members that lie close together in a shard (a row group's records mostly do) are fetched by one
ranged read covering them all: on an object store that is one GET per run of nearby records
instead of one per record.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from winnow.data.shards import open_shard_filesystem
from winnow.exceptions import ShardError
from winnow.filters import passes_before_decode
from winnow.rowgroups.fs import StorageOptions

#: Member name -> (offset column, size column) of :data:`winnow.schemas.INDEX`.
#: Members closer than this are read in one request (the bytes between are read and dropped).
COALESCE_GAP = 1 << 20
#: One coalesced read is at most this long.
COALESCE_MAX = 64 << 20

MEMBER_COLUMNS = {
    "image": ("image_offset", "image_size"),
    "txt": ("txt_offset", "txt_size"),
    "json": ("json_offset", "json_size"),
}


def read_members(
    index_table: pa.Table,
    member: str = "image",
    *,
    filesystem: pafs.FileSystem | None = None,
    storage: StorageOptions | None = None,
) -> list[bytes | None]:
    """The bytes of one member (``"image"``, ``"txt"`` or ``"json"``) of every row of an index
    table, in row order; ``None`` where a record has no such member.

    Rows are grouped by shard so each shard is opened once and read in offset order. With
    ``filesystem`` the ``shard`` column holds paths in it; without, each shard is resolved from
    its path or URI, an object store's with the run's ``storage`` settings. Raises
    :class:`ShardError` naming the shard and key when data is missing.
    """
    if member not in MEMBER_COLUMNS:
        raise ValueError(f"member must be one of {sorted(MEMBER_COLUMNS)}, got {member!r}")
    offset_col, size_col = MEMBER_COLUMNS[member]
    shards = index_table.column("shard").to_pylist()
    keys = index_table.column("key").to_pylist()
    offsets = index_table.column(offset_col).to_pylist()
    sizes = index_table.column(size_col).to_pylist()
    out: list[bytes | None] = [None] * len(shards)
    by_shard: dict[str, list[int]] = defaultdict(list)
    for row, (shard, offset) in enumerate(zip(shards, offsets)):
        if offset is not None:
            by_shard[shard].append(row)
    for shard, rows in by_shard.items():
        rows.sort(key=lambda r: offsets[r])
        fs, path = open_shard_filesystem(shard, filesystem, storage)
        try:
            f = fs.open_input_file(path)
        except (OSError, ValueError) as exc:
            raise ShardError(
                shard,
                f"shard {shard} (needed for key {keys[rows[0]]!r}) cannot be opened: {exc}. The "
                "input changed since the index was built; restore it or re-index with a new run key.",
            ) from exc
        with f:
            for span in _spans(rows, offsets, sizes):
                start = offsets[span[0]]
                stop = max(offsets[r] + (sizes[r] or 0) for r in span)
                try:
                    block = f.read_at(stop - start, start) if stop > start else b""
                except OSError as exc:
                    raise ShardError(shard, f"shard {shard}: reading key {keys[span[0]]!r} failed: {exc}") from exc
                for row in span:
                    offset, size = offsets[row], sizes[row] or 0
                    data = block[offset - start:offset - start + size]
                    if len(data) != size:
                        raise ShardError(
                            shard,
                            f"shard {shard} is shorter than its index says: key {keys[row]!r} needs "
                            f"{size} bytes at offset {offset}, got {len(data)}. The shard changed "
                            "since the index was built; restore it or re-index with a new run key.",
                        )
                    out[row] = data
    return out



def embedded_rows(index: pa.Table, before_decode: tuple[tuple[str, Any], ...] = (),
                  skip: np.ndarray | None = None) -> np.ndarray | None:
    """Positions of the index rows to read, decode and embed: all but the exact duplicates
    (index ``exact_duplicate_of`` set) and the records a before-decode filter drops (its params
    in ``before_decode``, see :func:`winnow.filters.before_decode_params`: their values are index
    columns) and the rows ``skip`` marks (a run with a corpus: the records its pre-check found
    listed by a takedown or already in the corpus). ``None`` when that is every row (the common
    case: no copy is made)."""
    keep = None if skip is None or not skip.any() else ~skip
    if "exact_duplicate_of" in index.column_names:
        twins = index.column("exact_duplicate_of")
        if twins.null_count != len(twins):
            fresh = twins.is_null().to_numpy(zero_copy_only=False)
            keep = fresh if keep is None else keep & fresh
    if before_decode:
        columns = {name: _as_float(index.column(name)) for name in index.column_names
                   if pa.types.is_integer(index.column(name).type) or pa.types.is_floating(index.column(name).type)}
        passed = passes_before_decode(dict(before_decode), columns)
        if passed is not None:
            keep = passed if keep is None else keep & passed
    return None if keep is None or keep.all() else np.flatnonzero(keep)


def _as_float(column: pa.ChunkedArray) -> np.ndarray:
    return column.cast(pa.float64()).fill_null(float("nan")).to_numpy(zero_copy_only=False)


def read_images(index: pa.Table, before_decode: tuple[tuple[str, Any], ...] = (), *,
                storage: StorageOptions | None = None, skip: np.ndarray | None = None,
                ) -> tuple[list[bytes | None], np.ndarray | None]:
    """The image bytes of the rows to embed (:func:`embedded_rows`) and their positions (None:
    all rows): the one place that decides an exact duplicate's bytes, or those of a record a
    before-decode filter drops, are not read. ``storage``: as for :func:`read_members`."""
    rows = embedded_rows(index, before_decode, skip)
    chosen = index if rows is None else index.take(pa.array(rows, pa.int64()))
    return read_members(chosen, "image", storage=storage), rows


def _spans(rows: list[int], offsets: list, sizes: list) -> list[list[int]]:
    """Rows (sorted by offset) grouped into runs that one ranged read covers."""
    spans: list[list[int]] = []
    start = end = 0
    for row in rows:
        offset, size = offsets[row], sizes[row] or 0
        if spans and offset - end <= COALESCE_GAP and offset + size - start <= COALESCE_MAX:
            spans[-1].append(row)
            end = max(end, offset + size)
        else:
            spans.append([row])
            start, end = offset, offset + size
    return spans


#: Tar header scans on object stores read the shard in blocks of this size.
SCAN_BLOCK = 8 << 20


class _BlockFile:
    """A remote file read through one cached block: the tar-header scan's 512-byte reads,
    which walk the shard front to back, cost one GET per block instead of one per member."""

    def __init__(self, f: pafs.NativeFile, block: int = SCAN_BLOCK) -> None:
        self.f, self.block = f, block
        self._start, self._data = 0, b""

    def size(self) -> int:
        return self.f.size()

    def read_at(self, nbytes: int, offset: int) -> bytes:
        end = self._start + len(self._data)
        if self._start <= offset and offset + nbytes <= end:
            return self._data[offset - self._start:offset - self._start + nbytes]
        if nbytes >= self.block:
            return self.f.read_at(nbytes, offset)
        self._start, self._data = offset, self.f.read_at(self.block, offset)
        return self._data[:nbytes]

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> _BlockFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_for_scan(fs: pafs.FileSystem, path: str):
    """A shard opened for a front-to-back scan of its headers: on an object store through
    block reads (a request per block beats one per member even though member bytes come along;
    local disk reads headers only)."""
    from winnow.rowgroups.fs import is_object_store

    f = fs.open_input_file(path)
    return _BlockFile(f) if is_object_store(fs) else f
