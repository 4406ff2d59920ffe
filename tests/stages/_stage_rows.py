"""Test helper: commit real stage row groups (embed, aesthetic, nsfw) for a run root, so the
head, dedup and write stages are tested on what the commit store really holds."""

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


def commit_filters(run_root: str, plan: RowGroupPlan, aesthetic_keep: np.ndarray, nsfw_keep: np.ndarray) -> None:
    """Aesthetic and nsfw row groups with given keep flags (scores made up to match them)."""
    store = CommitStore(run_root)
    _fingerprint(store, plan, "aesthetic", {"threshold": 5.0})
    _fingerprint(store, plan, "nsfw", {"threshold": 0.5})
    for rg in range(plan.num_row_groups):
        a, b = plan.row_group_range(rg)
        ids = pa.array(np.arange(a, b), pa.int64())
        ak, nk = aesthetic_keep[a:b], nsfw_keep[a:b]
        p = plan.partition_of(rg)
        store.commit_table("aesthetic", p, rg, pa.table(
            {"record_id": ids, "aesthetic_score": pa.array(np.where(ak, 6.0, 4.0), pa.float32()),
             "aesthetic_keep": pa.array(ak)}, schema=AESTHETIC))
        store.commit_table("nsfw", p, rg, pa.table(
            {"record_id": ids, "nsfw_score": pa.array(np.where(nk, 0.1, 0.9), pa.float32()),
             "nsfw_keep": pa.array(nk)}, schema=NSFW))
