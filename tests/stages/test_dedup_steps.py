"""Dedup as distributed steps (centroids -> assign -> pairwise per bucket -> flags per row group)
against the in-process reference, on committed stage row groups with planted near-duplicates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks._reference.dedup import read_candidates
from tests.stages._stage_rows import commit_embed, commit_filters, unit_rows
from winnow.exceptions import StageConfigMismatch
from winnow.execution import LOCAL, Execution
from winnow.rowgroups import CommitStore, RowGroupPlan
from winnow.schemas import DEDUP
from winnow.stages.dedup import DedupConfig, dedup_clusters, nearest_centroid
from winnow.stages.dedup_steps import (
    AssignStage,
    DedupFlagsStage,
    assign_schema,
    ensure_step,
    load_centroids,
    read_bucket,
    run_centroids,
    run_pairwise,
    sample_quotas,
)

pytestmark = pytest.mark.timeout(300)

D = 768
N = 640
PLAN = RowGroupPlan(N, 40, max_partitions=4)  # 16 row groups in 4 partitions
CONFIG = DedupConfig(eps=0.05, n_clusters=12, device="cpu", buckets=5, sample_size=500)


def _near(rng: np.random.Generator, v: np.ndarray, sim: float) -> np.ndarray:
    o = rng.standard_normal(D)
    o -= (o @ v) * v
    return sim * v + np.sqrt(1 - sim**2) * o / np.linalg.norm(o)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """Committed embed/aesthetic/nsfw: clustered background, planted near-duplicate pairs and
    triples (cosine 0.99) spread over row groups, decoy pairs at 0.90, some records filtered."""
    rng = np.random.default_rng(21)
    centres = unit_rows(8, D, seed=22)
    x = centres[rng.integers(0, 8, N)] + 0.045 * rng.standard_normal((N, D))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    slots = rng.permutation(N)
    groups, decoys, i = [], [], 0
    for g in range(24):  # members far apart in record order: different row groups, one cluster
        size = 3 if g % 4 == 0 else 2
        ids = sorted(slots[i : i + size].tolist())
        i += size
        first = _near(rng, x[ids[0]], 0.8)
        x[ids[0]] = first
        for r in ids[1:]:
            x[r] = _near(rng, first, 0.99)
        groups.append(ids)
    for _ in range(8):
        a, b = slots[i : i + 2].tolist()
        i += 2
        x[a] = _near(rng, x[a], 0.8)
        x[b] = _near(rng, x[a], 0.90)
        decoys.append((a, b))
    planted = {r for g in groups for r in g} | {r for d in decoys for r in d}
    free = [r for r in slots[i:].tolist() if r not in planted]
    bad = np.zeros(N, bool)
    bad[free[:5]] = True
    a_keep = ~bad
    a_keep[free[5:25]] = False
    n_keep = a_keep.copy()
    n_keep[free[25:40]] = False
    root = str(tmp_path_factory.mktemp("steps") / "base")
    commit_embed(root, PLAN, x, undecodable=bad)
    commit_filters(root, PLAN, a_keep, n_keep)
    return {"root": root, "groups": groups, "decoys": decoys}


def _copy(base_run, tmp_path, name="run") -> str:
    run_root = str(tmp_path / name)
    shutil.copytree(base_run["root"], run_root)
    return run_root


def _flags(run_root: str) -> dict[int, int]:
    store = CommitStore(run_root)
    t = pa.concat_tables(store.read_table("dedup", PLAN.partition_of(rg), rg) for rg in range(PLAN.num_row_groups))
    assert t.schema == DEDUP and t.column("record_id").to_pylist() == list(range(N))
    return {r: o for r, d, o in zip(*(t.column(c).to_pylist() for c in DEDUP.names)) if d}


def _reference_on_committed_centroids(run_root: str) -> dict[int, int]:
    """The in-process algorithm (read every candidate, assign, dedup every cluster) with the
    centroids the distributed run committed."""
    store = CommitStore(run_root)
    c, _ = load_centroids(store)
    ids, emb = read_candidates(store, PLAN)
    x, ct = torch.from_numpy(emb), torch.from_numpy(c)
    assignment, _ = nearest_centroid(x, ct, chunk_rows=1 << 20)
    ref = dedup_clusters(x, ids, ct, assignment, eps=CONFIG.eps)
    return dict(zip(ref.record_id.tolist(), ref.duplicate_of.tolist()))


def _centroids(run_root: str, config: DedupConfig, execution: Execution = LOCAL) -> dict:
    """The centroids step as a direct engine call makes it: its fingerprint checked, then the step."""
    return run_centroids(run_root, PLAN, config, ensure_step(CommitStore(run_root), PLAN, config, "centroids"),
                         execution=execution)


def _run_steps(run_root: str, *, execution: Execution = LOCAL) -> dict:
    """The four steps in order, as ``run_all`` runs them between the filters and status: centroids
    and pairwise where ``execution`` says, the two row-group steps in this process (the pipeline
    tests cover the runner's Ray path). Returns the centroids and pairwise summaries."""
    from winnow.ray.runner import run_stage_partition

    def row_group_step(step: str, stage) -> None:
        ensure_step(CommitStore(run_root), PLAN, CONFIG, step)
        for p in range(PLAN.num_partitions):
            summary = run_stage_partition(stage, run_root=run_root, plan=PLAN, partition=p, execution=LOCAL)
            assert summary.ok, summary.failed

    centroids = _centroids(run_root, CONFIG, execution)
    row_group_step("assign", AssignStage(CONFIG))
    pairwise = run_pairwise(run_root, PLAN, CONFIG, execution=execution)
    assert not pairwise.failed, pairwise.failed
    row_group_step("dedup", DedupFlagsStage(CONFIG))
    return {"centroids": centroids, "pairwise": pairwise.to_dict()}


@pytest.fixture(scope="module")
def ray_local():
    from winnow.ray.cluster import connect

    connect(None)


def test_distributed_steps_on_ray_flag_exactly_what_the_reference_flags(base_run, tmp_path, ray_local):
    run_root = _copy(base_run, tmp_path)
    out = _run_steps(run_root, execution=Execution())  # centroids and pairwise as Ray tasks
    assert out["centroids"]["k"] == 12 and out["centroids"]["sample"] == 500 and out["centroids"]["buckets"] == 5
    assert out["pairwise"]["computed"] == 5
    got = _flags(run_root)
    want = _reference_on_committed_centroids(run_root)
    assert got == want and len(got) >= 24
    # Every planted group: all members but one are flagged, pointing inside the group; decoys never.
    for g in base_run["groups"]:
        found = {r: o for r, o in got.items() if r in g}
        assert len(found) == len(g) - 1 and set(found.values()) <= set(g), (g, found)
    assert not {r for d in base_run["decoys"] for r in d} & set(got)


def test_assign_writes_one_record_batch_per_bucket_and_a_bucket_is_read_alone(base_run, tmp_path):
    run_root = _copy(base_run, tmp_path)
    _run_steps(run_root)
    store = CommitStore(run_root)
    _, meta = load_centroids(store)
    bucket_of = np.asarray(meta["bucket_of_cluster"])
    total = 0
    for b in range(meta["buckets"]):
        rows = read_bucket(store, PLAN, b)
        assert set(bucket_of[rows.column("cluster").to_numpy()].tolist()) <= {b}
        total += rows.num_rows
    ids, _ = read_candidates(store, PLAN)
    assert total == len(ids)
    path = store.row_group_path("assign", 0, 0, ".arrow")
    with pa.OSFile(path) as f:
        reader = pa.ipc.open_file(f)
        present = json.loads(reader.schema.metadata[b"winnow.buckets"])
        assert reader.num_record_batches == len(present) and present == sorted(present)
        for i, b in enumerate(present):
            batch = reader.get_batch(i)
            assert set(bucket_of[batch.column("cluster").to_numpy()].tolist()) == {b}
            d = batch.column("distance").to_numpy()
            assert ((d >= -1e-6) & (d <= 2)).all()
    marker = store.read_table("assign", 0, 0)
    assert marker.column("bucket").to_pylist() == present


def test_kill_during_pairwise_then_rerun_computes_only_uncommitted_buckets(base_run, tmp_path):
    run_root = _copy(base_run, tmp_path)
    clean = _copy(base_run, tmp_path, "clean")
    _run_steps(clean)
    _centroids(run_root, CONFIG)
    ensure_step(CommitStore(run_root), PLAN, CONFIG, "assign")
    from winnow.ray.runner import run_stage_partition

    for p in range(PLAN.num_partitions):
        assert run_stage_partition(AssignStage(CONFIG), run_root=run_root, plan=PLAN, partition=p, execution=LOCAL).ok
    # A fresh process runs pairwise and is SIGKILLed right after bucket 1 committed (test hook).
    script = (
        "import sys, json; from winnow.rowgroups import RowGroupPlan; from winnow.stages.dedup import DedupConfig; "
        "from winnow.stages.dedup_steps import run_pairwise; from winnow.execution import LOCAL; "
        f"run_pairwise({run_root!r}, RowGroupPlan(**{PLAN.to_dict()!r}), DedupConfig(eps=0.05, n_clusters=12, "
        "device='cpu', buckets=5, sample_size=500), execution=LOCAL)"
    )
    spec = {"stage": "pairwise", "row_groups": [1], "mode": "kill_task", "once_dir": str(tmp_path / "once")}
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "WINNOW_TEST_FAULTS": json.dumps(spec)},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stderr[-2000:]
    pw = os.path.join(run_root, "pairwise")
    committed = sorted(f for f in os.listdir(pw) if f.startswith("b"))
    assert committed == ["b00000.parquet", "b00001.parquet"]
    before = {f: (os.stat(os.path.join(pw, f)).st_ino, os.stat(os.path.join(pw, f)).st_mtime_ns) for f in committed}

    summary = run_pairwise(run_root, PLAN, CONFIG, execution=LOCAL)
    assert (summary.computed, summary.skipped) == (3, 2)
    assert {f: (os.stat(os.path.join(pw, f)).st_ino, os.stat(os.path.join(pw, f)).st_mtime_ns) for f in committed} == before
    again = run_pairwise(run_root, PLAN, CONFIG, execution=LOCAL)
    assert (again.computed, again.skipped) == (0, 5)
    _run_steps(run_root)  # the flags step: everything else is committed
    assert _flags(run_root) == _flags(clean)


def test_changed_eps_is_a_mismatch_for_pairwise_only_centroids_and_assign_are_reused(base_run, tmp_path):
    run_root = _copy(base_run, tmp_path)
    _run_steps(run_root)
    store = CommitStore(run_root)
    centroids_file = os.path.join(run_root, "centroids", "centroids.parquet")
    mtime = os.stat(centroids_file).st_mtime_ns
    changed = DedupConfig(**{**CONFIG.__dict__, "eps": 0.1})
    assert _centroids(run_root, changed)["computed"] == 0
    ensure_step(store, PLAN, changed, "assign")  # same fingerprint: no mismatch
    with pytest.raises(StageConfigMismatch, match="eps") as info:
        run_pairwise(run_root, PLAN, changed, execution=LOCAL)
    assert info.value.stage == "pairwise"
    assert os.stat(centroids_file).st_mtime_ns == mtime


def test_pipeline_overwrite_after_an_eps_change_moves_aside_pairwise_and_later_stages_only(tmp_path):
    from winnow.pipeline import CurationConfig, prepare_stages

    cfg = CurationConfig(input_uri=str(tmp_path), output_root=str(tmp_path / "out"), run_key="r",
                         model="winnow-tiny-vit", pretrained="random", allow_random_weights=True)
    plan = RowGroupPlan(100, 10)
    assert prepare_stages(cfg, plan) == {}
    changed = CurationConfig(**{**cfg.to_dict(), "dedup_eps": 0.1})
    with pytest.raises(StageConfigMismatch) as info:
        prepare_stages(changed, plan)
    assert info.value.stage == "pairwise"
    moved = prepare_stages(CurationConfig(**{**changed.to_dict(), "overwrite": True}), plan)
    assert set(moved) == {"pairwise", "dedup", "status", "write"}
    resample = CurationConfig(**{**cfg.to_dict(), "dedup_sample_size": 1000, "overwrite": True})
    assert set(prepare_stages(resample, plan)) == {"centroids", "assign", "pairwise", "dedup", "status", "write"}
    # A changed keep fraction (or threshold) recomputes only the steps after the scores.
    for knob in ({"aesthetic_keep_fraction": 0.5}, {"clip_score_keep_fraction": 0.3}, {"nsfw_threshold": 0.2}):
        refit = CurationConfig(**{**resample.to_dict(), **knob})
        assert set(prepare_stages(refit, plan)) == {"thresholds", "centroids", "assign", "pairwise", "dedup",
                                                    "status", "write"}, knob
        resample = refit


def test_each_pipeline_step_call_checks_its_fingerprint_once(base_run, tmp_path, monkeypatch):
    """The pipeline's centroids and pairwise calls check each step's fingerprint once: the run-level
    wrapper for centroids (the step takes the checked fingerprint), the step itself for pairwise
    (which a direct engine call makes too): one ensure_stage per call, never two."""
    from winnow import pipeline
    from winnow.ray.runner import run_stage_partition

    run_root = _copy(base_run, tmp_path)
    cfg = pipeline.CurationConfig(input_uri=str(tmp_path), output_root=str(tmp_path), run_key="run",
                                  model="winnow-tiny-vit", pretrained="random", allow_random_weights=True,
                                  dedup_eps=CONFIG.eps, dedup_clusters=CONFIG.n_clusters,
                                  dedup_sample_size=CONFIG.sample_size, dedup_buckets=CONFIG.buckets)
    assert cfg.run_root == run_root
    checked: list[str] = []
    ensure_stage = CommitStore.ensure_stage

    def counting(self, fingerprint, **kw):
        checked.append(fingerprint.stage)
        return ensure_stage(self, fingerprint, **kw)

    monkeypatch.setattr(CommitStore, "ensure_stage", counting)
    assert pipeline.run_global(cfg, "centroids", execution=LOCAL)["buckets"] == CONFIG.buckets
    assert checked == ["centroids"]
    ensure_step(CommitStore(run_root), PLAN, cfg.dedup_config(), "assign")
    for p in range(PLAN.num_partitions):
        assert run_stage_partition(AssignStage(cfg.dedup_config()), run_root=run_root, plan=PLAN, partition=p,
                                   execution=LOCAL).ok
    checked.clear()
    assert not pipeline.run_buckets(cfg, "pairwise", execution=LOCAL).failed
    assert checked == ["pairwise"]


def test_centroids_sample_is_bounded_and_deterministic(base_run, tmp_path):
    a, b = _copy(base_run, tmp_path, "a"), _copy(base_run, tmp_path, "b")
    cfg = DedupConfig(n_clusters=6, device="cpu", sample_size=0)  # automatic: min(all, 100 * k)
    ra = _centroids(a, cfg)
    rb = _centroids(b, cfg)
    ids, _ = read_candidates(CommitStore(a), PLAN)
    assert ra["sample"] == min(len(ids), 600) == rb["sample"]
    ca, _ = load_centroids(CommitStore(a))
    cb, _ = load_centroids(CommitStore(b))
    assert np.array_equal(ca, cb) and ca.shape == (6, D)
    quotas = sample_quotas(np.array([40, 0, 17, 40, 3]), 50)
    assert quotas.sum() == 50 and (quotas <= np.array([40, 0, 17, 40, 3])).all()
    small = DedupConfig(n_clusters=6, device="cpu", sample_size=100)
    assert _centroids(_copy(base_run, tmp_path, "c"), small)["sample"] == 100
    with pq.ParquetFile(os.path.join(a, "centroids", "centroids.parquet")) as f:
        assert f.metadata.num_rows == 6


def test_assign_markers_locate_each_batch_and_pairwise_reads_no_footer(base_run, tmp_path, monkeypatch):
    """Each assign marker says where its buckets' record batches lie (offset, length of the IPC
    message): decoded alone, each is the batch the footer would give. Pairwise then reads the
    batches from the per-bucket manifest, never an IPC footer, and flags what the footer path
    flags; the gather leaves one object per row group that dedup reads."""
    run_root = _copy(base_run, tmp_path)
    _centroids(run_root, CONFIG)
    store = CommitStore(run_root)
    ensure_step(store, PLAN, CONFIG, "assign")
    from winnow.ray.runner import run_stage_partition

    for p in range(PLAN.num_partitions):
        assert run_stage_partition(AssignStage(CONFIG), run_root=run_root, plan=PLAN, partition=p, execution=LOCAL).ok
    c, _ = load_centroids(store)
    for rg in range(PLAN.num_row_groups):
        marker = store.read_table("assign", PLAN.partition_of(rg), rg)
        data = open(store.row_group_path("assign", PLAN.partition_of(rg), rg, ".arrow"), "rb").read()
        reader = pa.ipc.open_file(pa.py_buffer(data))
        for i, (offset, length) in enumerate(zip(marker.column("offset").to_pylist(), marker.column("length").to_pylist())):
            batch = pa.ipc.read_record_batch(pa.ipc.read_message(pa.py_buffer(data[offset:offset + length])),
                                             assign_schema(c.shape[1]))
            assert batch.equals(reader.get_batch(i))
    by_footers = {b: read_bucket(store, PLAN, b) for b in range(CONFIG.buckets)}  # no manifest yet: footers

    def no_footers(*_a, **_k):
        raise AssertionError("pairwise read an IPC file footer")

    monkeypatch.setattr(pa.ipc, "open_file", no_footers)
    summary = run_pairwise(run_root, PLAN, CONFIG, execution=LOCAL)
    assert summary.computed == CONFIG.buckets and not summary.failed
    for b, rows in by_footers.items():
        assert read_bucket(store, PLAN, b).equals(rows)
    manifests = sorted(os.listdir(os.path.join(run_root, "assign", "_batches")))
    assert manifests == ["_claim.json", "_done.json", *(f"b{b:05d}.parquet" for b in range(CONFIG.buckets))]
    gathered = {os.path.relpath(os.path.join(d, f), os.path.join(run_root, "pairwise", "gathered"))
                for d, _, fs in os.walk(os.path.join(run_root, "pairwise", "gathered")) for f in fs if f.startswith("rg")}
    assert gathered == {f"p{PLAN.partition_of(rg):05d}/rg{rg:09d}.parquet" for rg in range(PLAN.num_row_groups)}
    assert not [f for f in os.listdir(os.path.join(run_root, "pairwise")) if f.startswith("p0")]  # no P x B files
    _run_steps(run_root)  # the flags step (everything else committed)
    assert _flags(run_root) == _reference_on_committed_centroids(run_root)


def _to_old_layout(run_root: str) -> None:
    """Rewrite a run root as the layout before batch offsets and the gather wrote it: assign
    markers without offsets, no manifest; pairwise per (partition, bucket) files with summary-only
    bucket markers, nothing gathered; no dedup row group committed."""
    store = CommitStore(run_root)
    for rg in range(PLAN.num_row_groups):
        marker = store.read_table("assign", PLAN.partition_of(rg), rg)
        store.commit_table("assign", PLAN.partition_of(rg), rg, marker.select(["bucket", "rows"]))
    shutil.rmtree(os.path.join(run_root, "assign", "_batches"), ignore_errors=True)
    for b in range(CONFIG.buckets):
        path = os.path.join(run_root, "pairwise", f"b{b:05d}.parquet")
        table = pq.read_table(path)
        if "record_id" not in table.column_names:
            continue  # that layout already
        ids = table.column("record_id").to_numpy()
        for p in range(PLAN.num_partitions):
            lo, hi = PLAN.partition_record_range(p)
            a, z = np.searchsorted(ids, [lo, hi])
            os.makedirs(os.path.join(run_root, "pairwise", f"p{p:05d}"), exist_ok=True)
            pq.write_table(table.slice(a, z - a).replace_schema_metadata(None),
                           os.path.join(run_root, "pairwise", f"p{p:05d}", f"b{b:05d}.parquet"))
        pq.write_table(pa.table({"info": [json.dumps({"bucket": b})]}), path)
    shutil.rmtree(os.path.join(run_root, "pairwise", "gathered"), ignore_errors=True)
    for p in range(PLAN.num_partitions):
        shutil.rmtree(os.path.join(run_root, "dedup", f"p{p:05d}"))


def test_a_run_root_of_the_older_layout_is_still_read(base_run, tmp_path):
    """Older runs (markers without offsets, pairwise cut per partition and bucket) resume as
    they are: dedup gathers their per-partition files, and a pairwise step still to run reads
    batches through the footers (the manifest marks them so): same flags."""
    run_root = _copy(base_run, tmp_path)
    _run_steps(run_root)
    want = _flags(run_root)
    _to_old_layout(run_root)
    _run_steps(run_root)  # pairwise: all committed (old layout); dedup gathers the old files
    assert _flags(run_root) == want
    assert sorted(os.listdir(os.path.join(run_root, "pairwise", "gathered")))[:2] == ["_claim.json", "_done.json"]

    _to_old_layout(run_root)
    for b in (1, 3):  # two buckets still to compute, from markers without offsets
        os.unlink(os.path.join(run_root, "pairwise", f"b{b:05d}.parquet"))
    summary = run_pairwise(run_root, PLAN, CONFIG, execution=LOCAL)
    assert (summary.computed, summary.skipped) == (2, 3)
    entries = pq.read_table(os.path.join(run_root, "assign", "_batches", "b00001.parquet"))
    assert entries.num_rows and set(entries.column("offset").to_pylist()) == {-1}
    _run_steps(run_root)
    assert _flags(run_root) == want
