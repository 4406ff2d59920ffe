"""SemDeDup on embeddings with known geometry, and the resumable run-level dedup (CPU; one GPU test)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from benchmarks._reference.dedup import run_dedup
from tests.stages._stage_rows import commit_embed, commit_filters, unit_rows
from winnow.exceptions import ConfigError, DedupError, StageConfigMismatch
from winnow.rowgroups import CommitStore, RowGroupPlan
from winnow.schemas import DEDUP
from winnow.stages.dedup import DedupConfig, DedupResult, dedup_cluster, dedup_clusters, find_duplicates, spherical_kmeans

D = 768


def _basis(n: int, seed: int = 0) -> np.ndarray:
    """n orthonormal vectors in D dims."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((D, n)))
    return q.T


def _at_similarity(a: np.ndarray, other: np.ndarray, sim: float) -> np.ndarray:
    """A unit vector at exactly cosine ``sim`` to unit ``a``, turned towards unit ``other`` ⟂ a."""
    return sim * a + np.sqrt(1 - sim**2) * other


def _brute_force(x: np.ndarray, ids: np.ndarray, centroid: np.ndarray, eps: float) -> dict[int, int]:
    """Reference: the rule straight from its definition, on the full pairwise matrix."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    rank = np.lexsort((ids, x @ centroid))
    xr, idr = x[rank], ids[rank]
    sims = xr @ xr.T
    out = {}
    for j in range(len(xr)):
        near = np.nonzero(sims[j, :j] >= 1 - eps)[0]
        if len(near):
            out[int(idr[j])] = int(idr[near[0]])
    return out


def _as_dict(result: DedupResult) -> dict[int, int]:
    return dict(zip(result.record_id.tolist(), result.duplicate_of.tolist()))


@pytest.mark.parametrize("delta,is_duplicate", [(1e-4, True), (-1e-4, False)])
def test_eps_boundary_pair_just_above_is_duplicate_just_below_is_not(delta, is_duplicate):
    e = _basis(3)
    a = e[0]
    b = _at_similarity(a, e[1], 0.95 + delta)
    members = torch.tensor(np.stack([a, b]), dtype=torch.float32)
    got = dedup_cluster(members, np.array([10, 11]), torch.tensor(e[0] + e[2], dtype=torch.float32), eps=0.05)
    assert len(got.record_id) == int(is_duplicate)


def test_farthest_from_centroid_is_kept_and_duplicates_point_at_highest_ranked_near_member():
    e = _basis(4)
    centroid = e[0]
    # Three near-copies, farther and farther from the centroid: ids chosen so id order != rank.
    t = {5: 0.0, 3: 0.05, 7: 0.10}
    triple = {i: (e[0] + s * e[1]) / np.linalg.norm(e[0] + s * e[1]) for i, s in t.items()}
    # 20 is the farthest; 21 is near 20 but turned towards the centroid; 22 lies between them,
    # ranks second and is near 20 too. 21 is near both 22 and 20 and points at 20, the higher.
    far = _at_similarity(centroid, e[2], 0.2)
    towards = centroid - (centroid @ far) * far
    chain = {20: far, 21: _at_similarity(far, towards / np.linalg.norm(towards), 0.97)}
    chain[22] = (chain[20] + chain[21]) / np.linalg.norm(chain[20] + chain[21])
    vecs = {**triple, **chain}
    ids = np.array(list(vecs))
    members = torch.tensor(np.stack([vecs[i] for i in ids]), dtype=torch.float32)
    got = _as_dict(dedup_cluster(members, ids, torch.tensor(centroid, dtype=torch.float32), eps=0.05))
    assert got == {5: 7, 3: 7, 21: 20, 22: 20}
    assert got == _brute_force(np.stack([vecs[i] for i in ids]), ids, centroid, 0.05)


def test_tiled_similarities_match_the_full_matrix_and_respect_block_size():
    rng = np.random.default_rng(4)
    base = unit_rows(40, D, seed=4)
    # Plant near-copies of random earlier rows so duplicates span many tiles.
    copies = base[rng.integers(0, 40, 25)] + 0.004 * rng.standard_normal((25, D))
    x = np.concatenate([base, copies])
    ids = rng.permutation(1000)[: len(x)]
    centroid = x.mean(0) / np.linalg.norm(x.mean(0))
    want = _brute_force(x, ids, centroid, 0.05)
    assert len(want) >= 20
    members, c = torch.tensor(x, dtype=torch.float32), torch.tensor(centroid, dtype=torch.float32)
    for block in (3, 7, 64, 4096):
        got = dedup_cluster(members, ids, c, eps=0.05, block_size=block)
        assert _as_dict(got) == want
        assert got.largest_block <= block * block
    assert dedup_cluster(members, ids, c, eps=0.05, block_size=7).largest_block < len(x) ** 2


def test_spherical_kmeans_recovers_separated_clusters_deterministically_in_chunks():
    centres = _basis(4, seed=1)
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, 400)
    x = centres[labels] + 0.01 * rng.standard_normal((400, D))
    x = torch.tensor(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=torch.float16)
    c1, a1 = spherical_kmeans(x, 4, seed=0, max_iter=20)
    c2, a2 = spherical_kmeans(x, 4, seed=0, max_iter=20, chunk_rows=37)  # many small chunks
    assert torch.equal(a1, a2) and torch.allclose(c1, c2, atol=1e-6)
    # Same partition as the true labels, up to renaming.
    pairs = set(zip(labels.tolist(), a1.tolist()))
    assert len(pairs) == 4 and len({p[1] for p in pairs}) == 4
    assert torch.allclose(c1.norm(dim=1), torch.ones(4), atol=1e-5)
    c3, a3 = spherical_kmeans(x, 4, seed=0, max_iter=20)
    assert torch.equal(a1, a3) and torch.equal(c1, c3)


def _planted(n_background: int = 500, seed: int = 7):
    """Clustered background plus planted pairs (sim 0.99), triples (0.99) and decoys (0.90)."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(6, D, seed=seed)
    bg = centres[rng.integers(0, 6, n_background)] + 0.045 * rng.standard_normal((n_background, D))
    rows = [r / np.linalg.norm(r) for r in bg]
    groups, decoys = [], []

    def near(v: np.ndarray, sim: float) -> np.ndarray:
        o = rng.standard_normal(D)
        o -= (o @ v) * v
        return _at_similarity(v, o / np.linalg.norm(o), sim)

    for g in range(30):
        anchor = rows[rng.integers(0, n_background)]
        first = near(anchor, 0.8)
        members = [first, near(first, 0.99)] + ([near(first, 0.99)] if g % 5 == 0 else [])
        groups.append(list(range(len(rows), len(rows) + len(members))))
        rows.extend(members)
    for _ in range(10):
        first = near(rows[rng.integers(0, n_background)], 0.8)
        decoys.append([len(rows), len(rows) + 1])
        rows.extend([first, near(first, 0.90)])
    return np.stack(rows), groups, decoys


def test_find_duplicates_finds_planted_groups_only_and_is_deterministic():
    x, groups, decoys = _planted()
    ids = np.arange(len(x)) * 3 + 100  # record ids are not positions
    emb = x.astype(np.float16)
    cfg = DedupConfig(eps=0.05, device="cpu")
    got = find_duplicates(ids, emb, cfg)
    assert got.clusters > 1
    dups = _as_dict(got)
    for g in groups:
        gid = set(ids[g].tolist())
        found = {r: o for r, o in dups.items() if r in gid}
        assert len(found) == len(g) - 1, f"group {gid}: {found}"
        kept = gid - set(found)
        assert set(found.values()) <= gid and len(kept) == 1
    decoy_ids = {int(i) for d in decoys for i in ids[d]}
    assert not decoy_ids & set(dups)
    assert len(dups) == sum(len(g) - 1 for g in groups)  # nothing else in the background
    again = find_duplicates(ids, emb, cfg)
    assert np.array_equal(got.record_id, again.record_id) and np.array_equal(got.duplicate_of, again.duplicate_of)


def test_clusters_farmed_out_in_subsets_merge_to_the_same_result():
    x, _, _ = _planted(300, seed=3)
    ids = np.arange(len(x))
    xt = torch.tensor(x, dtype=torch.float16)
    centroids, assignment = spherical_kmeans(xt, 12, seed=0, max_iter=30)
    whole = dedup_clusters(xt, ids, centroids, assignment, eps=0.05)
    parts = [dedup_clusters(xt.numpy(), ids, centroids, assignment, eps=0.05, clusters=range(s, 12, 3)) for s in range(3)]
    merged = DedupResult.merge(parts)
    assert _as_dict(merged) == _as_dict(whole) and len(whole.record_id) > 0
    assert merged.clusters == whole.clusters == len(torch.unique(assignment))


def test_config_is_validated():
    with pytest.raises(ConfigError, match="eps"):
        DedupConfig(eps=-0.1)
    with pytest.raises(ConfigError, match="dedup_clusters"):
        DedupConfig(n_clusters=-1)


def _dedup_run(tmp_path):
    run_root = str(tmp_path / "run")
    plan = RowGroupPlan(60, 8, max_partitions=3)
    x = unit_rows(60, D, seed=11)
    e = _basis(2, seed=12)
    # Planted: 10 ~ 11 (both candidates); 20 ~ 21 but 21 fails aesthetic; 30 ~ 31 but 31 undecodable.
    for a, b in ((10, 11), (20, 21), (30, 31), (40, 41)):
        o = e[0] - (e[0] @ x[a]) * x[a]
        x[b] = _at_similarity(x[a], o / np.linalg.norm(o), 0.99)
    bad = np.zeros(60, bool)
    bad[[31, 5]] = True
    a_keep = ~bad
    a_keep[[21, 2]] = False
    n_keep = a_keep.copy()
    n_keep[[41, 3]] = False  # 41 fails nsfw
    commit_embed(run_root, plan, x, undecodable=bad)
    commit_filters(run_root, plan, a_keep, n_keep)
    return run_root, plan


def _read_all(run_root: str, plan: RowGroupPlan) -> pa.Table:
    store = CommitStore(run_root)
    return pa.concat_tables(store.read_table("dedup", plan.partition_of(rg), rg) for rg in range(plan.num_row_groups))


def test_run_dedup_commits_every_record_and_only_candidates_can_be_duplicates(tmp_path):
    run_root, plan = _dedup_run(tmp_path)
    counts = run_dedup(run_root, plan, DedupConfig(n_clusters=3, device="cpu"))
    assert counts["candidates"] == 60 - 2 - 2 - 2 and counts["duplicates"] == 1 and counts["clusters"] > 1
    table = _read_all(run_root, plan)
    assert table.schema == DEDUP and table.column("record_id").to_pylist() == list(range(60))
    dup = {r: o for r, d, o in zip(*(table.column(c).to_pylist() for c in DEDUP.names)) if d}
    assert dup in ({10: 11}, {11: 10})
    assert table.column("duplicate_of").null_count == 59


def test_run_dedup_is_resumable_and_recommits_only_missing_row_groups(tmp_path):
    run_root, plan = _dedup_run(tmp_path)
    cfg = DedupConfig(n_clusters=3, device="cpu")
    first = run_dedup(run_root, plan, cfg)
    before = _read_all(run_root, plan)
    store = CommitStore(run_root)
    paths = {rg: store.row_group_path("dedup", plan.partition_of(rg), rg) for rg in range(plan.num_row_groups)}
    mtimes = {rg: os.stat(p).st_mtime_ns for rg, p in paths.items()}

    again = run_dedup(run_root, plan, cfg)
    assert again["committed"] == 0
    assert {k: again[k] for k in ("candidates", "duplicates", "clusters")} == {
        k: first[k] for k in ("candidates", "duplicates", "clusters")
    }
    assert {rg: os.stat(p).st_mtime_ns for rg, p in paths.items()} == mtimes

    os.unlink(paths[1])
    os.unlink(paths[6])
    resumed = run_dedup(run_root, plan, cfg)
    assert resumed["committed"] == 2 and resumed["duplicates"] == first["duplicates"]
    assert _read_all(run_root, plan).equals(before)
    assert all(os.stat(paths[rg]).st_mtime_ns == mtimes[rg] for rg in paths if rg not in (1, 6))

    with pytest.raises(StageConfigMismatch, match="eps"):
        run_dedup(run_root, plan, DedupConfig(eps=0.1, n_clusters=3, device="cpu"))


def test_run_dedup_needs_upstream_fingerprints(tmp_path):
    run_root = str(tmp_path / "run")
    plan = RowGroupPlan(4, 2)
    commit_embed(run_root, plan, unit_rows(4, D, seed=0))
    with pytest.raises(DedupError, match="'thresholds' has no .*_stage.json"):
        run_dedup(run_root, plan, DedupConfig(device="cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dedup_is_deterministic_and_agrees_with_cpu():
    x, groups, _ = _planted()
    ids = np.arange(len(x))
    emb = x.astype(np.float16)
    gpu = [find_duplicates(ids, emb, DedupConfig(device="cuda")) for _ in range(2)]
    cpu = find_duplicates(ids, emb, DedupConfig(device="cpu"))
    assert _as_dict(gpu[0]) == _as_dict(gpu[1])
    assert set(_as_dict(gpu[0])) == set(_as_dict(cpu))
