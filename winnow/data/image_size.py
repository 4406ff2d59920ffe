"""The image-size filter's compute: an image's width and height from its header, never decoded.

The index reads every image's bytes once (to hash them); it takes the size from the first bytes
of that read (:func:`header_size`), so ``min_image_side`` and ``max_aspect_ratio``
(:data:`winnow.filters.FILTERS`) drop a record before anything decodes it.

>>> import io
>>> from PIL import Image
>>> buf = io.BytesIO(); Image.new("RGB", (96, 40)).save(buf, format="PNG")
>>> header_size(buf.getvalue()), header_size(b"not an image")
((96, 40), None)
"""

from __future__ import annotations

import io
import warnings

#: What the index's width and height columns are, as recorded in its fingerprint.
HEADER_SIZE = "pillow-header-v1"
#: Bytes of an image the header is looked for in (a JPEG's EXIF can push its frame header far in).
HEADER_BYTES = 1 << 20


def header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the image header in ``data`` (Pillow opens an image lazily: it
    parses the header and decodes no pixel); None when the header is not there or not an image
    Pillow knows (the embed stage then finds the record undecodable)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's decompression-bomb warning: the size is what we want
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Exception:  # noqa: BLE001 - any parse error means "size unknown", never a failure
        return None
    return (int(width), int(height)) if width > 0 and height > 0 else None
