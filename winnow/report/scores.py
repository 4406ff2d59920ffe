"""Score histograms of a run and what other thresholds would keep, from committed files.

One histogram per filter of :data:`winnow.filters.FILTERS` (its value over the records that are
neither exact duplicates, undecodable nor near duplicates), with the run's threshold on a bin
edge, so "how many does this threshold keep" is exact. The what-if counts every combination of
thresholds at once: each record of the same population is a tuple of bin indices (one per
filter; -1 where it has no value), and ``whatif.cells`` lists each distinct tuple with how many
records have it: a threshold on a bin edge keeps or drops whole bins, so the client sums the
cells every filter keeps. Duplicate flags stay as the run's dedup found them (dedup ran on the
records the run's thresholds kept), and records a before-decode filter dropped were never
scored (they have no score to keep them by a later filter).

For a filter with a keep fraction, a quantile table says which threshold each fraction 0.01,
0.02 ... 1.00 would pick and how many records that threshold keeps, computed exactly as the
thresholds step does (:func:`winnow.stages.thresholds.keep_count`, the k-th best) over every
record that has the value. The thresholds shown are the ones the run used (its thresholds
step), None while the run has not reached that step.

Runs with more row groups than ``max_row_groups`` are estimated from an evenly spaced sample of
row groups, and say so (``sampled``; ``scale``: row groups of the run per row group read); the
what-if cells hold at most :data:`MAX_WHATIF_RECORDS` records (``whatif.scale`` likewise).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from winnow.exceptions import WinnowError
from winnow.filters import FILTERS, FilterSpec
from winnow.report.gallery import enabled, filters, thresholds
from winnow.rowgroups import CommitStore, RowGroupPlan, RunRoot
from winnow.stages.kept import filter_arrays, filter_columns, read_present
from winnow.stages.thresholds import keep_count

BINS = 50
#: Most records the what-if cells are made of (an even sample of the records read beyond it).
MAX_WHATIF_RECORDS = 50_000
#: The keep fractions of the quantile tables: 0.01, 0.02 ... 1.00 (i / 100 is the double nearest
#: each decimal, the same value a DAG param of that decimal holds).
FRACTIONS = tuple(i / 100 for i in range(1, 101))


def _read(store: CommitStore, stage: str, p: int, rg: int, columns: list[str]) -> pa.Table | None:
    """Those of ``columns`` a committed row group holds (and record_id), in record order; None
    when it is not committed or unreadable."""
    try:
        return read_present(store, stage, p, rg, ["record_id", *columns]).sort_by("record_id")
    except (FileNotFoundError, OSError, pa.ArrowInvalid, WinnowError):
        return None


def _row_group(store: CommitStore, p: int, rg: int, committed: Any) -> dict[str, Any] | None:
    """One row group's filter columns (NaN: none; booleans for a missing-value rule) and flags in
    record order, and which filter stages it had committed; None when the index or embed is not
    readable or a stage holds other records than the index (computed from another index)."""
    wanted = filter_columns()
    index = _read(store, "index", p, rg, ["exact_duplicate_of", *wanted.get("index", [])])
    embed = _read(store, "embed", p, rg, ["error", *wanted.get("embed", [])])  # the caller saw it committed
    if index is None or embed is None:
        return None
    ids = index.column("record_id").to_numpy()
    n = len(ids)
    tables: dict[str, pa.Table | None] = {"index": index, "embed": embed}
    for stage in wanted:
        if stage not in tables and rg in committed(stage, p):
            tables[stage] = _read(store, stage, p, rg, wanted[stage])
    dedup = _read(store, "dedup", p, rg, ["duplicate"]) if rg in committed("dedup", p) else None
    for t in (dedup, *tables.values()):
        if t is not None and not np.array_equal(t.column("record_id").to_numpy(), ids):
            return None
    x: dict[str, Any] = filter_arrays(tables, n)
    exact = (index.column("exact_duplicate_of").is_valid().to_numpy(zero_copy_only=False)
             if "exact_duplicate_of" in index.column_names else np.zeros(n, bool))
    failed = embed.column("error").is_valid().to_numpy(zero_copy_only=False)
    dup = (dedup.column("duplicate").fill_null(False).to_numpy(zero_copy_only=False)
           if dedup is not None and "duplicate" in dedup.column_names else np.zeros(n, bool))
    x["exact"] = np.asarray(exact, bool)
    x["undecodable"] = ~x["exact"] & np.asarray(failed, bool)
    x["duplicate"] = np.asarray(dup, bool) & ~x["exact"] & ~x["undecodable"]
    x["stages_read"] = {stage: stage in tables for stage in wanted}
    return x


def quantile_table(scores: np.ndarray, spec: FilterSpec | None = None) -> list[dict[str, Any]]:
    """For each keep fraction f of :data:`FRACTIONS`: the threshold it picks over ``scores``
    (float32, NaN skipped) as the thresholds step picks it (``keep_count(f, n)`` records: the
    best, or for a filter that keeps low values (``spec.keep`` ``<``/``<=``) the lowest; the
    threshold that keeps them and their ties), and how many scores that threshold keeps. Empty
    without any score.

    >>> [(r["fraction"], r["threshold"], r["keeps"]) for r in quantile_table(np.array([1, 3, 3, 2], np.float32))][::25]
    [(0.01, 3.0, 2), (0.26, 3.0, 2), (0.51, 3.0, 2), (0.76, 2.0, 3)]
    """
    from winnow.stages.thresholds import lowest_kept_threshold

    values = np.sort(np.asarray(scores, np.float32)[~np.isnan(scores)])  # ascending
    n = len(values)
    if n == 0:
        return []
    low_kept = spec is not None and spec.keep != ">="
    rows = []
    for f in FRACTIONS:
        k = keep_count(f, n)
        if low_kept:
            t = lowest_kept_threshold(spec, float(values[k - 1]))  # keeps the k lowest and their ties
            keeps = int(spec.passes(values, t).sum())
        else:
            t = float(values[n - k])  # the k-th best
            keeps = n - int(np.searchsorted(values, t, side="left"))
        rows.append({"fraction": f, "threshold": float(t), "keeps": keeps})
    return rows


def _bins(values: np.ndarray, edges: list[float], *, closed_right: bool = False, unknown: int = -1) -> np.ndarray:
    """Each value's bin: edges[i] <= v < edges[i+1], or with ``closed_right`` edges[i] < v <=
    edges[i+1] (a filter keeping values at most the threshold keeps the bin that ends at it,
    the threshold's own value included); ``unknown`` for NaN. Compared in the values' own
    precision against the edges as published, as the filters compare (a float32 score with a
    float32 threshold), so a slider on an edge counts exactly what that threshold keeps."""
    cut = np.asarray(edges, dtype=values.dtype if values.dtype.kind == "f" else np.float64)
    side = "left" if closed_right else "right"
    b = np.clip(np.searchsorted(cut, values, side=side) - 1, 0, len(cut) - 2)
    return np.where(np.isnan(values), unknown, b).astype(np.int32)


def score_histograms(run_root: RunRoot | str, plan: RowGroupPlan, *, max_row_groups: int = 2000) -> dict[str, Any]:
    """Histograms of the row groups whose index and embed are committed (each filter's columns
    from the row groups whose stage of that filter is committed too), the what-if cells and
    the quantile tables."""
    store = CommitStore(run_root)
    g = plan.num_row_groups
    step = max(1, -(-g // max_row_groups))
    listed: dict[tuple[str, int], set[int]] = {}

    def committed(stage: str, p: int) -> set[int]:
        if (stage, p) not in listed:
            listed[(stage, p)] = store.completed(stage, p)
        return listed[(stage, p)]

    parts: list[dict[str, Any]] = []
    without: dict[str, int] = {}
    for rg in range(0, g, step):
        p = plan.partition_of(rg)
        if rg not in committed("embed", p):
            continue
        x = _row_group(store, p, rg, committed)
        if x is None:
            continue
        for stage, read in x.pop("stages_read").items():
            without[stage] = without.get(stage, 0) + (not read)
        parts.append(x)

    def cat(name: str, dtype: Any) -> np.ndarray:
        return np.concatenate([x[name] for x in parts]) if parts else np.empty(0, dtype)

    columns = {name: cat(name, np.float32) for name in (parts[0] if parts else {})
               if name not in ("exact", "undecodable", "duplicate")}
    exact, undecodable, duplicate = cat("exact", bool), cat("undecodable", bool), cat("duplicate", bool)
    shown = ~exact & ~undecodable & ~duplicate
    entries = filters(store)
    limits = thresholds(store, entries)
    on = enabled(entries)
    sampled = step > 1

    out_filters: list[dict[str, Any]] = []
    bins: list[np.ndarray] = []
    keeps_all = np.ones(int(shown.sum()), bool)
    known = entries is not None
    for spec in FILTERS:
        values = spec.values_of(columns) if parts else np.empty(0, np.float32)
        entry = (entries or {}).get(spec.name) or {}
        t = limits[spec.name]
        mine = values[shown]
        have = mine[~np.isnan(mine)].astype(np.float64)
        run_t = t if on[spec.name] else None
        closed_right = spec.keep == "<="
        edges = _rounded(_edges(have, run_t, BINS, spec.edges_range, closed_right=closed_right), run_t)
        has_value = (np.asarray(columns[spec.missing.column], bool)[shown] if spec.missing is not None and parts
                     else np.ones(len(mine), bool))
        # A value no one knows (an unreadable image header) is -2 where the filter lets it pass.
        b = _bins(mine, edges, closed_right=closed_right, unknown=-2 if spec.unknown_passes else -1)
        counts = np.bincount(b[b >= 0], minlength=len(edges) - 1)
        passes = spec.passes(mine, t) & has_value
        unread = without.get(spec.stage, 0)
        if on[spec.name]:
            keeps_all &= passes
            known = known and not unread and t is not None
        b[~has_value] = -1
        bins.append(b)
        out_filters.append({
            "name": spec.name, "label": spec.label, "keep": spec.keep, "outcome": spec.outcome,
            "before_decode": spec.before_decode, "threshold_param": spec.threshold.name,
            "fraction_param": spec.fraction.name if spec.fraction else None, "off": spec.off,
            "integer": spec.threshold.integer, "enabled": on[spec.name], "threshold": t, "run_fraction": entry.get("keep_fraction"),
            "edges": edges,
            "counts": counts.astype(int).tolist(),
            "scored": int(len(have)),
            # by this filter alone, of the records shown; None while it is off or not known
            "kept_at_threshold": int(passes.sum()) if on[spec.name] and t is not None else None,
            "missing": None if spec.missing is None else {
                "outcome": spec.missing.outcome, "records": int((~has_value).sum())},
            "row_groups_without": unread,
            # fraction -> the threshold it picks and how many records (of every scored one) it keeps
            "fraction_table": quantile_table(values, spec) if spec.fraction is not None else None,
            "fraction_scored": int((~np.isnan(values)).sum()) if spec.fraction is not None else None,
        })

    population = int(shown.sum())
    take = np.arange(population)
    if population > MAX_WHATIF_RECORDS:
        take = np.linspace(0, population - 1, MAX_WHATIF_RECORDS).round().astype(np.int64)
    cells: list[list[int]] = []
    if population and bins:
        matrix = np.stack([b[take] for b in bins], axis=1)
        unique, freq = np.unique(matrix, axis=0, return_counts=True)
        cells = [[*map(int, row), int(c)] for row, c in zip(unique, freq)]
    counts = {"records": int(len(exact)), "exact_duplicates": int(exact.sum()), "undecodable": int(undecodable.sum()),
              "duplicates": int(duplicate.sum()), "row_groups": len(parts)}
    return {
        "filters": out_filters,
        "thresholds": limits,
        "entries": entries,
        "enabled": on,
        # records neither exact duplicates, undecodable nor near duplicates: what the histograms show
        "population": population,
        "kept_at_thresholds": int(keeps_all.sum()) if known else None,
        "whatif": {"cells": cells, "records": int(len(take)), "sampled": len(take) < population,
                   "scale": population / len(take) if len(take) else 1.0},
        **counts,
        "sampled": sampled,
        # row groups of the run per row group read: multiply a count by it to estimate the run's
        "scale": (g / counts["row_groups"]) if sampled and counts["row_groups"] else 1.0,
        "row_groups_total": g,
    }


def _rounded(edges: np.ndarray, threshold: float | None) -> list[float]:
    """Edges for JSON: 6 decimals, but the threshold's edge exactly the threshold."""
    return [float(x) if threshold is not None and x == threshold else round(float(x), 6) for x in edges]


def _edges(values: np.ndarray, threshold: float | None, bins: int, fixed: tuple[float, float] | None = None, *,
           closed_right: bool = False) -> np.ndarray:
    """About ``bins`` bin edges spanning the values (or the ``fixed`` range) and the threshold,
    with the threshold on an edge that is never the last one (a value equal to the threshold
    falls in the bin that starts at it), and the last edge above every value; with
    ``closed_right`` (bins that end at their upper edge) also the first edge below every value
    and the threshold."""
    lo, hi = fixed if fixed is not None else (0.0, 1.0)
    if len(values):
        lo, hi = min(lo, float(values.min())) if fixed else float(values.min()), \
            max(hi, float(values.max())) if fixed else float(values.max())
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    width = (hi - lo) / bins
    if threshold is not None:
        # Shift the grid so the threshold is an edge: the kept share at it is then exact.
        lo = threshold - np.ceil((threshold - lo) / width) * width
    if closed_right and lo >= min(float(values.min()) if len(values) else lo, threshold if threshold is not None else lo):
        lo -= width  # the first edge strictly below every value and the threshold
    count = int(np.floor((hi - lo) / width)) + 2  # the last edge strictly above hi
    edges = lo + width * np.arange(count)
    if threshold is not None:
        # Exactly the threshold (not within rounding of it): a score equal to it counts as kept.
        edges[int(np.argmin(np.abs(edges - threshold)))] = threshold
    return edges
