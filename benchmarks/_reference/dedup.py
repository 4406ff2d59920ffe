"""The in-process dedup reference: every candidate of a run in one process, k-means on all of
them, then :func:`winnow.stages.dedup.dedup_clusters`. The pipeline runs dedup as the distributed
steps of :mod:`winnow.stages.dedup_steps`; this is what they are tested (and benchmarked) against.

It commits one ``DEDUP`` table per row group to stage ``dedup`` of a run root whose embed and
thresholds stages are committed, resumably, with its own fingerprint (config + the digests of
``REFERENCE_UPSTREAM`` + N + B). Never use it on a run root the pipeline also runs dedup in: its
fingerprint differs from the ``dedup`` step's, so each refuses the other's folder.

Memory: the candidate matrix is float16, ``2 * d`` bytes per record (1.54 GB per million 768-d
records); reading the candidates briefly holds the per-row-group pieces and the joined matrix.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from winnow.exceptions import DedupError
from winnow.rowgroups import CommitStore, RowGroupPlan, StageFingerprint
from winnow.rowgroups.store import read_json, stage_fingerprint, write_json
from winnow.stages.dedup import DedupConfig, dedup_table, find_duplicates
from winnow.stages.embedding_io import embedding_matrix
from winnow.stages.kept import passed_filters

STAGE = "dedup"
#: What the reference reads.
REFERENCE_UPSTREAM = ("embed", "thresholds")
SUMMARY_FILE = "_summary.json"


def ensure_dedup_stage(store: CommitStore, plan: RowGroupPlan, config: DedupConfig, *, overwrite: bool = False) -> StageFingerprint:
    """Check or record the reference's fingerprint (config + upstream digests + plan)."""
    fingerprint = stage_fingerprint(store, STAGE, config, plan, upstream=REFERENCE_UPSTREAM, missing=DedupError)
    store.ensure_stage(fingerprint, overwrite=overwrite)
    return fingerprint


def _same_ids(where: str, a: pa.ChunkedArray, b: pa.ChunkedArray) -> None:
    if not a.equals(b):
        raise DedupError(
            f"{where}: record ids differ between stages (embed vs a filter stage); the stages were "
            "computed from different indexes. Recompute the filter stages with overwrite=true."
        )


def read_candidates(store: CommitStore, plan: RowGroupPlan) -> tuple[np.ndarray, np.ndarray]:
    """``(record_ids int64 (c,), embeddings float16 (c, d))`` of records with an embedding that
    passed every filter (:mod:`winnow.stages.kept`), in record-id order."""
    ids, mats = [], []
    for rg in range(plan.num_row_groups):
        p = plan.partition_of(rg)
        embed = store.read_table("embed", p, rg, columns=["record_id", "embedding"])
        filtered_ids, keep = passed_filters(store, p, rg)
        _same_ids(f"row group {rg}", embed.column("record_id"), pa.chunked_array([filtered_ids]))
        valid, matrix = embedding_matrix(embed.column("embedding"), where=f"stage 'embed' row group {rg}")
        record_ids = embed.column("record_id").to_numpy()
        ids.append(record_ids[valid & keep])
        mats.append(matrix[keep[valid]])
    if not ids:
        return np.empty(0, np.int64), np.empty((0, 0), np.float16)
    return np.concatenate(ids).astype(np.int64), np.concatenate(mats)


def _missing_row_groups(store: CommitStore, plan: RowGroupPlan) -> list[tuple[int, int]]:
    return [(p, rg) for p in range(plan.num_partitions) for rg in store.missing(STAGE, plan, p)]


def _count_committed(store: CommitStore, plan: RowGroupPlan) -> dict[str, Any]:
    duplicates = candidates = 0
    for rg in range(plan.num_row_groups):
        p = plan.partition_of(rg)
        duplicates += store.read_table(STAGE, p, rg, columns=["duplicate"]).column("duplicate").to_numpy().sum()
        candidates += passed_filters(store, p, rg)[1].sum()
    return {"candidates": int(candidates), "duplicates": int(duplicates), "clusters": None}


def run_dedup(
    run_root: str,
    plan: RowGroupPlan,
    config: DedupConfig,
    *,
    log: Callable[[str], Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Dedup a whole run and commit one ``DEDUP`` table per row group to stage ``dedup``.

    Resumable: when every row group is committed it computes nothing and returns the stored
    counts; otherwise it recomputes (deterministically) and commits only the missing row groups.
    Returns ``{"candidates", "duplicates", "clusters", "seconds", "committed"}``.
    """
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    store = CommitStore(run_root)
    fingerprint = ensure_dedup_stage(store, plan, config, overwrite=overwrite)
    missing = _missing_row_groups(store, plan)
    summary_path = store.path(STAGE, SUMMARY_FILE)
    if not missing:
        stored = read_json(store.fs, summary_path)
        if stored is None or stored.get("digest") != fingerprint.digest:
            stored = _count_committed(store, plan)
        counts = {k: stored[k] for k in ("candidates", "duplicates", "clusters")}
        say(f"dedup: all {plan.num_row_groups} row groups already committed; nothing to do")
        return {**counts, "seconds": time.perf_counter() - t0, "committed": 0}

    record_ids, embeddings = read_candidates(store, plan)
    say(f"dedup: {len(record_ids)} candidates read in {time.perf_counter() - t0:.1f}s; clustering")
    found = find_duplicates(record_ids, embeddings, config)
    say(f"dedup: {len(found.record_id)} duplicates in {found.clusters} clusters; committing {len(missing)} row groups")
    for p, rg in missing:
        ids = store.read_table("embed", p, rg, columns=["record_id"]).column("record_id").to_numpy()
        store.commit_table(STAGE, p, rg, dedup_table(ids.astype(np.int64), found))
    counts = {"candidates": int(len(record_ids)), "duplicates": int(len(found.record_id)), "clusters": found.clusters}
    write_json(store.fs, summary_path, {**counts, "digest": fingerprint.digest})
    return {**counts, "seconds": time.perf_counter() - t0, "committed": len(missing)}
