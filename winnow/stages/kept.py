"""The one outcome rule: what happens to each indexed record, first match wins.

``exact_duplicate`` (its image bytes equal an earlier record's: never decoded), in a run with a
corpus ``takedown`` and ``corpus_duplicate`` as its pre-check found them (never decoded either:
:mod:`winnow.stages.corpus`), then the filters
decided from the index (:data:`winnow.filters.BEFORE_DECODE`: never decoded either),
``undecodable`` (the embed stage's error), then the other filters in their declared order (a
filter with a missing-value rule drops records without a value first, e.g. ``no_caption``), then
``duplicate`` (a near duplicate of a kept record, from dedup) or ``kept``. A filter that is off
drops nothing. The thresholds are the ones the ``thresholds`` step committed for the run
(:mod:`winnow.stages.thresholds`).

Dedup's candidates are the records that pass the filters (:func:`row_group_filters`); the
``status`` stage writes every record's outcome; write and the counts read ``status``. Nothing
else decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from winnow.exceptions import StorageError
from winnow.filters import AFTER_DECODE, BEFORE_DECODE, CORPUS_OUTCOMES, FILTERS, FilterSpec
from winnow.rowgroups import CommitStore
from winnow.stages.thresholds import as_scores, load_thresholds

#: One row group's filter inputs in record order (see :func:`read_filter_inputs`).
FilterInputs = dict[str, np.ndarray]


def filter_outcomes(thresholds: dict[str, Any], x: FilterInputs) -> np.ndarray:
    """Each record's outcome before dedup: ``""`` when it passes every filter, else the first
    outcome that drops it (an object array of str). ``thresholds``: the committed thresholds step
    (a filter it has no entry for, e.g. one added after the run's thresholds, is off)."""
    out = np.full(len(x["decoded"]), "", dtype=object)

    def mark(mask: np.ndarray, outcome: str) -> None:
        out[(out == "") & mask] = outcome

    def apply(spec: FilterSpec) -> None:
        entry = thresholds.get(spec.name)
        if entry is None or not entry.get("enabled", True):
            return
        if spec.missing is not None:
            mark(~np.asarray(x[spec.missing.column], bool), spec.missing.outcome)
        mark(~spec.passes(spec.values_of(x), entry["threshold"]), spec.outcome)

    mark(x["exact_duplicate"], "exact_duplicate")
    corpus = x.get("corpus_outcome")  # a run with a corpus: its pre-check's takedowns and known bytes
    if corpus is not None:
        for outcome in CORPUS_OUTCOMES:
            mark(corpus == outcome, outcome)
    for spec in BEFORE_DECODE:
        apply(spec)
    mark(~x["decoded"], "undecodable")
    for spec in AFTER_DECODE:
        apply(spec)
    return out


def _aligned(table: pa.Table, ids: np.ndarray, stage: str, rg: int) -> pa.Table:
    if not np.array_equal(table.column("record_id").to_numpy(), ids):
        raise StorageError(
            f"row group {rg}: stage {stage!r} holds other records than the index; it was computed from "
            f"another index. Recompute stage {stage!r} with overwrite=true."
        )
    return table


def filter_columns() -> dict[str, list[str]]:
    """Stage -> the columns the filters read from it (each stage's file is read once)."""
    wanted: dict[str, list[str]] = {}
    for spec in FILTERS:
        cols = wanted.setdefault(spec.stage, [])
        for name in (*spec.column_names, *((spec.missing.column,) if spec.missing else ())):
            if name not in cols:
                cols.append(name)
    return wanted


def read_present(store: CommitStore, stage: str, p: int, rg: int, columns: list[str]) -> pa.Table:
    """``columns`` of a committed row group, those its file holds: a filter column may be absent
    (embed writes ``watermark_score`` only while the watermark filter is on, and not in runs made
    before it). One open of the file, as :meth:`CommitStore.read_table`."""
    path = store.row_group_path(stage, p, rg)
    try:
        with store.fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            names = set(parquet.schema_arrow.names)
            return parquet.read(columns=[c for c in dict.fromkeys(columns) if c in names])
    except FileNotFoundError:
        store.read_table(stage, p, rg, columns=[])  # raises the store's StorageError naming the stage
        raise


#: The boolean columns of the filters' missing-value rules (``has_caption``...).
MISSING_COLUMNS = frozenset(spec.missing.column for spec in FILTERS if spec.missing is not None)


def filter_arrays(tables: Mapping[str, pa.Table | None], n: int) -> FilterInputs:
    """Every column a filter reads (:func:`filter_columns`), from each stage's table in
    ``tables`` (None or absent: that stage was not read): floats with NaN for null, booleans for a
    missing-value rule's column; a column its table does not hold reads as NaN (false)."""
    x: FilterInputs = {}
    for stage, columns in filter_columns().items():
        table = tables.get(stage)
        for name in columns:
            present = table is not None and name in table.column_names
            if name in MISSING_COLUMNS:
                x[name] = (np.asarray(table.column(name).fill_null(False).to_numpy(zero_copy_only=False), bool)
                           if present else np.zeros(n, bool))
            else:
                x[name] = as_scores(table.column(name)) if present else np.full(n, np.nan, np.float32)
    return x


def read_filter_inputs(store: CommitStore, p: int, rg: int) -> FilterInputs:
    """One row group's filter inputs in record order: ``record_id``, ``exact_duplicate``,
    ``exact_duplicate_of``, ``decoded``, ``error`` (the decode error; None: decoded or never
    decoded) and every column a filter reads (floats with NaN for null; booleans for a
    missing-value rule's column). A filter column its stage's file does not hold reads as NaN
    (false for a missing-value rule's column)."""
    wanted = filter_columns()
    index_cols = [c for c in wanted.get("index", []) if c not in ("record_id", "exact_duplicate_of")]
    index = store.read_table("index", p, rg, columns=["record_id", "exact_duplicate_of", *index_cols])
    ids = index.column("record_id").to_numpy()
    twin = index.column("exact_duplicate_of")
    embed = _aligned(read_present(store, "embed", p, rg, ["record_id", "error", *wanted.get("embed", [])]),
                     ids, "embed", rg)
    error = embed.column("error")
    exact = twin.is_valid().to_numpy(zero_copy_only=False)
    from winnow.stages.corpus_matches import pre_outcomes

    corpus = pre_outcomes(store, ids)
    never_decoded = exact if corpus is None else exact | (corpus != "")
    tables: dict[str, pa.Table | None] = {"index": index, "embed": embed}
    for stage, columns in wanted.items():
        if stage not in tables:
            tables[stage] = _aligned(read_present(store, stage, p, rg, ["record_id", *columns]), ids, stage, rg)
    return {
        "record_id": ids,
        "exact_duplicate": exact,
        "exact_duplicate_of": twin.to_numpy(zero_copy_only=False),
        "decoded": error.is_null().to_numpy(zero_copy_only=False) & ~never_decoded,
        "error": np.array(error.to_pylist(), dtype=object),
        **({} if corpus is None else {"corpus_outcome": corpus}),
        **filter_arrays(tables, len(ids)),
    }


def row_group_filters(store: CommitStore, p: int, rg: int) -> tuple[FilterInputs, np.ndarray]:
    """A row group's filter inputs and each record's outcome before dedup (``""``: passed)."""
    x = read_filter_inputs(store, p, rg)
    return x, filter_outcomes(load_thresholds(store), x)


def passed_filters(store: CommitStore, p: int, rg: int) -> tuple[np.ndarray, np.ndarray]:
    """``(record_ids, passed)``: the records of a row group that go on to dedup."""
    x, out = row_group_filters(store, p, rg)
    return x["record_id"], out == ""
