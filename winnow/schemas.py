"""Column layout of every stage's row-group Parquet: one place, so no stage re-derives another's.

``record_id`` is the record's position in the run's index (its global, stable order); ``key`` is
the WebDataset ``__key__`` and survives to the output.
"""

from __future__ import annotations

import pyarrow as pa

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
        ("aesthetic_keep", pa.bool_()),  # score >= threshold; false when there is no embedding
    ]
)

NSFW = pa.schema(
    [
        ("record_id", pa.int64()),
        ("nsfw_score", pa.float32()),  # probability in [0, 1]; null when there is no embedding
        ("nsfw_keep", pa.bool_()),  # score < threshold; false when there is no embedding
    ]
)

DEDUP = pa.schema(
    [
        ("record_id", pa.int64()),
        ("duplicate", pa.bool_()),  # true when a higher-ranked member of its cluster is near
        ("duplicate_of", pa.int64()),  # record_id of that member; null otherwise
    ]
)


def write_schema(dim: int) -> pa.Schema:
    """The curated Parquet written beside each output tar (kept records only)."""
    return pa.schema(
        [
            ("record_id", pa.int64()),
            ("key", pa.string()),
            ("shard", pa.string()),
            ("caption", pa.string()),
            ("json", pa.string()),
            ("aesthetic_score", pa.float32()),
            ("nsfw_score", pa.float32()),
            ("embedding", embedding_type(dim)),
        ]
    )
