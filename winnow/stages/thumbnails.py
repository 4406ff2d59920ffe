"""Gallery thumbnails made by the write stage: a bounded sample per row group and outcome.

Per row group the write stage keeps up to ``per_outcome`` records of each outcome (:data:`OUTCOMES`:
kept and every reason to drop one), plus the record each sampled near duplicate duplicates, as
~256 px JPEGs concatenated in ``rg<id>.thumbs`` and described (offset, size, scores, reason) by
``rg<id>.gallery`` (Parquet). Both are committed before the row group's ``.parquet`` marker, so a
committed row group always has its gallery; the api-server serves the bytes by offset and never
decodes an image.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pyarrow as pa

from winnow.schemas import OUTCOMES as SCHEMA_OUTCOMES
from winnow.schemas import VALUE_FIELDS

# Not ".parquet": a reader globbing the curated rg*.parquet files must never pick it up.
GALLERY_SUFFIX = ".gallery"
THUMBS_SUFFIX = ".thumbs"
#: The gallery's outcomes in display order: kept, then the reasons to drop a record in the order
#: they are decided (:data:`winnow.schemas.OUTCOMES`, kept moved first).
OUTCOMES = ("kept", *(o for o in SCHEMA_OUTCOMES if o != "kept"))
#: Larger inputs are not decoded for a thumbnail (the embed stage's own bomb limit is higher).
MAX_THUMB_SOURCE_PIXELS = 40_000_000

GALLERY_SCHEMA = pa.schema([
    ("record_id", pa.int64()),
    ("key", pa.string()),
    ("outcome", pa.string()),
    ("error", pa.string()),
    *VALUE_FIELDS,  # what each filter compared (winnow.filters)
    ("duplicate_of", pa.int64()),
    ("duplicate_of_key", pa.string()),
    ("thumb_offset", pa.int64()),
    ("thumb_size", pa.int32()),
    ("original_thumb_offset", pa.int64()),
    ("original_thumb_size", pa.int32()),
])


def make_thumbnail(data: bytes | None, *, px: int = 256, quality: int = 80) -> bytes | None:
    """JPEG bytes of ``data`` scaled to fit ``px`` x ``px``; None when it cannot be decoded."""
    if not data:
        return None
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_THUMB_SOURCE_PIXELS:
                return None
            img.draft("RGB", (px, px))  # JPEG: decode at a reduced scale, much cheaper
            img = img.convert("RGBA") if img.mode in ("P", "PA", "LA") else img
            if img.mode == "RGBA":
                bg = Image.new("RGB", img.size, (255, 255, 255))
                bg.paste(img, mask=img.split()[-1])
                img = bg
            img = img.convert("RGB")
            img.thumbnail((px, px))
            out = io.BytesIO()
            img.save(out, format="JPEG", quality=quality, optimize=True)
            return out.getvalue()
    except Exception:  # noqa: BLE001 - any decoder error means "no thumbnail", never a failure
        return None


def sample_rows(outcomes: list[str], record_ids: np.ndarray, per_outcome: int) -> list[int]:
    """Row positions of up to ``per_outcome`` records per outcome, chosen by a hash of the
    record id: spread over the row group, and the same on every run (output stays reproducible).
    """
    spread = (record_ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)
    chosen: list[int] = []
    for outcome in OUTCOMES:
        rows = [i for i, o in enumerate(outcomes) if o == outcome]
        rows.sort(key=lambda i: int(spread[i]))
        chosen.extend(rows[:per_outcome])
    return sorted(chosen)
