"""Test helper: commit real stage row groups (index, embed, the scores and the thresholds step)
for a run root, so the head, dedup, status and write stages are tested on what the commit store
really holds."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from winnow.rowgroups import CommitStore, RowGroupPlan, StageFingerprint
from winnow.schemas import AESTHETIC, NSFW, embed_schema
from winnow.stages.embedding_io import embedding_array


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _fingerprint(store: CommitStore, plan: RowGroupPlan, stage: str, config: dict) -> None:
    store.ensure_stage(
        StageFingerprint(stage=stage, config=config, num_records=plan.num_records, buffer_size=plan.buffer_size)
    )


def commit_embed(
    run_root: str, plan: RowGroupPlan, embeddings: np.ndarray, *, undecodable: np.ndarray | None = None,
    keys: list[str] | None = None,
) -> None:
    """Embed row groups for records 0..N-1; ``undecodable`` rows get a null embedding and an error."""
    store = CommitStore(run_root)
    _fingerprint(store, plan, "embed", {"model": "test"})
    n, d = embeddings.shape
    bad = np.zeros(n, bool) if undecodable is None else undecodable
    keys = keys or [f"{i:06d}" for i in range(n)]
    for rg in range(plan.num_row_groups):
        a, b = plan.row_group_range(rg)
        valid = ~bad[a:b]
        table = pa.table(
            {
                "record_id": pa.array(np.arange(a, b), pa.int64()),
                "key": pa.array(keys[a:b]),
                "embedding": embedding_array(embeddings[a:b][valid], valid),
                "error": pa.array([None if v else "undecodable: test" for v in valid], pa.string()),
            },
            schema=embed_schema(d),
        )
        store.commit_table("embed", plan.partition_of(rg), rg, table)


def commit_index_rows(run_root: str, plan: RowGroupPlan, *, keys: list[str] | None = None,
                      exact_duplicate_of: dict[int, int] | None = None) -> None:
    """Index row groups for records 0..N-1 when there are none (no shard behind them: enough for
    the stages that read only record ids, keys and exact-duplicate marks)."""
    from winnow.rowgroups.store import write_json
    from winnow.schemas import INDEX

    store = CommitStore(run_root)
    if store.read_fingerprint("index") is not None:
        return
    _fingerprint(store, plan, "index", {"test": True})
    twins = exact_duplicate_of or {}
    for rg in range(plan.num_row_groups):
        a, b = plan.row_group_range(rg)
        ids = list(range(a, b))
        cols = {name: pa.nulls(b - a, INDEX.field(name).type) for name in INDEX.names}
        cols["record_id"] = pa.array(ids, pa.int64())
        cols["key"] = pa.array(keys[a:b] if keys else [f"{i:06d}" for i in ids])
        cols["uid"] = pa.array([f"{i:032x}" for i in ids])
        cols["exact_duplicate_of"] = pa.array([twins.get(i) for i in ids], pa.int64())
        store.commit_table("index", plan.partition_of(rg), rg, pa.table(cols, schema=INDEX))
    write_json(store.fs, store.path("index", "_index.json"), {
        "num_records": plan.num_records, "buffer_size": plan.buffer_size, "max_partitions": plan.max_partitions,
        "input_uri": "", "shards": [], "counts": {}, "fingerprint_digest": store.fingerprint_digest("index")})


def commit_filters(run_root: str, plan: RowGroupPlan, aesthetic_keep: np.ndarray, nsfw_keep: np.ndarray, *,
                   clip_scores: np.ndarray | None = None, thresholds: dict | None = None) -> None:
    """Aesthetic, nsfw and clip_score row groups with scores that give ``aesthetic_keep`` and
    ``nsfw_keep`` under the default thresholds (aesthetic 6.0 / 4.0 against 5.0; nsfw 0.1 / 0.9
    against 0.5; clip score NaN = no caption), then the thresholds step (``thresholds``: its
    config, default the defaults: CLIP-score filter off). Commits index rows first if missing."""
    from winnow.execution import LOCAL
    from winnow.stages.clip_score import CLIP_SCORE
    from winnow.stages.thresholds import ThresholdsConfig, run_thresholds

    commit_index_rows(run_root, plan)
    store = CommitStore(run_root)
    for stage in ("aesthetic", "nsfw", "clip_score"):
        _fingerprint(store, plan, stage, {"test": True})
    n = plan.num_records
    clip = np.full(n, np.nan, np.float32) if clip_scores is None else np.asarray(clip_scores, np.float32)
    for rg in range(plan.num_row_groups):
        a, b = plan.row_group_range(rg)
        ids = pa.array(np.arange(a, b), pa.int64())
        ak, nk, c = aesthetic_keep[a:b], nsfw_keep[a:b], clip[a:b]
        p = plan.partition_of(rg)
        store.commit_table("aesthetic", p, rg, pa.table(
            {"record_id": ids, "aesthetic_score": pa.array(np.where(ak, 6.0, 4.0), pa.float32())}, schema=AESTHETIC))
        store.commit_table("nsfw", p, rg, pa.table(
            {"record_id": ids, "nsfw_score": pa.array(np.where(nk, 0.1, 0.9), pa.float32())}, schema=NSFW))
        store.commit_table("clip_score", p, rg, pa.table(
            {"record_id": ids, "clip_score": pa.array(c, pa.float32(), mask=np.isnan(c)),
             "has_caption": pa.array(~np.isnan(c))}, schema=CLIP_SCORE))
    config = ThresholdsConfig(**(thresholds or {}))
    upstream = {s: store.fingerprint_digest(s) for s in ("aesthetic", "nsfw", "clip_score")}
    fingerprint = StageFingerprint(stage="thresholds", config=config.fingerprint_config(), upstream=upstream,
                                   num_records=plan.num_records, buffer_size=plan.buffer_size)
    store.ensure_stage(fingerprint, overwrite=True)
    run_thresholds(run_root, plan, config, fingerprint, execution=LOCAL)
