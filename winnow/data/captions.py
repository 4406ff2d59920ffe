"""A record's caption, one rule for every reader: the ``.txt`` sidecar, else a field of the ``.json``
sidecar; and its length in words, which the index records for the caption-length filter
(``min_caption_words``: DataComp's "more than 2 words"), so a record dropped for its caption is
never decoded.

>>> caption_from_txt(b"  a red  circle "), caption_from_json(b'{"meta": {"c": "two words"}}', "meta.c")
('a red  circle', 'two words')
>>> caption_words("a red  circle"), caption_words(None)
(3, None)
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    from winnow.rowgroups.fs import StorageOptions

#: What the index's ``caption_words`` column is, as recorded in its fingerprint.
CAPTION_WORDS = "whitespace-words-v1"


def caption_field_problem(field: object) -> str | None:
    """What is wrong with a ``caption_field`` knob, in words; None when it names a field."""
    if isinstance(field, str) and field.strip() and all(part.strip() for part in field.split(".")):
        return None
    return f"caption_field must name a .json field, e.g. 'caption' or 'meta.caption' (no empty parts), got {field!r}"


def caption_from_txt(data: bytes | None) -> str | None:
    """A ``.txt`` sidecar's caption: UTF-8 (bad bytes replaced), stripped; None when empty."""
    if data is None:
        return None
    text = data.decode("utf-8", errors="replace").strip()
    return text or None


def caption_from_json(data: bytes | None, field: str) -> str | None:
    """The string at ``field`` of a ``.json`` sidecar, stripped; None when the sidecar is missing
    or not JSON, the field is absent or not a string, or the string is blank.

    ``field`` is first looked up as one key (keys may contain dots), then as a dotted path.
    """
    if not data:
        return None
    try:
        obj = json.loads(data.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    value: Any = obj.get(field)
    if value is None and "." in field:
        value = obj
        for part in field.split("."):
            if not isinstance(value, dict):
                return None
            value = value.get(part)
    if not isinstance(value, str):
        return None
    return value.strip() or None


def caption_words(caption: str | None) -> int | None:
    """Words of a caption (runs of non-whitespace); None without a caption."""
    return None if caption is None else len(caption.split())


def read_captions(index: pa.Table, caption_field: str, *, storage: StorageOptions | None = None) -> list[str | None]:
    """Each index row's caption (``.txt`` first, then ``caption_field`` of the ``.json``), read
    by ranged reads of the sidecars (an object store's with the run's ``storage`` settings)."""
    from winnow.data.reader import read_members

    captions = [caption_from_txt(b) for b in read_members(index, "txt", storage=storage)]
    need_json = [i for i, c in enumerate(captions) if c is None]
    if need_json:
        has_json = index.column("json_offset").is_valid().to_numpy(zero_copy_only=False)
        need_json = [i for i in need_json if has_json[i]]
    if need_json:
        sub = index.take(pa.array(need_json, pa.int64()))
        for i, data in zip(need_json, read_members(sub, "json", storage=storage)):
            captions[i] = caption_from_json(data, caption_field)
    return captions
