"""Column layout of every stage's row-group Parquet: one place, so no stage re-derives another's.

``record_id`` is the record's position in the run's index (its global, stable order); ``key`` is
the WebDataset ``__key__`` and survives to the output.
"""

from __future__ import annotations

import pyarrow as pa

from winnow.filters import OUTCOMES as FILTER_OUTCOMES
from winnow.filters import VALUE_COLUMNS as _VALUE_COLUMNS

#: Image member extensions the index accepts (lower case, without the dot).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

INDEX = pa.schema(
    [
        ("record_id", pa.int64()),
        ("shard", pa.string()),  # shard path or URI as listed under the input URI
        ("key", pa.string()),
        ("image_ext", pa.string()),
        ("image_offset", pa.int64()),  # offset of the member's data inside the tar
        ("image_size", pa.int64()),
        ("txt_offset", pa.int64()),  # null when the record has no .txt sibling
        ("txt_size", pa.int64()),
        ("json_offset", pa.int64()),  # null when the record has no .json sibling
        ("json_size", pa.int64()),
        # 128-bit id of the image bytes (32 lowercase hex digits): stable across reruns, run keys
        # and shard layouts (see winnow.data.tarscan.image_uid).
        ("uid", pa.string()),
        # record_id of the first indexed record with the same image bytes (the kept twin); null
        # for a first occurrence. Exact duplicates are never decoded nor embedded.
        ("exact_duplicate_of", pa.int64()),
        # The image's size from its header (never decoded); null when the header is unreadable.
        ("width", pa.int32()),
        ("height", pa.int32()),
        # Words of the caption (.txt, else the caption field of the .json); null without one.
        ("caption_words", pa.int32()),
    ]
)


def embedding_type(dim: int) -> pa.DataType:
    """L2-normalised float16 embeddings of a fixed width."""
    return pa.list_(pa.float16(), dim)


def embed_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("record_id", pa.int64()),
            ("key", pa.string()),
            ("embedding", embedding_type(dim)),  # null when the image could not be decoded
            ("error", pa.string()),  # null when decoded; else why not ("undecodable: ...")
        ]
    )


AESTHETIC = pa.schema(
    [
        ("record_id", pa.int64()),
        ("aesthetic_score", pa.float32()),  # null when there is no embedding
    ]
)

NSFW = pa.schema(
    [
        ("record_id", pa.int64()),
        ("nsfw_score", pa.float32()),  # probability in [0, 1]; null when there is no embedding
    ]
)

DEDUP = pa.schema(
    [
        ("record_id", pa.int64()),
        ("duplicate", pa.bool_()),  # true when a higher-ranked member of its cluster is near
        ("duplicate_of", pa.int64()),  # record_id of that member; null otherwise
    ]
)


#: The columns the filters compare (winnow.filters.VALUE_COLUMNS), with their Arrow types: status
#: rows, the curated Parquet and the gallery carry them.
VALUE_FIELDS: tuple[tuple[str, pa.DataType], ...] = tuple((n, pa.type_for_alias(t)) for n, t in _VALUE_COLUMNS)

#: Every outcome a record can have, in the order they are decided (first match wins): the
#: filters' outcomes (winnow.filters) between the facts of the index, decode and dedup.
OUTCOMES = FILTER_OUTCOMES
#: Outcomes of members the index skipped (they have no record_id).
SKIPPED_OUTCOMES = ("no_image", "duplicate_key")

STATUS = pa.schema(
    [
        ("record_id", pa.int64()),  # null for a member the index skipped
        ("key", pa.string()),
        ("shard", pa.string()),
        ("uid", pa.string()),  # null for a member without an image
        ("outcome", pa.string()),  # one of OUTCOMES or SKIPPED_OUTCOMES
        ("reason", pa.string()),  # why, in words (the decode error, the score and threshold...)
        *VALUE_FIELDS,  # what each filter compared (aesthetic_score, nsfw_score, clip_score...)
        ("duplicate_of", pa.int64()),  # record_id of the kept twin (exact or near duplicate)
        ("duplicate_of_key", pa.string()),
    ]
)


def write_schema(dim: int) -> pa.Schema:
    """The curated Parquet written beside each output tar (kept records only)."""
    return pa.schema(
        [
            ("record_id", pa.int64()),
            ("uid", pa.string()),
            ("key", pa.string()),
            ("shard", pa.string()),
            ("caption", pa.string()),
            ("json", pa.string()),
            *VALUE_FIELDS,
            ("embedding", embedding_type(dim)),
        ]
    )
