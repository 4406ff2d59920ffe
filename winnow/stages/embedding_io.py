"""Embedding columns <-> numpy matrices: the one place that knows how a fixed-size-list column
with null rows (undecodable images) maps to a dense ``(n_valid, dim)`` float16 matrix."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from winnow.exceptions import WinnowError
from winnow.schemas import embedding_type


def embedding_matrix(
    column: pa.ChunkedArray | pa.Array, *, expected_dim: int | None = None, where: str = "embedding column"
) -> tuple[np.ndarray, np.ndarray]:
    """``(valid, matrix)``: a bool mask of rows with an embedding, and those rows' vectors as a
    float16 ``(valid.sum(), dim)`` array, in row order."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_fixed_size_list(arr.type):
        raise WinnowError(f"{where}: expected a fixed-size list of float16, got {arr.type}")
    dim = arr.type.list_size
    if expected_dim is not None and dim != expected_dim:
        raise WinnowError(
            f"{where} holds {dim}-d embeddings but {expected_dim}-d ones are expected: the embed "
            "stage was computed with another model than this run's; recompute it (overwrite=true) "
            "or use the model it was computed with"
        )
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    # flatten() drops null rows and honours slicing offsets, unlike .values.
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return valid, flat.astype(np.float16, copy=False).reshape(-1, dim)


def embedding_array(matrix: np.ndarray, valid: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """The inverse: a float16 fixed-size-list array with null rows where ``valid`` is false."""
    matrix = np.asarray(matrix, dtype=np.float16)
    n, dim = (len(valid), matrix.shape[1]) if valid is not None else matrix.shape
    full = np.zeros((n, dim), dtype=np.float16)
    if valid is None:
        full[:] = matrix
        mask = None
    else:
        full[valid] = matrix
        mask = pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), type=embedding_type(dim), mask=mask)
