"""Tar scan of one WebDataset shard: member offsets and sizes grouped into records, and each
record's 128-bit image id (:func:`image_uid`).

The 512-byte headers (and the small GNU long-name / pax blocks) are read, and so is the data of
each image member, once, in the same front-to-back pass (it is hashed in chunks as it streams
by, never held whole); ``.txt``, ``.json`` and other members are seeked past. Members the scan
skips (a record without an image, a key repeated inside the shard) are listed in
:attr:`ShardScan.skipped` so each can get a status row later. The WebDataset key rule lives in
:func:`split_key`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from winnow.data.captions import caption_from_json, caption_from_txt, caption_words
from winnow.data.image_size import HEADER_BYTES, header_size
from winnow.data.reader import open_for_scan
from winnow.data.shards import open_shard_filesystem
from winnow.exceptions import ShardError
from winnow.rowgroups.fs import StorageOptions
from winnow.schemas import IMAGE_EXTENSIONS

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
# Types whose data follows the header in the archive (regular, contiguous, unknown types).
_REGULAR = (b"0", b"\0", b"7")
# Types with no data blocks regardless of their size field (links, devices, dirs, fifos).
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")
# Long-name and pax blocks are metadata; anything larger than this is a broken header.
_MAX_META_SIZE = 1 << 20
#: At most this many example keys of each problem are kept in a scan's counts.
MAX_EXAMPLES = 20
#: Image data is hashed in reads of at most this many bytes (memory stays bounded per member).
HASH_CHUNK = 8 << 20
#: What :func:`image_uid` is, as recorded in the index stage's fingerprint.
UID_ALGORITHM = "blake2b-128"

SCAN_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image_ext", pa.string()),
        ("image_offset", pa.int64()),
        ("image_size", pa.int64()),
        ("txt_offset", pa.int64()),
        ("txt_size", pa.int64()),
        ("json_offset", pa.int64()),
        ("json_size", pa.int64()),
        ("uid", pa.string()),
        # From the image header (winnow.data.image_size: never decoded); null when unreadable.
        ("width", pa.int32()),
        ("height", pa.int32()),
        # Words of the caption (winnow.data.captions); null without one.
        ("caption_words", pa.int32()),
    ]
)

#: Members a scan skipped (no record id): one row per skipped record or repeated member.
SKIPPED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("outcome", pa.string()),  # "no_image" | "duplicate_key" (winnow.schemas.SKIPPED_OUTCOMES)
        ("reason", pa.string()),
    ]
)


def image_uid(data: bytes) -> str:
    """The 128-bit id of an image's bytes: 32 lowercase hex digits of BLAKE2b (16-byte digest).

    It depends on the bytes only, so it is stable across reruns, run keys, shard names and shard
    layouts: the same image re-sharded, or in another run, gets the same uid.

    >>> image_uid(b"")
    'cae66941d9efbd404e4d88758ea67670'
    >>> len(image_uid(b"\\xff\\xd8 any jpeg")), image_uid(b"a") == image_uid(bytes([97]))
    (32, True)
    """
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def split_key(member_name: str) -> tuple[str, str]:
    """The WebDataset rule: ``__key__`` is the member path up to the first dot of its basename,
    the extension is the rest, lower-cased. The one place this rule is written.

    >>> split_key("a.b/000123.seg.PNG")
    ('a.b/000123', 'seg.png')
    >>> split_key("README")
    ('README', '')
    """
    slash = member_name.rfind("/")
    dot = member_name.find(".", slash + 1)
    if dot < 0:
        return member_name, ""
    return member_name[:dot], member_name[dot + 1 :].lower()


@dataclass
class ShardScan:
    """The records of one shard, in member order, and what was counted while grouping them."""

    shard: str
    size: int = 0
    keys: list[str] = field(default_factory=list)
    image_ext: list[str] = field(default_factory=list)
    image_offset: list[int] = field(default_factory=list)
    image_size: list[int] = field(default_factory=list)
    txt_offset: list[int | None] = field(default_factory=list)
    txt_size: list[int | None] = field(default_factory=list)
    json_offset: list[int | None] = field(default_factory=list)
    json_size: list[int | None] = field(default_factory=list)
    uid: list[str] = field(default_factory=list)
    width: list[int | None] = field(default_factory=list)
    height: list[int | None] = field(default_factory=list)
    caption_words: list[int | None] = field(default_factory=list)
    #: (key, outcome, reason) of each skipped record or member, in member order.
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    members: int = 0  # file members seen (not directories, not long-name/pax blocks)
    members_without_image: int = 0  # records with no image member: counted and skipped
    duplicate_keys: int = 0  # records (or members) repeating a key already kept: dropped
    extra_images: int = 0  # further image members of a record that has several
    ignored_members: int = 0  # members with no key or no extension, links, devices
    zero_byte: bool = False
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def records(self) -> int:
        return len(self.keys)

    def counts(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "members": self.members,
            "members_without_image": self.members_without_image,
            "duplicate_keys": self.duplicate_keys,
            "extra_images": self.extra_images,
            "ignored_members": self.ignored_members,
            "zero_byte": self.zero_byte,
            "size": self.size,
            "examples": self.examples,
        }

    def table(self) -> pa.Table:
        """The records as a table of :data:`SCAN_SCHEMA`, with the counts in its metadata."""
        columns = [
            self.keys,
            self.image_ext,
            self.image_offset,
            self.image_size,
            self.txt_offset,
            self.txt_size,
            self.json_offset,
            self.json_size,
            self.uid,
            self.width,
            self.height,
            self.caption_words,
        ]
        meta = {"shard": self.shard, **self.counts(), "skipped": [list(row) for row in self.skipped]}
        schema = SCAN_SCHEMA.with_metadata({"winnow.scan": json.dumps(meta)})
        return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, SCAN_SCHEMA)], schema=schema)

    def skipped_table(self) -> pa.Table:
        """The skipped members as a table of :data:`SKIPPED_SCHEMA`, in member order."""
        cols = list(zip(*self.skipped)) if self.skipped else [(), (), ()]
        return pa.Table.from_arrays([pa.array(list(c), pa.string()) for c in cols], schema=SKIPPED_SCHEMA)

    def _example(self, kind: str, key: str) -> None:
        bucket = self.examples.setdefault(kind, [])
        if len(bucket) < MAX_EXAMPLES:
            bucket.append(key)


# ---- tar headers ---------------------------------------------------------------------------


def _number(field_bytes: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the high bit is set."""
    if field_bytes[0] & 0x80:
        value = int.from_bytes(field_bytes[1:], "big")
        if field_bytes[0] & 0x40:  # negative base-256
            value -= 1 << (8 * (len(field_bytes) - 1))
        return value
    text = field_bytes.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _number(header[148:156])
    except ValueError:
        return False
    unsigned = sum(header[:148]) + 256 + sum(header[156:])
    if stored == unsigned:
        return True
    # Some old writers summed signed chars.
    signed = unsigned - 2 * sum(b for b in header[:148] + header[156:] if b > 127)
    return stored == signed


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _pax_records(data: bytes) -> dict[str, str]:
    """Parse ``"<len> key=value\\n"`` records of a pax extended header."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError("pax record of length <= 0")
        record = data[space + 1 : pos + length - 1]  # without the trailing newline
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", errors="replace")] = value.decode("utf-8", errors="replace")
        pos += length
    return out


def _iter_members(f: pafs.NativeFile, file_size: int, shard: str) -> Iterator[tuple[str, bytes, int, int]]:
    """(name, typeflag, data offset, data size) of every member, headers only."""
    pos = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        if pos + BLOCK > file_size:
            if pos < file_size:
                rest = f.read_at(file_size - pos, pos)
                if rest.strip(b"\0"):
                    raise ShardError(
                        shard,
                        f"shard {shard} is truncated: it ends {file_size - pos} bytes into a tar "
                        f"header at offset {pos}. Re-copy or re-create the shard, or index with "
                        "skip_bad_shards=true to skip it.",
                    )
            return  # no end-of-archive blocks: tolerated, like tar and tarfile do
        header = f.read_at(BLOCK, pos)
        if len(header) < BLOCK:
            raise ShardError(shard, f"shard {shard}: short read of the tar header at offset {pos}")
        if header == _ZERO_BLOCK:
            return
        if not _checksum_ok(header):
            raise ShardError(
                shard,
                f"shard {shard} has a broken tar header at offset {pos} (bad checksum; is it a "
                "compressed or non-tar file named .tar, or a corrupt copy?). Re-create the shard, "
                "or index with skip_bad_shards=true to skip it.",
            )
        try:
            size = _number(header[124:136])
        except ValueError as exc:
            raise ShardError(shard, f"shard {shard} has a broken tar header at offset {pos} (size field)") from exc
        typeflag = header[156:157]
        if "size" in pax:
            size = int(pax["size"])
        data_offset = pos + BLOCK
        if size < 0:
            raise ShardError(shard, f"shard {shard} has a negative member size at offset {pos}")
        has_data = typeflag not in _NO_DATA
        name = _text(header[0:100])
        if header[257:263] == b"ustar\0":  # POSIX ustar: the prefix field extends the name
            prefix = _text(header[345:500])
            if prefix:
                name = f"{prefix}/{name}"
        if long_name is not None:
            name = long_name
        if "path" in pax:
            name = pax["path"]
        if has_data and data_offset + size > file_size:
            raise ShardError(
                shard,
                f"shard {shard} is truncated: member {name!r} (header at offset {pos}) needs "
                f"{size} bytes of data but the file ends at {file_size}. Re-copy or re-create "
                "the shard, or index with skip_bad_shards=true to skip it.",
            )
        next_pos = data_offset + (-(-size // BLOCK) * BLOCK if has_data else 0)
        if typeflag in (b"L", b"x", b"g", b"K"):
            if size > _MAX_META_SIZE:
                raise ShardError(shard, f"shard {shard}: implausible {size}-byte metadata block at offset {pos}")
            data = f.read_at(size, data_offset)
            if typeflag == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", errors="replace")
            elif typeflag == b"x":
                try:
                    pax = _pax_records(data)
                except ValueError as exc:
                    raise ShardError(shard, f"shard {shard}: broken pax header at offset {pos}: {exc}") from exc
            pos = next_pos
            continue
        long_name, pax = None, {}
        yield name, typeflag, data_offset, size
        pos = next_pos


def _hash_member(f: Any, offset: int, size: int) -> tuple[str, tuple[int, int] | None]:
    """:func:`image_uid` of ``size`` bytes at ``offset``, read in chunks of :data:`HASH_CHUNK`, and
    the image's ``(width, height)`` from the header in its first bytes (None: not readable)."""
    if size <= HASH_CHUNK:
        data = f.read_at(size, offset) if size else b""
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes at offset {offset}")
        return image_uid(data), header_size(data[:HEADER_BYTES])
    h = hashlib.blake2b(digest_size=16)
    pos, end = offset, offset + size
    wh = None
    while pos < end:
        n = min(HASH_CHUNK, end - pos)
        data = f.read_at(n, pos)
        if len(data) != n:
            raise OSError(f"short read: {len(data)} of {n} bytes at offset {pos}")
        if pos == offset:
            wh = header_size(data[:HEADER_BYTES])
        h.update(data)
        pos += n
    return h.hexdigest(), wh


def _read_member(f: Any, offset: int, size: int) -> bytes:
    data = f.read_at(size, offset) if size else b""
    if len(data) != size:
        raise OSError(f"short read: {len(data)} of {size} bytes at offset {offset}")
    return data


def scan_shard(shard: str, *, filesystem: pafs.FileSystem | None = None, caption_field: str = "caption",
               storage: StorageOptions | None = None) -> ShardScan:
    """Scan one shard's tar headers and image data and group its members into records.

    Records are runs of consecutive members with the same key (WebDataset's rule). A record
    needs an image member (first of :data:`IMAGE_EXTENSIONS` present, the rest counted); its
    ``.txt`` and ``.json`` siblings are kept, and its ``uid`` is :func:`image_uid` of the image
    bytes (read once, in the same pass as the headers), its ``width`` and ``height`` come from the
    image header in those bytes, and its ``caption_words`` from its ``.txt``, else the
    ``caption_field`` of its ``.json`` (:mod:`winnow.data.captions`). A key seen before in the shard is dropped
    and counted. Records without an image and repeated keys are listed in ``scan.skipped``.
    Raises :class:`ShardError` for an unreadable or truncated shard. An object store's shard is
    reached with the run's ``storage`` settings.
    """
    fs, path = open_shard_filesystem(shard, filesystem, storage)
    scan = ShardScan(shard=shard)
    try:
        f = open_for_scan(fs, path)  # one GET per block on object stores, not one per member
    except (OSError, ValueError) as exc:
        raise ShardError(shard, f"shard {shard} cannot be opened: {exc}. Check it exists and is readable.") from exc
    with f:
        try:
            scan.size = f.size()
        except OSError as exc:
            raise ShardError(shard, f"shard {shard} cannot be read: {exc}") from exc
        if scan.size == 0:
            scan.zero_byte = True
            return scan
        seen: set[str] = set()
        cur_key: str | None = None
        # ext -> (data offset, size, (uid, header size) of the data: image members only, None
        # when not hashed)
        cur: dict[str, tuple[int, int, tuple[str, tuple[int, int] | None] | None]] = {}

        def flush() -> None:
            if cur_key is None:
                return
            images = [e for e in IMAGE_EXTENSIONS if e in cur]
            if not images:
                scan.members_without_image += 1
                scan._example("members_without_image", cur_key)
                found = ", ".join(f".{e}" for e in cur) or "none"
                scan.skipped.append((cur_key, "no_image", f"record has no image member (members: {found}; "
                                     f"an image is one of {', '.join('.' + e for e in IMAGE_EXTENSIONS)})"))
                return
            if cur_key in seen:
                scan.duplicate_keys += 1
                scan._example("duplicate_keys", cur_key)
                scan.skipped.append((cur_key, "duplicate_key", f"key repeats a record earlier in shard {shard}; "
                                     "the first record with this key is kept"))
                return
            seen.add(cur_key)
            scan.extra_images += len(images) - 1
            ext = images[0]
            offset, size, hashed = cur[ext]
            scan.keys.append(cur_key)
            scan.image_ext.append(ext)
            scan.image_offset.append(offset)
            scan.image_size.append(size)
            uid, wh = hashed if hashed is not None else _hash_member(f, offset, size)
            scan.uid.append(uid)
            scan.width.append(wh[0] if wh else None)
            scan.height.append(wh[1] if wh else None)
            for side, offsets, sizes in (
                ("txt", scan.txt_offset, scan.txt_size),
                ("json", scan.json_offset, scan.json_size),
            ):
                where = cur.get(side)
                offsets.append(where[0] if where else None)
                sizes.append(where[1] if where else None)
            # The caption: the .txt, and only without one the .json (read from the blocks the scan fetched).
            txt, js = cur.get("txt"), cur.get("json")
            caption = caption_from_txt(_read_member(f, txt[0], txt[1])) if txt else None
            if caption is None and js:
                caption = caption_from_json(_read_member(f, js[0], js[1]), caption_field)
            scan.caption_words.append(caption_words(caption))

        try:
            for name, typeflag, offset, size in _iter_members(f, scan.size, shard):
                if typeflag == b"5" or (typeflag in _REGULAR and name.endswith("/")):
                    continue  # directories carry no record
                scan.members += 1
                if typeflag not in _REGULAR:
                    scan.ignored_members += 1
                    continue
                key, ext = split_key(name)
                if not key or not ext:
                    scan.ignored_members += 1
                    continue
                if key != cur_key:
                    flush()
                    cur_key, cur = key, {}
                if ext in cur:
                    # The same key and extension again inside one record: keep the first.
                    scan.duplicate_keys += 1
                    scan._example("duplicate_keys", key)
                    scan.skipped.append((key, "duplicate_key", f"member {name!r} repeats the .{ext} member of its "
                                         "record; the first one is kept"))
                    continue
                # Image data is hashed now, while the scan passes it (a record whose key was
                # seen is dropped whole: nothing to hash).
                hashed = _hash_member(f, offset, size) if ext in IMAGE_EXTENSIONS and key not in seen else None
                cur[ext] = (offset, size, hashed)
            flush()
        except OSError as exc:
            raise ShardError(shard, f"shard {shard} could not be read: {exc}") from exc
    return scan
