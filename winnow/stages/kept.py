"""The one "kept" rule: a record is kept when it decoded, passed the aesthetic filter, passed the
NSFW filter and is not a duplicate. Dedup, the write stage and the report all apply it from here.

The heads give an undecodable record (no embedding) ``keep = false``, so "passed the filters"
already implies "decoded"; a null flag counts as not passed.

>>> import pyarrow as pa
>>> passed_filters(pa.array([True, True, None]), pa.array([True, False, True])).tolist()
[True, False, False]
>>> kept(pa.array([True, True]), pa.array([True, True]), pa.array([False, True])).tolist()
[True, False]
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

Flags = pa.Array | pa.ChunkedArray | np.ndarray


def flag(values: Flags) -> np.ndarray:
    """One filter's keep flags as a bool array; null (no embedding) is false."""
    if isinstance(values, np.ndarray):
        return values.astype(bool, copy=False)
    return values.fill_null(False).to_numpy(zero_copy_only=False).astype(bool, copy=False)


def passed_filters(aesthetic_keep: Flags, nsfw_keep: Flags) -> np.ndarray:
    """Records that go on to dedup: decoded and kept by both heads."""
    return flag(aesthetic_keep) & flag(nsfw_keep)


def kept(aesthetic_keep: Flags, nsfw_keep: Flags, duplicate: Flags) -> np.ndarray:
    """Records the write stage writes: passed both filters and not a duplicate."""
    return passed_filters(aesthetic_keep, nsfw_keep) & ~flag(duplicate)
