"""The thresholds step: exact keep-fraction quantiles in bounded memory over committed scores,
committed once per configuration, and the one outcome rule (status) that applies them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tests.stages._stage_rows import commit_embed, commit_filters, commit_index_rows, unit_rows
from winnow.rowgroups import CommitStore, RowGroupPlan
from winnow.rowgroups.task import RowGroupTask
from winnow.schemas import AESTHETIC, OUTCOMES, STATUS
from winnow.stages.dedup import DedupResult, dedup_table
from winnow.stages.status import COUNT_NAMES, StatusStage, count_outcomes
from winnow.stages.thresholds import committed, keep_count, kth_best, load_thresholds, thresholds_units


@pytest.mark.parametrize("seed", range(6))
def test_kth_best_is_exact_on_ties_negatives_and_tiny_spreads(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    x = (rng.normal(size=n) * [1e-4, 1, 1e3][seed % 3]).astype(np.float32)
    if seed % 2:
        x = np.round(x, 1).astype(np.float32)  # many ties
    x[rng.random(n) < 0.1] = np.nan  # no score
    chunks = np.array_split(x, 7)
    ranked = np.sort(x[~np.isnan(x)])[::-1]
    for k in {1, len(ranked), max(1, len(ranked) // 2), int(rng.integers(1, len(ranked) + 1))} if len(ranked) else ():
        assert kth_best(lambda: iter(chunks), k) == ranked[k - 1]


def _run_root(tmp_path, n=40, buffer_size=8):
    run_root = str(tmp_path / "run")
    plan = RowGroupPlan(n, buffer_size, max_partitions=3)
    bad = np.zeros(n, bool)
    bad[[0, 17 % n]] = True
    commit_index_rows(run_root, plan, exact_duplicate_of={5: 4, 30: 2} if n > 30 else {5: 4})
    commit_embed(run_root, plan, unit_rows(n, 16, seed=3), undecodable=bad)
    return run_root, plan, bad


def _rescore(run_root: str, plan: RowGroupPlan, scores: np.ndarray) -> None:
    store = CommitStore(run_root)
    for rg in range(plan.num_row_groups):
        a, b = plan.row_group_range(rg)
        store.commit_table("aesthetic", plan.partition_of(rg), rg, pa.table(
            {"record_id": pa.array(np.arange(a, b), pa.int64()),
             "aesthetic_score": pa.array(scores[a:b], pa.float32(), mask=np.isnan(scores[a:b]))}, schema=AESTHETIC))


def _status(run_root: str, plan: RowGroupPlan) -> pa.Table:
    store = CommitStore(run_root)
    out = []
    for rg in range(plan.num_row_groups):
        a, b = plan.row_group_range(rg)
        p = plan.partition_of(rg)
        store.commit_table("dedup", p, rg, dedup_table(np.arange(a, b), DedupResult(np.array([21]), np.array([20]))))
        table = StatusStage().process(RowGroupTask(run_root, plan, p, rg))
        store.commit_table("status", p, rg, table)
        out.append(table)
    return pa.concat_tables(out)


def test_keep_fraction_half_keeps_half_of_the_scored_records_plus_ties(tmp_path):
    run_root, plan, bad = _run_root(tmp_path)
    n = plan.num_records
    keep = np.ones(n, bool)
    commit_filters(run_root, plan, keep, keep, thresholds={"aesthetic_keep_fraction": 0.5})
    scores = np.round(np.random.default_rng(0).uniform(3, 7, n), 1).astype(np.float32)
    scores[[7, 8]] = scores[9]  # a tie group
    # Undecodable records and exact duplicates have no embedding, so no score.
    no_score = bad.copy()
    no_score[[5, 30]] = True
    scores[no_score] = np.nan
    _rescore(run_root, plan, scores)
    store = CommitStore(run_root)
    # The committed thresholds were computed from the old scores: recompute them for the new.
    store.fs.delete_file(store.path("thresholds", "thresholds.json"))
    from winnow.execution import LOCAL
    from winnow.stages.thresholds import ThresholdsConfig, run_thresholds

    fingerprint_digest = store.fingerprint_digest("thresholds")
    fp = type("F", (), {"digest": fingerprint_digest})()
    assert thresholds_units(store) == (1, set())
    out = run_thresholds(run_root, plan, ThresholdsConfig(aesthetic_keep_fraction=0.5), fp, execution=LOCAL)
    assert out["computed"] == 1 and thresholds_units(store) == (1, {0})
    scored = scores[~np.isnan(scores)]
    k = keep_count(0.5, len(scored))
    t = np.sort(scored)[::-1][k - 1]
    assert out["thresholds"]["aesthetic"] == pytest.approx(t) and load_thresholds(store)["aesthetic"]["keep_count"] == k
    kept_by_aesthetic = int((scored >= t).sum())
    ties = int((scored == t).sum())
    assert k <= kept_by_aesthetic <= k + ties - 1
    # Committed once: a rerun reads nothing and computes nothing.
    assert run_thresholds(run_root, plan, ThresholdsConfig(aesthetic_keep_fraction=0.5), fp,
                          execution=LOCAL)["computed"] == 0

    status = _status(run_root, plan)
    assert status.schema == STATUS and status.column("record_id").to_pylist() == list(range(n))
    outcomes = status.column("outcome").to_pylist()
    assert set(outcomes) <= set(OUTCOMES)
    assert outcomes[5] == outcomes[30] == "exact_duplicate" and outcomes[0] == outcomes[17] == "undecodable"
    rows = status.to_pylist()
    assert rows[5]["duplicate_of"] == 4 and rows[5]["duplicate_of_key"] == "000004"
    assert "same image bytes as record 4" in rows[5]["reason"]
    passed_aesthetic = sum(o in ("kept", "duplicate", "nsfw") for o in outcomes)
    assert passed_aesthetic == kept_by_aesthetic
    for row in rows:
        if row["outcome"] == "aesthetic":
            assert row["aesthetic_score"] < t and "aesthetic_keep_fraction=0.5" in row["reason"]
    counts = count_outcomes(run_root, plan)
    assert counts["records"] == n == sum(counts[c] for c in COUNT_NAMES.values())
    assert counts["exact_duplicates"] == 2 and counts["thresholds"]["aesthetic"] == pytest.approx(t)


def test_clip_filter_drops_uncaptioned_records_only_when_on(tmp_path):
    run_root, plan, _ = _run_root(tmp_path, n=16)
    keep = np.ones(16, bool)
    clip = np.linspace(0.0, 0.3, 16).astype(np.float32)
    clip[[3, 4]] = np.nan  # no caption
    commit_filters(run_root, plan, keep, keep, clip_scores=clip)
    off = _status(run_root, plan).column("outcome").to_pylist()
    assert "no_caption" not in off and "clip_score" not in off  # threshold 0: the filter is off
    assert load_thresholds(CommitStore(run_root))["clip_score"]["enabled"] is False

    commit_filters(run_root, plan, keep, keep, clip_scores=clip, thresholds={"clip_score_threshold": 0.15})
    rows = _status(run_root, plan).to_pylist()
    assert [r["outcome"] for r in rows if r["record_id"] in (3, 4)] == ["no_caption", "no_caption"]
    for r in rows:
        if r["outcome"] == "clip_score":
            assert r["clip_score"] < 0.15
        elif r["outcome"] in ("kept", "duplicate"):
            assert r["clip_score"] >= 0.15


def test_no_scored_record_keeps_none_by_that_filter(tmp_path):
    run_root, plan, _ = _run_root(tmp_path, n=8)
    keep = np.ones(8, bool)
    commit_filters(run_root, plan, keep, keep, clip_scores=np.full(8, np.nan, np.float32),
                   thresholds={"clip_score_keep_fraction": 0.3})
    data = committed(CommitStore(run_root))
    assert data["filters"]["clip_score"]["threshold"] is None and data["filters"]["clip_score"]["scored"] == 0
    outcomes = _status(run_root, plan).column("outcome").to_pylist()
    assert "kept" not in outcomes and "no_caption" in outcomes


def _add_watermark_scores(run_root: str, plan: RowGroupPlan, scores: np.ndarray) -> None:
    """Give the committed embed row groups a ``watermark_score`` column (the embed stage writes one
    while the watermark filter is on)."""
    store = CommitStore(run_root)
    for rg in range(plan.num_row_groups):
        a, b = plan.row_group_range(rg)
        p = plan.partition_of(rg)
        table = store.read_table("embed", p, rg)
        column = pa.array(scores[a:b], pa.float32(), mask=np.isnan(scores[a:b]))
        store.commit_table("embed", p, rg, table.append_column("watermark_score", column))


@pytest.mark.parametrize("fraction", [0.3, 0.5, 1.0])
def test_keep_fraction_of_a_filter_keeping_low_values_keeps_the_lowest_plus_ties(tmp_path, fraction):
    """The watermark filter keeps ``watermark_score < t``: a keep fraction keeps the k lowest
    scores (and the ties of the k-th), its threshold the next float32 above the k-th smallest."""
    run_root, plan, bad = _run_root(tmp_path)
    n = plan.num_records
    scores = np.round(np.random.default_rng(1).uniform(0, 1, n), 2).astype(np.float32)
    no_score = bad.copy()
    no_score[[5, 30]] = True  # no embedding: no score
    scores[no_score] = np.nan
    scored = np.sort(scores[~no_score])
    k = keep_count(fraction, len(scored))
    scores[np.flatnonzero(~no_score)[:3]] = scored[k - 1]  # ties of the k-th smallest
    scored = np.sort(scores[~no_score])
    kth = scored[k - 1]
    _add_watermark_scores(run_root, plan, scores)
    keep = np.ones(n, bool)
    commit_filters(run_root, plan, keep, keep, thresholds={"watermark_keep_fraction": fraction})

    entry = load_thresholds(CommitStore(run_root))["watermark"]
    t = entry["threshold"]
    assert entry["enabled"] is True and entry["keep"] == "<" and entry["keep_count"] == k
    assert t == float(np.nextafter(kth, np.float32(np.inf)))  # the next float32 above the k-th smallest
    kept = scored < t  # compared in float32, as the filter compares
    assert np.array_equal(kept, scored <= kth) and kept.sum() >= k
    rows = _status(run_root, plan).to_pylist()
    dropped = [r for r in rows if r["outcome"] == "watermark"]
    assert len(dropped) == len(scored) - kept.sum()
    for r in dropped:
        assert r["watermark_score"] > kth and "(watermark_keep_fraction=" in r["reason"]
        assert r["reason"].startswith(f"watermark_score {r['watermark_score']:.4f} >= threshold ")
    assert all(r["watermark_score"] <= kth for r in rows if r["outcome"] in ("kept", "duplicate"))


def test_without_a_watermark_column_the_filter_reads_no_score(tmp_path):
    """Embed files without ``watermark_score`` (the filter off, or a run made before it): status
    rows carry a null score and the filter, off, drops nothing."""
    run_root, plan, _ = _run_root(tmp_path, n=16)
    keep = np.ones(16, bool)
    commit_filters(run_root, plan, keep, keep)
    status = _status(run_root, plan)
    assert status.column("watermark_score").null_count == 16
    assert "watermark" not in status.column("outcome").to_pylist()
