"""The fused embed worker through the runner's local backend, against the per-row-group stage.

Real shards (with corrupt members), real index, real tiny open_clip model, real commits.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from winnow.data.index import IndexConfig, build_index
from winnow.data.sample import generate_sample
from winnow.execution import LOCAL
from winnow.faults import ENV_VAR
from winnow.ray.runner import run_stage_partition
from winnow.rowgroups import CommitStore
from winnow.rowgroups.task import RowGroupTask
from winnow.stages.embed import EmbedConfig, EmbedStage
from winnow.stages.embed_worker import HOST_BUFFERS, EmbedPipeline
from winnow.stages.models import TINY_MODEL


def tiny(**kw) -> EmbedStage:
    base = dict(model=TINY_MODEL, pretrained="random", allow_random_weights=True, batch_size=8, decode_backend="pillow")
    return EmbedStage(EmbedConfig(**(base | kw)))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """3 shards x 20 records with corrupt members; row groups of 7 (not a multiple of the batch)."""
    base = tmp_path_factory.mktemp("embed-worker")
    manifest = generate_sample(str(base / "in"), shards=3, per_shard=20, seed=3, corrupt=True)
    assert manifest["corrupt"], "the sample must hold undecodable images"
    run_root = str(base / "run")
    plan = build_index(run_root, IndexConfig(input_uri=str(base / "in"), buffer_size=7, max_partitions=2)).plan
    return base, run_root, plan


@pytest.fixture(scope="module")
def stage() -> EmbedStage:
    s = tiny()
    s.setup()
    return s


def reference_tables(stage: EmbedStage, run_root: str, plan, partition: int) -> dict[int, pa.Table]:
    """The current per-row-group embed stage, one ``process`` call per row group."""
    return {
        rg: stage.process(RowGroupTask(run_root, plan, partition, rg))
        for rg in plan.partition_row_groups(partition)
    }


def committed(run_root: str, partition: int, row_group: int) -> pa.Table:
    return CommitStore(run_root).read_table("embed", partition, row_group)


def embeddings(table: pa.Table) -> np.ndarray:
    """(n, D) float32; NaN rows for null (undecodable) embeddings."""
    rows = table.column("embedding").to_pylist()
    dim = len(next(r for r in rows if r is not None))
    return np.array([r if r is not None else [np.nan] * dim for r in rows], dtype=np.float32)


def fresh_stage_dir(run_root: str) -> None:
    shutil.rmtree(os.path.join(run_root, "embed"), ignore_errors=True)


def test_local_backend_output_equals_the_per_row_group_stage_bit_for_bit(indexed, stage):
    _, run_root, plan = indexed
    fresh_stage_dir(run_root)
    for p in range(plan.num_partitions):
        summary = run_stage_partition(stage, run_root=run_root, plan=plan, partition=p, execution=LOCAL)
        assert summary.ok and summary.computed == len(plan.partition_row_groups(p)), summary.to_dict()
        for rg, expected in reference_tables(stage, run_root, plan, p).items():
            got = committed(run_root, p, rg)
            # Embeddings, errors, keys and row order: the same table.
            assert got.equals(expected), f"row group {rg} differs"
    assert stage.row_group_pipeline().stats.row_groups >= plan.num_row_groups


def test_fixed_batches_across_row_groups_keep_rows_errors_and_order(indexed, stage):
    """GPU mode (fixed, padded batches spanning row groups), run on CPU: same rows and errors;
    embeddings equal to float16 rounding (fp32 results depend slightly on batch composition)."""
    _, run_root, plan = indexed
    fresh_stage_dir(run_root)
    pipeline = EmbedPipeline(stage, fixed_batches=True, read_ahead=3)
    store = CommitStore(run_root)
    tasks = [RowGroupTask(run_root, plan, 0, rg) for rg in plan.partition_row_groups(0)]
    padded_before = pipeline.stats.padded_slots
    outcomes = list(pipeline.run(tasks, lambda t, table: store.commit_table("embed", t.partition, t.row_group, table)))
    assert sorted(o.row_group for o in outcomes) == [t.row_group for t in tasks]
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert pipeline.stats.padded_slots > padded_before  # the last batch was padded
    assert pipeline._buffers.qsize() == HOST_BUFFERS  # every host buffer was handed back
    for rg, expected in reference_tables(stage, run_root, plan, 0).items():
        got = committed(run_root, 0, rg)
        for col in ("record_id", "key", "error"):
            assert got.column(col).equals(expected.column(col)), (rg, col)
        a, b = embeddings(got), embeddings(expected)
        assert np.array_equal(np.isnan(a), np.isnan(b))
        ok = ~np.isnan(a[:, 0])
        assert ok.any() and np.abs(a[ok] - b[ok]).max() <= 2e-3


def test_a_row_group_whose_shard_is_gone_fails_alone_while_its_batch_neighbours_commit(tmp_path, stage):
    generate_sample(str(tmp_path / "in"), shards=3, per_shard=6, seed=1)
    run_root = str(tmp_path / "run")
    plan = build_index(run_root, IndexConfig(input_uri=str(tmp_path / "in"), buffer_size=6, max_partitions=1)).plan
    shards = sorted(f for f in os.listdir(tmp_path / "in") if f.endswith(".tar"))
    os.remove(tmp_path / "in" / shards[1])  # row group 1's bytes are gone
    pipeline = EmbedPipeline(stage, fixed_batches=True)  # batches of 8 span row groups 0-1-2
    store = CommitStore(run_root)
    tasks = [RowGroupTask(run_root, plan, 0, rg) for rg in range(3)]
    outcomes = {o.row_group: o for o in pipeline.run(
        tasks, lambda t, table: store.commit_table("embed", t.partition, t.row_group, table))}
    assert not outcomes[1].ok and "cannot be opened" in outcomes[1].error
    assert outcomes[0].ok and outcomes[2].ok
    assert sorted(store.completed("embed", 0)) == [0, 2]


def test_injected_commit_fault_fails_only_that_row_group_through_the_runner(indexed, stage, tmp_path, monkeypatch):
    _, run_root, plan = indexed
    fresh_stage_dir(run_root)
    rgs = plan.partition_row_groups(0)
    monkeypatch.setenv(ENV_VAR, json.dumps({"stage": "embed", "row_groups": [rgs[1]], "once_dir": str(tmp_path)}))
    summary = run_stage_partition(stage, run_root=run_root, plan=plan, partition=0, execution=LOCAL)
    assert list(summary.failed) == [rgs[1]] and "InjectedFault" in summary.failed[rgs[1]]
    assert summary.computed == len(rgs) - 1
    again = run_stage_partition(stage, run_root=run_root, plan=plan, partition=0, execution=LOCAL)
    assert again.ok and again.computed == 1 and again.skipped == len(rgs) - 1


def test_injected_model_error_on_a_shared_batch_fails_only_the_row_group_that_triggers_it(tmp_path):
    """A fake forward (fault injection) raises whenever row group 1's first image is in the batch:
    the shared batch is retried per row group and only row group 1 fails."""
    generate_sample(str(tmp_path / "in"), shards=1, per_shard=15, seed=2)
    run_root = str(tmp_path / "run")
    plan = build_index(run_root, IndexConfig(input_uri=str(tmp_path / "in"), buffer_size=5, max_partitions=1)).plan
    s = tiny()
    s.setup()
    poison = s._decoder.decode(EmbedPipeline(s)._read(RowGroupTask(run_root, plan, 0, 1))[1][:1]).pixels[0]
    real_forward = s.forward

    def forward(pixels, **kw):
        if any(torch.equal(p, poison) for p in pixels):
            raise RuntimeError("injected model fault")
        return real_forward(pixels, **kw)

    s.forward = forward  # type: ignore[method-assign]
    store = CommitStore(run_root)
    pipeline = EmbedPipeline(s, fixed_batches=True)  # batches of 8 over row groups of 5
    outcomes = {o.row_group: o for o in pipeline.run(
        [RowGroupTask(run_root, plan, 0, rg) for rg in range(3)],
        lambda t, table: store.commit_table("embed", t.partition, t.row_group, table))}
    assert {rg for rg, o in outcomes.items() if not o.ok} == {1}
    assert sorted(store.completed("embed", 0)) == [0, 2]


def test_closing_the_results_early_stops_the_worker_threads(indexed, stage):
    _, run_root, plan = indexed
    import threading

    before = {t.name for t in threading.enumerate()}
    tasks = [RowGroupTask(run_root, plan, 0, rg) for rg in plan.partition_row_groups(0)]
    results = EmbedPipeline(stage).run(tasks, lambda t, table: None)
    next(results)
    results.close()
    left = {t.name for t in threading.enumerate() if t.name.startswith("winnow-embed")} - before
    assert not left, left


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_worker_on_gpu_is_close_to_the_cpu_stage_with_the_same_errors(indexed, stage):
    from winnow.stages.decode import nvimgcodec_available

    _, run_root, plan = indexed
    fresh_stage_dir(run_root)
    gpu = tiny(device="cuda", decode_backend="nvimgcodec" if nvimgcodec_available() else "pillow")
    summary = run_stage_partition(gpu, run_root=run_root, plan=plan, partition=0, execution=LOCAL)
    assert summary.ok, summary.to_dict()
    stats = gpu.row_group_pipeline().stats
    assert stats.padded_slots > 0 and stats.gpu_busy is not None and 0 < stats.gpu_busy <= 1.0
    for rg, expected in reference_tables(stage, run_root, plan, 0).items():
        got = committed(run_root, 0, rg)
        for col in ("record_id", "key", "error"):
            assert got.column(col).equals(expected.column(col)), (rg, col)
        a, b = embeddings(got), embeddings(expected)
        ok = ~np.isnan(b[:, 0])
        assert np.array_equal(ok, ~np.isnan(a[:, 0]))
        assert ((a[ok] * b[ok]).sum(axis=1)).min() > 0.98  # bf16 on GPU vs fp32 on CPU


def test_ray_blocks_carry_several_row_groups_only_for_a_stage_with_a_fused_worker(stage):
    from winnow.ray.runner import MAX_ROW_GROUPS_PER_BLOCK, row_groups_per_block

    class Light:
        name = "light"

    assert row_groups_per_block(Light(), 100, 1) == 1
    assert row_groups_per_block(stage, 100, 1) == MAX_ROW_GROUPS_PER_BLOCK
    assert row_groups_per_block(stage, 10, 2) == 2  # 5 blocks: each of 2 workers gets >= 2
    assert row_groups_per_block(stage, 3, 4) == 1


@pytest.mark.parametrize("fixed", [False, True])
def test_spy_pipeline_never_reads_exact_duplicates_and_equals_the_stage(tmp_path, stage, monkeypatch, fixed):
    """Row groups with exact duplicates (the same bytes as an earlier record, also across row
    groups): a test-only spy on read_members shows their bytes are never read; the committed
    rows are the per-row-group stage's (null embedding and null error for each duplicate)."""
    import io

    from PIL import Image

    import winnow.data.reader as reader
    from tests.data._shards import write_tar

    def picture(seed: int) -> bytes:
        out = io.BytesIO()
        arr = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(out, "PNG")
        return out.getvalue()

    data = [picture(i % 5) if i % 3 else picture(0) for i in range(14)] + [b"broken", b"broken"]
    write_tar(str(tmp_path / "in" / "s.tar"), [(f"r{i:03d}.png", d) for i, d in enumerate(data)])
    run_root = str(tmp_path / "run")
    plan = build_index(run_root, IndexConfig(input_uri=str(tmp_path / "in"), buffer_size=5, max_partitions=1)).plan
    index = pa.concat_tables(CommitStore(run_root).read_table("index", 0, rg) for rg in range(plan.num_row_groups))
    twins = set(index.filter(pa.compute.is_valid(index["exact_duplicate_of"])).column("key").to_pylist())
    assert len(twins) >= 5

    real, read_keys = reader.read_members, []

    def spy(table, member="image", **kw):
        read_keys.extend(table.column("key").to_pylist())
        return real(table, member, **kw)

    monkeypatch.setattr(reader, "read_members", spy)
    store = CommitStore(run_root)
    tasks = [RowGroupTask(run_root, plan, 0, rg) for rg in range(plan.num_row_groups)]
    outcomes = list(EmbedPipeline(stage, fixed_batches=fixed).run(
        tasks, lambda t, table: store.commit_table("embed", t.partition, t.row_group, table)))
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert sorted(read_keys) == sorted(set(index.column("key").to_pylist()) - twins)
    for rg in range(plan.num_row_groups):
        got, want = committed(run_root, 0, rg), stage.process(tasks[rg])
        for col in ("record_id", "key", "error"):
            assert got.column(col).equals(want.column(col)), (rg, col)
        a, b = (np.array([r if r is not None else [np.nan] * stage.embed_dim
                          for r in t.column("embedding").to_pylist()], np.float32) for t in (got, want))
        assert np.array_equal(np.isnan(a), np.isnan(b))
        ok = ~np.isnan(a[:, 0])
        assert np.abs(a[ok] - b[ok]).max(initial=0) <= 2e-3
        for key, emb, err in zip(got.column("key").to_pylist(), got.column("embedding").to_pylist(),
                                 got.column("error").to_pylist()):
            if key in twins:
                assert emb is None and err is None, key
