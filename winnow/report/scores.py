"""Score histograms of a run and what other thresholds would keep, from committed scores.

A 2-D histogram (aesthetic x nsfw) of the decoded, non-duplicate records answers "how many would
be kept with thresholds (a, n)" exactly up to the bin width, without recomputing anything; a
second one holds only the records that also pass the run's CLIP-score filter (the same while it
is off), so the run's own thresholds reproduce its kept count. Duplicate flags stay as the run's
dedup found them (dedup ran on the records the run's thresholds kept).

The CLIP-score histogram holds every record that has a CLIP score (exact duplicates and
undecodable records have none, nor do records without a caption). For the two filters that take
a keep fraction (aesthetic, clip_score), a quantile table says which threshold each fraction
0.01, 0.02 ... 1.00 would pick and how many records that threshold keeps, computed exactly as
the thresholds step does (:func:`winnow.stages.thresholds.keep_count`, the k-th best score) over
the scores read. The thresholds shown are the ones the run actually used (its thresholds step),
None while the run has not reached that step.

Runs with more row groups than ``max_row_groups`` are estimated from an evenly spaced sample of
row groups, and say so (``sampled``; ``scale``: row groups of the run per row group read).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from winnow.report.gallery import clip_filter_on, filters, thresholds
from winnow.rowgroups import CommitStore, RowGroupPlan
from winnow.stages.thresholds import RULES, as_scores, keep_count

AESTHETIC_BINS = 60
NSFW_BINS = 40
CLIP_BINS = 50
#: The keep fractions of the quantile tables: 0.01, 0.02 ... 1.00 (i / 100 is the double nearest
#: each decimal, the same value a DAG param of that decimal holds).
FRACTIONS = tuple(i / 100 for i in range(1, 101))
#: The filters a keep fraction can set (their scores are kept when at least the threshold).
FRACTION_FILTERS = ("aesthetic", "clip_score")


def _read(store: CommitStore, stage: str, p: int, rg: int, columns: list[str]) -> pa.Table | None:
    """Those of ``columns`` a committed row group holds (and record_id), in record order; None
    when it is not committed or unreadable."""
    try:
        with store.fs.open_input_file(store.row_group_path(stage, p, rg)) as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            table = pf.read(columns=["record_id", *(c for c in columns if c in names and c != "record_id")])
        return table.sort_by("record_id")
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return None


def _row_group(store: CommitStore, p: int, rg: int, with_clip: bool, with_dedup: bool) -> dict[str, np.ndarray] | None:
    """One row group's scores (NaN: none) and flags in record order; None when a stage's records
    differ from the index's (computed from another index) or a file is unreadable."""
    index = _read(store, "index", p, rg, ["exact_duplicate_of"])
    embed = _read(store, "embed", p, rg, ["error"])
    aes = _read(store, "aesthetic", p, rg, ["aesthetic_score"])
    nsfw = _read(store, "nsfw", p, rg, ["nsfw_score"])
    clip = _read(store, "clip_score", p, rg, ["clip_score", "has_caption"]) if with_clip else None
    dedup = _read(store, "dedup", p, rg, ["duplicate"]) if with_dedup else None
    tables = [t for t in (index, embed, aes, nsfw, clip, dedup) if t is not None]
    if index is None or embed is None or aes is None or nsfw is None or (with_clip and clip is None):
        return None
    ids = index.column("record_id").to_numpy()
    if any(not np.array_equal(t.column("record_id").to_numpy(), ids) for t in tables):
        return None
    n = len(ids)
    exact = (index.column("exact_duplicate_of").is_valid().to_numpy(zero_copy_only=False)
             if "exact_duplicate_of" in index.column_names else np.zeros(n, bool))
    failed = embed.column("error").is_valid().to_numpy(zero_copy_only=False)
    if clip is not None and "clip_score" in clip.column_names:
        c = as_scores(clip.column("clip_score"))
        has_caption = (clip.column("has_caption").fill_null(False).to_numpy(zero_copy_only=False)
                       if "has_caption" in clip.column_names else ~np.isnan(c))
    else:
        c, has_caption = np.full(n, np.nan, np.float32), np.zeros(n, bool)
    dup = (dedup.column("duplicate").fill_null(False).to_numpy(zero_copy_only=False)
           if dedup is not None and "duplicate" in dedup.column_names else np.zeros(n, bool))
    return {
        "exact": np.asarray(exact, bool),
        "decoded": ~np.asarray(exact, bool) & ~np.asarray(failed, bool),
        "aesthetic": as_scores(aes.column("aesthetic_score")),
        "nsfw": as_scores(nsfw.column("nsfw_score")),
        "clip": c,
        "has_caption": np.asarray(has_caption, bool),
        "clip_read": np.full(n, clip is not None),
        "duplicate": np.asarray(dup, bool),
    }


def quantile_table(scores: np.ndarray) -> list[dict[str, Any]]:
    """For each keep fraction f of :data:`FRACTIONS`: the threshold it picks over ``scores``
    (float32, NaN skipped) — the ``keep_count(f, n)``-th best score, what the thresholds step
    picks — and how many scores are at least it (the ties of the k-th included). Empty without
    any score.

    >>> [(r["fraction"], r["threshold"], r["keeps"]) for r in quantile_table(np.array([1, 3, 3, 2], np.float32))][::25]
    [(0.01, 3.0, 2), (0.26, 3.0, 2), (0.51, 3.0, 2), (0.76, 2.0, 3)]
    """
    values = np.sort(np.asarray(scores, np.float32)[~np.isnan(scores)])  # ascending
    n = len(values)
    if n == 0:
        return []
    rows = []
    for f in FRACTIONS:
        k = keep_count(f, n)
        t = values[n - k]  # the k-th best
        keeps = n - int(np.searchsorted(values, t, side="left"))
        rows.append({"fraction": f, "threshold": float(t), "keeps": keeps})
    return rows


def score_histograms(run_root: str, plan: RowGroupPlan, *, max_row_groups: int = 2000) -> dict[str, Any]:
    """Histograms of the row groups whose embed, aesthetic and nsfw are all committed (the
    CLIP-score columns of those whose clip_score is committed too), and the quantile tables."""
    store = CommitStore(run_root)
    g = plan.num_row_groups
    step = max(1, -(-g // max_row_groups))
    chosen = range(0, g, step)
    parts: list[dict[str, np.ndarray]] = []
    counts = {"records": 0, "exact_duplicates": 0, "undecodable": 0, "duplicates": 0, "row_groups": 0}
    clip_missing = 0
    listed: dict[tuple[str, int], set[int]] = {}

    def committed(stage: str, p: int) -> set[int]:
        if (stage, p) not in listed:
            listed[(stage, p)] = store.completed(stage, p)
        return listed[(stage, p)]

    for rg in chosen:
        p = plan.partition_of(rg)
        if not all(rg in committed(s, p) for s in ("embed", "aesthetic", "nsfw")):
            continue
        with_clip = rg in committed("clip_score", p)
        x = _row_group(store, p, rg, with_clip, rg in committed("dedup", p))
        if x is None:
            continue
        clip_missing += not with_clip
        counts["row_groups"] += 1
        counts["records"] += len(x["exact"])
        counts["exact_duplicates"] += int(x["exact"].sum())
        counts["undecodable"] += int((~x["exact"] & ~x["decoded"]).sum())
        counts["duplicates"] += int((x["decoded"] & x["duplicate"]).sum())
        parts.append(x)

    def cat(name: str, dtype: Any) -> np.ndarray:
        return np.concatenate([x[name] for x in parts]) if parts else np.empty(0, dtype)

    a, n, c = cat("aesthetic", np.float32), cat("nsfw", np.float32), cat("clip", np.float32)
    decoded, dup = cat("decoded", bool), cat("duplicate", bool)
    has_caption, clip_read = cat("has_caption", bool), cat("clip_read", bool)

    entries = filters(store)
    limits = thresholds(store, entries)
    clip_on = clip_filter_on(entries)
    ta, tn, tc = limits["aesthetic"], limits["nsfw"], limits["clip_score"]

    # The aesthetic x nsfw joint histograms: decoded, non-duplicate records with both scores.
    shown = decoded & ~dup & ~np.isnan(a) & ~np.isnan(n)
    a_all, n_all = a[shown].astype(np.float64), n[shown].astype(np.float64)
    clip_pass = RULES["clip_score"].passes(c[shown], tc) if clip_on else np.ones(len(a_all), bool)
    a_edges = _edges(a_all, ta, AESTHETIC_BINS)
    n_edges = np.linspace(0.0, 1.0, NSFW_BINS + 1)

    def joint(mask: np.ndarray) -> list[list[int]]:
        h, _, _ = np.histogram2d(np.clip(a_all[mask], a_edges[0], a_edges[-1]), np.clip(n_all[mask], 0.0, 1.0),
                                 bins=[a_edges, n_edges])
        return h.astype(int).tolist()

    # The run's kept count needs every filter's threshold, and the CLIP scores when that filter is on.
    known = ta is not None and tn is not None and clip_on is not None and not (clip_on and clip_missing)
    kept_now = int(((a_all >= ta) & (n_all < tn) & clip_pass).sum()) if known else None

    # The CLIP-score histogram: every record that has a CLIP score.
    c_all = c[~np.isnan(c)].astype(np.float64)
    c_edges = _edges(c_all, tc if clip_on else None, CLIP_BINS)
    c_counts, _ = np.histogram(np.clip(c_all, c_edges[0], c_edges[-1]), bins=c_edges)
    scored_decoded = decoded & clip_read

    sampled = step > 1
    fractions: dict[str, Any] = {}
    for name, values in (("aesthetic", a), ("clip_score", c)):
        entry = (entries or {}).get(name) or {}
        fractions[name] = {
            "keep": RULES[name].keep,
            "scored": int((~np.isnan(values)).sum()),
            "run_fraction": entry.get("keep_fraction"),
            "run_threshold": limits[name],
            "sampled": sampled,
            # fraction -> the threshold it picks and how many records (of "scored") that keeps
            "table": quantile_table(values),
        }
    return {
        "aesthetic_edges": _rounded(a_edges, ta),
        "nsfw_edges": [round(float(x), 6) for x in n_edges],
        # joint[i][j]: records with aesthetic in bin i and nsfw in bin j
        "joint": joint(np.ones(len(a_all), bool)),
        # the same, of the records that also pass the run's CLIP-score filter (= joint while it is off)
        "joint_clip_passed": joint(clip_pass),
        "thresholds": limits,
        "filters": entries,
        "clip_filter_on": clip_on,
        "scored": int(len(a_all)),
        "kept_at_thresholds": kept_now,
        "clip": {
            "edges": _rounded(c_edges, tc if clip_on else None),
            "counts": c_counts.astype(int).tolist(),
            "scored": int(len(c_all)),
            "threshold": tc,
            "enabled": clip_on,
            # by the CLIP-score filter alone; None while it is off or not known
            "kept_at_threshold": int((c_all >= tc).sum()) if clip_on and tc is not None else None,
            "no_caption": int((scored_decoded & ~has_caption).sum()),
            "row_groups_without_clip_score": clip_missing,
        },
        "keep_fractions": fractions,
        **counts,
        "sampled": sampled,
        # row groups of the run per row group read: multiply a count by it to estimate the run's
        "scale": (g / counts["row_groups"]) if sampled and counts["row_groups"] else 1.0,
        "row_groups_total": g,
    }


def _rounded(edges: np.ndarray, threshold: float | None) -> list[float]:
    """Edges for JSON: 6 decimals, but the threshold's edge exactly the threshold."""
    return [float(x) if threshold is not None and x == threshold else round(float(x), 6) for x in edges]


def _edges(values: np.ndarray, threshold: float | None, bins: int) -> np.ndarray:
    """Bin edges spanning the scores and the threshold, with the threshold on an edge."""
    lo = float(values.min()) if len(values) else 0.0
    hi = float(values.max()) if len(values) else 1.0
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    width = (hi - lo) / bins
    if threshold is not None:
        # Shift the grid so the threshold is an edge: the kept share at it is then exact.
        k = np.floor((threshold - lo) / width)
        lo = threshold - k * width
        if lo > float(values.min() if len(values) else lo):
            lo -= width
    edges = lo + width * np.arange(bins + 2)
    edges = edges[: bins + 1] if edges[bins] >= hi else edges
    if threshold is not None:
        # Exactly the threshold (not within rounding of it): a score equal to it counts as kept.
        edges[int(np.argmin(np.abs(edges - threshold)))] = threshold
    return edges
