"""Score histograms of a run and what other thresholds would keep, from committed scores.

A 2-D histogram (aesthetic x nsfw) of the decoded, non-duplicate records answers "how many would
be kept with thresholds (a, n)" exactly up to the bin width, without recomputing anything.
Duplicate flags stay as the run's dedup found them (dedup ran on the records the run's
thresholds kept). Runs with more row groups than ``max_row_groups`` are estimated from an
evenly spaced sample of row groups, and say so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.parquet as pq

from winnow.report.gallery import thresholds
from winnow.rowgroups import CommitStore, RowGroupPlan

AESTHETIC_BINS = 60
NSFW_BINS = 40


def _read(store: CommitStore, stage: str, p: int, rg: int, column: str) -> np.ndarray | None:
    try:
        with store.fs.open_input_file(store.row_group_path(stage, p, rg)) as f:
            return pq.read_table(f, columns=["record_id", column]).sort_by("record_id").column(column).to_numpy(
                zero_copy_only=False)
    except (FileNotFoundError, OSError):
        return None


def score_histograms(run_root: str, plan: RowGroupPlan, *, max_row_groups: int = 2000) -> dict[str, Any]:
    """Histograms of the row groups whose embed, aesthetic and nsfw are all committed."""
    store = CommitStore(run_root)
    g = plan.num_row_groups
    step = max(1, -(-g // max_row_groups))
    chosen = range(0, g, step)
    aes: list[np.ndarray] = []
    nsfw: list[np.ndarray] = []
    counts = {"records": 0, "undecodable": 0, "duplicates": 0, "row_groups": 0}
    listed: dict[tuple[str, int], set[int]] = {}

    def committed(stage: str, p: int) -> set[int]:
        if (stage, p) not in listed:
            listed[(stage, p)] = store.completed(stage, p)
        return listed[(stage, p)]

    for rg in chosen:
        p = plan.partition_of(rg)
        if not all(rg in committed(s, p) for s in ("embed", "aesthetic", "nsfw")):
            continue
        err = _read(store, "embed", p, rg, "error")
        a = _read(store, "aesthetic", p, rg, "aesthetic_score")
        n = _read(store, "nsfw", p, rg, "nsfw_score")
        if err is None or a is None or n is None or not len(err) == len(a) == len(n):
            continue
        ok = np.array([e is None for e in err])
        if rg in committed("dedup", p):
            d = _read(store, "dedup", p, rg, "duplicate")
            dup = np.zeros(len(ok), bool) if d is None else np.array([bool(x) for x in d])
        else:
            dup = np.zeros(len(ok), bool)
        counts["row_groups"] += 1
        counts["records"] += len(ok)
        counts["undecodable"] += int((~ok).sum())
        counts["duplicates"] += int((ok & dup).sum())
        keep = ok & ~dup
        aes.append(np.asarray(a[keep], dtype=np.float64))
        nsfw.append(np.asarray(n[keep], dtype=np.float64))
    a_all = np.concatenate(aes) if aes else np.empty(0)
    n_all = np.concatenate(nsfw) if nsfw else np.empty(0)
    limits = thresholds(store)
    a_edges = _edges(a_all, limits.get("aesthetic"), AESTHETIC_BINS)
    n_edges = np.linspace(0.0, 1.0, NSFW_BINS + 1)
    joint, _, _ = np.histogram2d(np.clip(a_all, a_edges[0], a_edges[-1]), np.clip(n_all, 0.0, 1.0),
                                 bins=[a_edges, n_edges])
    ta, tn = limits.get("aesthetic"), limits.get("nsfw")
    kept_now = int(((a_all >= ta) & (n_all < tn)).sum()) if ta is not None and tn is not None else None
    return {
        "aesthetic_edges": [round(float(x), 6) for x in a_edges],
        "nsfw_edges": [round(float(x), 6) for x in n_edges],
        # joint[i][j]: records with aesthetic in bin i and nsfw in bin j
        "joint": joint.astype(int).tolist(),
        "thresholds": limits,
        "scored": int(len(a_all)),
        "kept_at_thresholds": kept_now,
        **counts,
        "sampled": step > 1,
        "row_groups_total": g,
    }


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
    return edges[: bins + 1] if edges[bins] >= hi else edges
