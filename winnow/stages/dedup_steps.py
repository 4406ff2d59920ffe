"""Semantic dedup as four resumable steps, each a stage of the registry, so that no process (an
Airflow task least of all) ever holds more than one row group's or one bucket's data:

1. ``centroids`` (global, one Ray task): spherical k-means on a bounded deterministic sample of
   the candidates (records that passed every filter, :mod:`winnow.stages.kept`). Sample size S = ``sample_size`` or
   ``min(candidates, 100 * k)``. A first pass reads only the keep flags; then a seeded choice
   of about 4 x S/n of the row groups is read, one row group at a time, and row group g of
   those gives ``floor(S*C[g+1]/c) - floor(S*C[g]/c)`` rows (C: prefix sums of their
   candidates, c their sum): its candidates with the smallest seeded hash of their record id.
   So the sample is exactly S rows and reads ~4 S/n of the embedding bytes. Committed as ``centroids/centroids.parquet`` with the
   bucket map: clusters go to buckets largest first onto the lightest bucket (by sample size).
2. ``assign`` (row-group stage, mapped per partition): each candidate's cluster and cosine
   distance to its centroid; per row group an Arrow IPC file ``rg*.arrow`` with one record batch
   per non-empty bucket (rows sorted by bucket, cluster, record_id; the file footer locates each
   batch, so a reader fetches one bucket's rows and nothing else), and the ``rg*.parquet``
   marker holding rows per bucket.
3. ``pairwise`` (mapped over buckets, one Ray task each): the bucket's rows from every row group,
   then :func:`winnow.stages.dedup.dedup_cluster` per cluster (members in record-id order, the
   stored float32 centroid): the exact rule and arithmetic of the in-process reference. Writes
   ``pairwise/p<partition>/b<bucket>.parquet`` (record_id, duplicate_of of that partition's
   record range), then commits the bucket with its marker ``pairwise/b<bucket>.parquet``.
4. ``dedup`` (row-group stage): a row group's ``DEDUP`` table, from its partition's file of
   every bucket filtered to its record range: no global join, no other partition's bytes.

Fingerprints: ``centroids`` holds n_clusters, seed, max_iter, sample_size and buckets;
``pairwise`` holds eps. A changed eps therefore reuses centroids and assignment.
"""

from __future__ import annotations

import functools
import heapq
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from winnow.checks import MAX_MAP_LENGTH
from winnow.exceptions import ConfigError, DedupError
from winnow.execution import Execution
from winnow.faults import FaultSpec
from winnow.results import UnitSummary
from winnow.rowgroups import CommitStore, RowGroupPlan, RunRoot, StageFingerprint
from winnow.rowgroups.store import stage_fingerprint, table_to_parquet_bytes, write_atomic
from winnow.rowgroups.task import RowGroupTask
from winnow.schemas import DEDUP
from winnow.stages.dedup import DedupConfig, DedupResult, auto_clusters, dedup_table
from winnow.stages.kept import passed_filters

STEPS = ("centroids", "assign", "pairwise", "dedup")
CENTROIDS_FILE = "centroids.parquet"
#: Sample rows per cluster when ``sample_size`` is 0 (k-means needs tens per cluster; 100 is ample).
SAMPLE_PER_K = 100
#: The sample reads this many times the row groups it needs (spread over more of the run).
SAMPLE_OVERREAD = 4
#: Automatic bucket count: about this many candidates per bucket (~100 MB of 768-d float16).
TARGET_BUCKET_RECORDS = 1 << 16
_META = b"winnow.centroids"
_BUCKETS_META = b"winnow.buckets"


@dataclass(frozen=True)
class DedupStepConfig:
    """The slice of :class:`DedupConfig` one step's output depends on (its fingerprint)."""

    step: str
    dedup: DedupConfig

    def __post_init__(self) -> None:
        if self.step not in STEPS:
            raise DedupError(f"unknown dedup step {self.step!r}; steps are {', '.join(STEPS)}")

    def fingerprint_config(self) -> dict[str, Any]:
        d = self.dedup
        if self.step == "centroids":
            return {"n_clusters": d.n_clusters, "seed": d.seed, "max_iter": d.max_iter,
                    "sample_size": d.sample_size, "buckets": d.buckets}
        if self.step == "pairwise":
            return {"eps": d.eps}
        return {"layout": "v1"}  # assign and dedup: everything else comes through upstream digests


def step_config(run: Any, name: str) -> DedupStepConfig:
    """A dedup step's config from a run's ``CurationConfig`` (the registry's ``config`` factory):
    the one dedup config, of which each step fingerprints its own slice."""
    return DedupStepConfig(name, run.dedup_config())


def ensure_step(store: CommitStore, plan: RowGroupPlan, config: DedupConfig, step: str, *, overwrite: bool = False) -> StageFingerprint:
    """Check (or record) a step's fingerprint, chained to the stored fingerprints of the stages it
    reads (:func:`winnow.rowgroups.store.stage_fingerprint`): the one check of each step call."""
    fingerprint = stage_fingerprint(store, step, DedupStepConfig(step, config), plan, missing=DedupError)
    store.ensure_stage(fingerprint, overwrite=overwrite)
    return fingerprint


def _require_complete(store: CommitStore, plan: RowGroupPlan, stage: str, step: str) -> None:
    missing = [rg for p in range(plan.num_partitions) for rg in store.missing(stage, plan, p, clean_temp=False)]
    if missing:
        raise DedupError(
            f"{step} needs every row group of stage {stage!r}; {len(missing)} are not committed "
            f"(first: {missing[:10]}). Run stage {stage!r} for all partitions first."
        )


# ---- candidates of one row group ---------------------------------------------------------

def _row_group_keep(store: CommitStore, p: int, rg: int) -> tuple[np.ndarray, np.ndarray]:
    return passed_filters(store, p, rg)


def row_group_candidates(store: CommitStore, p: int, rg: int) -> tuple[np.ndarray, np.ndarray]:
    """``(record_ids int64, embeddings float16 (c, d))`` of one row group's candidates, in
    record order: exactly the rows the in-process reference (``benchmarks/_reference/dedup.py``,
    ``read_candidates``) takes from it."""
    from winnow.stages.embedding_io import embedding_matrix

    embed = store.read_table("embed", p, rg, columns=["record_id", "embedding"])
    ids, keep = _row_group_keep(store, p, rg)
    if not embed.column("record_id").to_numpy().tolist() == ids.tolist():
        raise DedupError(
            f"row group {rg}: record ids differ between embed and the filter stages; they were computed "
            "from different indexes. Recompute the filter stages with overwrite=true."
        )
    valid, matrix = embedding_matrix(embed.column("embedding"), where=f"stage 'embed' row group {rg}")
    return ids[valid & keep].astype(np.int64), matrix[keep[valid]]


def _hash_ids(ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of record id and seed: a fixed pseudo-random order, independent of layout."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & (2**64 - 1))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_quotas(counts: np.ndarray, sample_size: int) -> np.ndarray:
    """Rows each row group gives to a sample of ``sample_size``: proportional to its candidates,
    by prefix sums, so the quotas add up to exactly ``min(sample_size, total)``.

    >>> sample_quotas(np.array([3, 0, 5, 2]), 5).tolist()
    [1, 0, 3, 1]
    """
    total = int(counts.sum())
    s = min(sample_size, total)
    if total == 0:
        return np.zeros_like(counts)
    prefix = np.concatenate([[0], np.cumsum(counts)])
    cut = (prefix * s) // total
    return np.diff(cut)


def sample_row_groups(counts: np.ndarray, sample_size: int, *, seed: int) -> np.ndarray:
    """Rows each row group gives to the sample: only ``SAMPLE_OVERREAD`` x the needed share of
    row groups is read at all (picked in a seeded order), so the step reads about
    ``SAMPLE_OVERREAD * S / n`` of the embedding bytes, not all of them; inside those, quotas
    proportional to candidates (:func:`sample_quotas`).

    >>> q = sample_row_groups(np.full(100, 50), 500, seed=0)
    >>> int(q.sum()), int((q > 0).sum())
    (500, 40)
    """
    g = len(counts)
    total = int(counts.sum())
    if total == 0 or g == 0:
        return np.zeros_like(counts)
    wanted = min(g, math.ceil(SAMPLE_OVERREAD * sample_size * g / total))
    order = np.argsort(_hash_ids(np.arange(g), seed + 1), kind="stable")
    chosen = np.sort(order[:wanted])
    # Add row groups in the seeded order until the chosen ones hold enough candidates.
    while int(counts[chosen].sum()) < min(sample_size, total) and wanted < g:
        wanted += 1
        chosen = np.sort(order[:wanted])
    quotas = np.zeros_like(counts)
    quotas[chosen] = sample_quotas(counts[chosen], sample_size)
    return quotas


def bucket_map(sizes: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket of each cluster: largest cluster first (ties by id) onto the lightest bucket
    (ties by bucket id), so buckets hold about the same number of records.

    >>> bucket_map(np.array([5, 1, 4, 1]), 2).tolist()
    [0, 1, 1, 0]
    """
    heap = [(0, b) for b in range(buckets)]
    out = np.zeros(len(sizes), dtype=np.int32)
    for c in sorted(range(len(sizes)), key=lambda c: (-int(sizes[c]), c)):
        load, b = heapq.heappop(heap)
        out[c] = b
        heapq.heappush(heap, (load + int(sizes[c]), b))
    return out


def resolve_buckets(param: int, k: int, candidates: int) -> int:
    if param:
        return max(1, min(param, k))
    # One mapped pairwise task per bucket: at most Airflow's max_map_length of them.
    return max(1, min(k, MAX_MAP_LENGTH, math.ceil(candidates / TARGET_BUCKET_RECORDS)))


# ---- step 1: centroids --------------------------------------------------------------------

def _centroids_unit(run_root: RunRoot | str, plan_dict: dict, config: DedupConfig, digest: str, _unit: int) -> dict[str, Any]:
    import torch

    from winnow.stages.dedup import spherical_kmeans
    from winnow.stages.device import resolve_device

    t0 = time.perf_counter()
    store = CommitStore(run_root)
    plan = RowGroupPlan(**plan_dict)
    counts = np.zeros(plan.num_row_groups, dtype=np.int64)
    for rg in range(plan.num_row_groups):  # pass 1: keep flags only
        counts[rg] = int(_row_group_keep(store, plan.partition_of(rg), rg)[1].sum())
    n = int(counts.sum())
    if n == 0:
        raise DedupError("no record passed the filters: nothing to cluster (lower the thresholds?)")
    k = min(config.n_clusters or auto_clusters(n), n)
    s = min(n, config.sample_size or SAMPLE_PER_K * k)
    if s < k:
        raise ConfigError(f"dedup_sample_size={config.sample_size} is below the {k} clusters; use at least {k} or 0")
    quotas = sample_row_groups(counts, s, seed=config.seed)
    parts = []
    for rg in np.nonzero(quotas)[0].tolist():  # pass 2: one row group's embeddings at a time
        ids, x = row_group_candidates(store, plan.partition_of(rg), rg)
        take = np.sort(np.argsort(_hash_ids(ids, config.seed), kind="stable")[: quotas[rg]])
        parts.append(np.array(x[take]))
        del x
    sample = np.concatenate(parts)
    read_s = time.perf_counter() - t0
    device = resolve_device(config.device)
    centroids, assignment = spherical_kmeans(torch.from_numpy(sample).to(device), k, seed=config.seed, max_iter=config.max_iter)
    sizes = torch.bincount(assignment.cpu(), minlength=k).numpy()
    nb = resolve_buckets(config.buckets, k, n)
    meta = {"k": k, "candidates": n, "sample": len(sample), "buckets": nb,
            "bucket_of_cluster": bucket_map(sizes, nb).tolist(), "sample_sizes": sizes.tolist(), "digest": digest}
    c = centroids.float().cpu().numpy()
    table = pa.table({
        "cluster": pa.array(np.arange(k, dtype=np.int32)),
        "centroid": pa.FixedSizeListArray.from_arrays(pa.array(c.reshape(-1)), c.shape[1]),
    }).replace_schema_metadata({_META: json.dumps(meta)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(store.fs, store.path("centroids", CENTROIDS_FILE), sink.getvalue().to_pybytes())
    return {"k": k, "candidates": n, "sample": len(sample), "buckets": nb,
            "read_seconds": round(read_s, 3), "kmeans_seconds": round(time.perf_counter() - t0 - read_s, 3)}


_CENTROIDS_CACHE: dict[str, tuple[str, np.ndarray, dict[str, Any]]] = {}


def load_centroids(store: CommitStore) -> tuple[np.ndarray, dict[str, Any]]:
    """The committed centroids ``(k, d) float32`` and their metadata (k, buckets, bucket map);
    cached per process and centroids fingerprint, so a worker reads them once per run."""
    path = store.path("centroids", CENTROIDS_FILE)
    digest = (store.read_fingerprint("centroids") or {}).get("digest", "")
    hit = _CENTROIDS_CACHE.get(path)
    if hit and hit[0] == digest:
        return hit[1], hit[2]
    try:
        with store.fs.open_input_file(path) as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        raise DedupError(f"{path} is missing: run the centroids step (task 'centroids') first") from None
    meta = json.loads(table.schema.metadata[_META])
    if meta.get("digest") != digest:
        raise DedupError(f"{path} was made for another configuration; rerun the centroids step (overwrite=true)")
    col = table.column("centroid").combine_chunks()
    c = col.flatten().to_numpy().reshape(len(col), col.type.list_size).astype(np.float32)
    _CENTROIDS_CACHE.clear()
    _CENTROIDS_CACHE[path] = (digest, c, meta)
    return c, meta


def centroids_committed(store: CommitStore, digest: str) -> dict[str, Any] | None:
    try:
        with store.fs.open_input_file(store.path("centroids", CENTROIDS_FILE)) as f:
            meta = json.loads(pq.ParquetFile(f).schema_arrow.metadata[_META])
    except (FileNotFoundError, KeyError, TypeError):
        return None
    return meta if meta.get("digest") == digest else None


def centroids_units(store: CommitStore) -> tuple[int, set[int]]:
    """The centroids step as units, for the UI: one unit, committed when ``centroids.parquet``
    exists for the stage's current fingerprint."""
    digest = (store.read_fingerprint("centroids") or {}).get("digest")
    return 1, ({0} if digest and centroids_committed(store, digest) is not None else set())


def run_centroids(
    run_root: RunRoot | str, plan: RowGroupPlan, config: DedupConfig | DedupStepConfig, fingerprint: StageFingerprint, *,
    execution: Execution, log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Step 1: k-means on the sample, in one Ray task (with a GPU where there is one); a no-op
    when committed for ``fingerprint`` (the step's, checked: :func:`ensure_step`). Returns k,
    candidates, sample size and ``buckets``.

    The task asks for the execution's ``worker_cpus`` CPUs, or by default every CPU of the
    largest alive node (1 next to a GPU), and its ``worker_gpus`` GPUs (default 1 where a node
    has GPUs)."""
    from winnow.ray.units import run_units

    say = log or (lambda _m: None)
    if isinstance(config, DedupStepConfig):
        config = config.dedup
    store = CommitStore(run_root)
    from winnow.registry import stage_spec, upstream_closure

    for stage in (s for s in upstream_closure("centroids") if stage_spec(s).scope == "partition"):
        _require_complete(store, plan, stage, "centroids")
    meta = centroids_committed(store, fingerprint.digest)
    if meta is not None:
        say(f"centroids: committed already ({meta['k']} clusters, {meta['buckets']} buckets)")
        return {"k": meta["k"], "candidates": meta["candidates"], "sample": meta["sample"],
                "buckets": meta["buckets"], "computed": 0}
    fn = functools.partial(_centroids_unit, run_root, plan.to_dict(), config, fingerprint.digest)
    # One unit that may use every core (torch threads) or a GPU.
    import os

    cpus = _unit_cpus(execution) if execution.backend == "ray" else None
    summary = run_units("centroids", fn, [0], execution=execution, use_gpu=True, num_cpus=cpus,
                        num_gpus=execution.worker_gpus, log=say)
    if summary.failed:
        raise DedupError(f"centroids failed: {summary.failed[0]}")
    out = {k: v for k, v in summary.results[0].items() if k not in ("unit", "error")}
    say(f"centroids: {out['k']} clusters from a sample of {out['sample']} of {out['candidates']} candidates, "
        f"{out['buckets']} buckets (pid {os.getpid()} held none of it)")
    return {**out, "computed": 1, "worker_peak_rss_mb": summary.worker_peak_rss_mb}


def _unit_cpus(execution: Execution) -> float:
    """CPUs of the one k-means task: ``worker_cpus``, else 1 beside a GPU, else every CPU of the
    largest alive node (never the cluster's sum: no single node would hold that task)."""
    from winnow.ray.cluster import connect
    from winnow.ray.resources import alive_nodes, cluster_has_gpus, largest_node_cpus

    connect(execution.ray_address)
    nodes = alive_nodes()
    worker_cpus, worker_gpus = execution.worker_cpus, execution.worker_gpus
    if worker_cpus is not None:
        return largest_node_cpus(worker_cpus, nodes)  # checked to fit a node
    on_gpu = cluster_has_gpus(nodes) if worker_gpus is None else worker_gpus > 0
    return 1.0 if on_gpu else largest_node_cpus(None, nodes)


# ---- step 2: assign -----------------------------------------------------------------------

class _DedupRowGroupStage:
    """What the two per-row-group dedup steps share: their config (the step's view of the dedup
    config, fingerprinted per step) and no set-up."""

    name: ClassVar[str]

    def __init__(self, config: DedupStepConfig | DedupConfig | None = None) -> None:
        if not isinstance(config, DedupStepConfig):
            config = DedupStepConfig(self.name, config or DedupConfig())
        self.config = config

    def fingerprint_config(self) -> dict[str, Any]:
        return self.config.fingerprint_config()

    def setup(self) -> None:
        pass


class AssignStage(_DedupRowGroupStage):
    """Row group -> its candidates' clusters, written bucket by bucket (``rg*.arrow``); the
    returned marker table holds the rows per bucket."""

    name: ClassVar[str] = "assign"

    def process(self, task: RowGroupTask) -> pa.Table:
        import torch

        from winnow.stages.dedup import _chunk_rows, nearest_centroid
        from winnow.stages.device import resolve_device

        store = task.store()
        c, meta = load_centroids(store)
        ids, x = row_group_candidates(store, task.partition, task.row_group)
        device = resolve_device(self.config.dedup.device)
        ct = torch.from_numpy(c).to(device)
        if len(ids):
            xt = torch.from_numpy(np.require(x, requirements=["C", "W"])).to(device)
            cluster_t, sim_t = nearest_centroid(xt, ct, chunk_rows=_chunk_rows(*ct.shape))
            cluster, sim = cluster_t.cpu().numpy().astype(np.int32), sim_t.cpu().numpy()
        else:
            cluster, sim = np.empty(0, np.int32), np.empty(0, np.float32)
        bucket = np.asarray(meta["bucket_of_cluster"], dtype=np.int32)[cluster]
        order = np.lexsort((ids, cluster, bucket))
        dim = c.shape[1]
        xs = x[order] if len(ids) else np.empty((0, dim), np.float16)
        table = pa.table({
            "record_id": pa.array(ids[order], pa.int64()),
            "cluster": pa.array(cluster[order], pa.int32()),
            "distance": pa.array((1.0 - sim[order]).astype(np.float32)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(xs.reshape(-1), pa.float16()), dim),
        })
        bs = bucket[order]
        present, starts, counts = np.unique(bs, return_index=True, return_counts=True)
        schema = table.schema.with_metadata({_BUCKETS_META: json.dumps(present.tolist())})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, schema) as writer:
            for start, count in zip(starts.tolist(), counts.tolist()):
                writer.write_batch(table.slice(start, count).combine_chunks().to_batches()[0])
        store.commit_bytes(self.name, task.partition, task.row_group, sink.getvalue().to_pybytes(), suffix=".arrow")
        return pa.table({"bucket": pa.array(present, pa.int32()), "rows": pa.array(counts, pa.int64())})


def read_bucket(store: CommitStore, plan: RowGroupPlan, bucket: int) -> pa.Table:
    """One bucket's assigned rows from every row group: one record batch per file, read by
    its footer offset (the other buckets' bytes are never fetched)."""
    parts = []
    for rg in range(plan.num_row_groups):
        path = store.row_group_path("assign", plan.partition_of(rg), rg, ".arrow")
        with store.fs.open_input_file(path) as f:
            reader = pa.ipc.open_file(f)
            present = json.loads(reader.schema.metadata[_BUCKETS_META])
            if bucket in present:
                parts.append(reader.get_batch(present.index(bucket)))
                schema = reader.schema
            elif not parts:
                schema = reader.schema
    if not parts:
        return schema.empty_table() if plan.num_row_groups else pa.table({})
    return pa.Table.from_batches(parts)


# ---- step 3: pairwise ---------------------------------------------------------------------

def _pairwise_path(store: CommitStore, bucket: int) -> str:
    """The bucket's commit marker (its summary); written after its per-partition files."""
    return store.path("pairwise", f"b{bucket:05d}.parquet")


def _pairwise_part_path(store: CommitStore, partition: int, bucket: int) -> str:
    """A bucket's duplicates inside one partition's record range: what that partition's
    dedup row groups read (one small file per bucket), never the whole bucket's output."""
    return store.path("pairwise", f"p{partition:05d}", f"b{bucket:05d}.parquet")


def _pairwise_unit(run_root: RunRoot | str, plan_dict: dict, config: DedupConfig, bucket: int) -> dict[str, Any]:
    import torch

    from winnow.stages.dedup import dedup_cluster
    from winnow.stages.device import resolve_device

    store = CommitStore(run_root)
    plan = RowGroupPlan(**plan_dict)
    c, _meta = load_centroids(store)
    rows = read_bucket(store, plan, bucket)
    device = resolve_device(config.device)
    parts = []
    if rows.num_rows:
        ids = rows.column("record_id").to_numpy()
        cluster = rows.column("cluster").to_numpy()
        col = rows.column("embedding").combine_chunks()
        emb = col.flatten().to_numpy().reshape(len(col), col.type.list_size)
        order = np.lexsort((ids, cluster))  # each cluster's members in record-id order, as the reference
        ids, cluster, emb = ids[order], cluster[order], emb[order]
        del rows, col
        bounds = np.flatnonzero(np.diff(cluster)) + 1
        for a, b in zip([0, *bounds.tolist()], [*bounds.tolist(), len(ids)]):
            members = torch.from_numpy(np.ascontiguousarray(emb[a:b])).to(device)
            parts.append(dedup_cluster(members, ids[a:b], torch.from_numpy(c[cluster[a]]).to(device),
                                       eps=config.eps, block_size=config.block_size))
        members_n = len(ids)
    else:
        members_n = 0
    found = DedupResult.merge(parts)
    order = np.argsort(found.record_id, kind="stable")
    table = pa.table({"record_id": pa.array(found.record_id[order], pa.int64()),
                      "duplicate_of": pa.array(found.duplicate_of[order], pa.int64())})
    info = {"bucket": bucket, "members": members_n, "clusters": found.clusters,
            "duplicates": int(len(found.record_id)), "largest_block": found.largest_block}
    table = table.replace_schema_metadata({b"winnow.pairwise": json.dumps(info)})
    faults = FaultSpec.from_env()
    if faults is not None:
        faults.fire("pairwise", bucket)
    # Split by partition record range; every partition gets a file (maybe empty), so a missing
    # file is an error, never "no duplicates".
    ids = table.column("record_id").to_numpy()
    bounds = [plan.partition_record_range(p)[0] for p in range(plan.num_partitions)] + [plan.num_records]
    cuts = np.searchsorted(ids, bounds)
    for p in range(plan.num_partitions):
        part = table.slice(int(cuts[p]), int(cuts[p + 1] - cuts[p]))
        write_atomic(store.fs, _pairwise_part_path(store, p, bucket), table_to_parquet_bytes(part))
    write_atomic(store.fs, _pairwise_path(store, bucket), table_to_parquet_bytes(pa.table({"info": [json.dumps(info)]})))
    return info


def committed_buckets(store: CommitStore) -> set[int]:
    try:
        infos = store.fs.get_file_info(pafs.FileSelector(store.path("pairwise"), allow_not_found=True))
    except FileNotFoundError:
        return set()
    out = set()
    for info in infos:
        name = info.base_name
        if name.startswith("b") and name.endswith(".parquet") and ".tmp-" not in name:
            out.add(int(name[1:-8]))
    return out


def pairwise_units(store: CommitStore) -> tuple[int | None, set[int]]:
    """The pairwise step's buckets, for the UI: how many (None until the centroids that fix the
    bucket count are committed) and which are committed."""
    digest = (store.read_fingerprint("centroids") or {}).get("digest")
    meta = centroids_committed(store, digest) if digest else None
    done = committed_buckets(store)
    if meta is None:
        return None, done
    total = int(meta["buckets"])
    return total, {b for b in done if b < total}


def run_pairwise(
    run_root: RunRoot | str, plan: RowGroupPlan, config: DedupConfig | DedupStepConfig, buckets: list[int] | None = None, *,
    execution: Execution, log: Callable[[str], None] | None = None,
) -> UnitSummary:
    """Step 3 over ``buckets`` (all when None): one Ray task per bucket not yet committed, of the
    execution's ``worker_cpus`` CPUs (default 1) and ``worker_gpus`` GPUs (default 1 where a node
    has GPUs). Returns the :class:`~winnow.results.UnitSummary` (failures in ``failed``)."""
    from winnow.ray.units import run_units

    say = log or (lambda _m: None)
    if isinstance(config, DedupStepConfig):
        config = config.dedup
    store = CommitStore(run_root)
    ensure_step(store, plan, config, "pairwise")
    _require_complete(store, plan, "assign", "pairwise")
    _c, meta = load_centroids(store)
    nb = meta["buckets"]
    wanted = list(range(nb)) if buckets is None else [int(b) for b in buckets]
    bad = [b for b in wanted if not 0 <= b < nb]
    if bad:
        raise DedupError(f"buckets {bad} are out of range: this run has {nb} buckets (0..{nb - 1})")
    done = committed_buckets(store)
    todo = [b for b in wanted if b not in done]
    fn = functools.partial(_pairwise_unit, run_root, plan.to_dict(), config)
    summary = run_units("pairwise", fn, todo, skipped=len(wanted) - len(todo), execution=execution, use_gpu=True,
                        num_cpus=execution.worker_cpus, num_gpus=execution.worker_gpus, log=say)
    return summary


# ---- step 4: dedup flags per row group ----------------------------------------------------

class DedupFlagsStage(_DedupRowGroupStage):
    """Row group -> its ``DEDUP`` table, from the pairwise files filtered to its record range."""

    name: ClassVar[str] = "dedup"

    def process(self, task: RowGroupTask) -> pa.Table:
        store = task.store()
        _c, meta = load_centroids(store)
        lo, hi = task.record_range
        ids = store.read_table("embed", task.partition, task.row_group, columns=["record_id"]).column("record_id").to_numpy()
        parts = []
        for b in range(meta["buckets"]):
            path = _pairwise_part_path(store, task.partition, b)
            try:
                with store.fs.open_input_file(path) as f:
                    parts.append(pq.read_table(f, filters=[("record_id", ">=", lo), ("record_id", "<", hi)]))
            except FileNotFoundError:
                raise DedupError(f"{path} is missing: run the pairwise step for bucket {b} first") from None
        found = pa.concat_tables(parts) if parts else pa.table({"record_id": pa.array([], pa.int64()),
                                                                "duplicate_of": pa.array([], pa.int64())})
        result = DedupResult(found.column("record_id").to_numpy().astype(np.int64),
                             found.column("duplicate_of").to_numpy().astype(np.int64))
        table = dedup_table(ids.astype(np.int64), result)
        assert table.schema == DEDUP
        return table
