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
   per non-empty bucket (rows sorted by bucket, cluster, record_id), and the ``rg*.parquet``
   marker holding, per bucket, its rows and the byte ``offset`` and ``length`` of its batch's
   IPC message in the ``.arrow`` file.
3. ``pairwise`` (mapped over buckets, one Ray task each). First, once per run, the batch
   manifest: one worker task reads the G assign markers and writes ``assign/_batches/b*.parquet``
   (per bucket: row group, offset, length of each batch it has), so a bucket learns where its rows
   are with one GET instead of G footers. Then per bucket: one ranged read of exactly each of its
   batches (decoded with the known schema, no footer), and
   :func:`winnow.stages.dedup.dedup_cluster` per cluster (members in record-id order, the stored
   float32 centroid): the exact rule and arithmetic of the in-process reference. Commits
   ``pairwise/b<bucket>.parquet`` (record_id, duplicate_of, one Parquet row group per partition).
   When every bucket is committed, once per run, the gather: ``pairwise/gathered/p*/rg*.parquet``,
   each row group's duplicates from every bucket.
4. ``dedup`` (row-group stage): a row group's ``DEDUP`` table from its gathered object: one read,
   whatever the number of buckets; no global join, no other row group's bytes.

The manifest and the gather are each built by one claimant (``_claim.json``, create if absent);
concurrent callers (Airflow's mapped pairwise tasks, dedup row-group tasks) wait for its
``_done.json``, and a dead claimant's claim is taken over. Older run roots (markers without
offsets, pairwise cut per partition and bucket) are still read: their batches through the
footers, their per-partition files by the gather.

Fingerprints: ``centroids`` holds n_clusters, seed, max_iter, sample_size and buckets;
``pairwise`` holds eps. A changed eps therefore reuses centroids and assignment.
"""

from __future__ import annotations

import functools
import heapq
import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
from winnow.rowgroups.fs import create_if_absent, read_range, read_small
from winnow.rowgroups.store import read_json, stage_fingerprint, table_to_parquet_bytes, write_atomic, write_json
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
_PAIRWISE_META = b"winnow.pairwise"
_PARTITIONS_META = b"winnow.partitions"
#: ``assign/_batches/``: per bucket, where its record batch lies in each row group's ``.arrow``.
MANIFEST_DIR = "_batches"
MANIFEST_COLUMNS = ("row_group", "partition", "batch", "bucket", "offset", "length", "rows")
#: ``pairwise/gathered/p*/rg*.parquet``: every bucket's duplicates, cut per row group.
GATHER_DIR = "gathered"
#: Duplicates the gather holds at once (16 B each: 256 MiB); more are gathered in chunks of partitions.
GATHER_ROWS = 1 << 24
#: Bucket files the gather keeps in memory between its footer pass and its reads (small ones only).
GATHER_KEEP_BYTES = 256 << 20
DONE_FILE = "_done.json"
CLAIM_FILE = "_claim.json"
#: A claim to build a run-wide side file older than this is taken over (its builder is gone).
CLAIM_STALE_S = 900.0
CLAIM_POLL_MAX_S = 10.0
#: Concurrent small reads and writes of one task (object stores answer them in parallel).
IO_THREADS = 8


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


# ---- once-per-run side files: one builder, the others wait -------------------------------

def _claim_stale(claim: dict[str, Any] | None) -> bool:
    """A claim nobody is working on: none, older than :data:`CLAIM_STALE_S`, or made by a
    process of this host that no longer exists."""
    if not claim:
        return True
    if time.time() - float(claim.get("time", 0)) > CLAIM_STALE_S:
        return True
    if claim.get("host") == socket.gethostname():
        try:
            os.kill(int(claim.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (OSError, ValueError):
            pass
    return False


def _once(store: CommitStore, folder: str, build: Callable[[], dict[str, Any]],
          valid: Callable[[dict[str, Any]], bool], *, wait: bool) -> bool:
    """Build a run-wide side file set under ``folder`` once: a no-op when ``folder/_done.json``
    holds a ``valid`` record (one GET). Else one caller claims ``_claim.json`` (create if absent)
    and builds; the others wait for its ``_done.json`` (``wait``) or return at once. A claim
    whose builder died (:func:`_claim_stale`) is taken over. ``build`` writes whole objects and
    is deterministic, so two builders racing past a stale claim write the same bytes. True when
    this call built."""
    done_path, claim_path = f"{folder}/{DONE_FILE}", f"{folder}/{CLAIM_FILE}"
    pause = 0.5
    while True:
        done = read_json(store.fs, done_path)
        if done is not None and valid(done):
            return False
        claim = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        if done is not None or create_if_absent(store.fs, claim_path, json.dumps(claim).encode()):
            break
        if _claim_stale(read_json(store.fs, claim_path)):
            write_json(store.fs, claim_path, claim)
            break
        if not wait:
            return False
        time.sleep(pause)
        pause = min(pause * 2, CLAIM_POLL_MAX_S)
    write_json(store.fs, done_path, build())
    return True


def _read_parquet(fs: pafs.FileSystem, path: str) -> pa.Table | None:
    """A small Parquet object whole (one GET on S3), or None when it does not exist."""
    data = read_small(fs, path)
    return None if data is None else pq.read_table(pa.BufferReader(data))


def _write_all(store: CommitStore, files: list[tuple[str, bytes]]) -> None:
    with ThreadPoolExecutor(IO_THREADS) as pool:
        list(pool.map(lambda item: write_atomic(store.fs, *item), files))


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


def assign_schema(dim: int) -> pa.Schema:
    """The rows of an assign ``.arrow`` file: what a batch read by its offset is decoded with."""
    return pa.schema([("record_id", pa.int64()), ("cluster", pa.int32()), ("distance", pa.float32()),
                      ("embedding", pa.list_(pa.float16(), dim))])


class AssignStage(_DedupRowGroupStage):
    """Row group -> its candidates' clusters, written bucket by bucket (``rg*.arrow``); the
    returned marker table holds, per bucket, its rows and where its record batch lies in the
    ``.arrow`` file (``offset``, ``length``: the whole IPC message), so pairwise reads it with
    one ranged read and never the file's footer."""

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
        }, schema=assign_schema(dim))
        bs = bucket[order]
        present, starts, counts = np.unique(bs, return_index=True, return_counts=True)
        schema = table.schema.with_metadata({_BUCKETS_META: json.dumps(present.tolist())})
        sink = pa.BufferOutputStream()
        offsets, lengths = [], []
        with pa.ipc.new_file(sink, schema) as writer:
            for start, count in zip(starts.tolist(), counts.tolist()):
                batch = table.slice(start, count).combine_chunks().to_batches()[0]
                writer.write_batch(batch)
                # The file writer frames a batch as one encapsulated IPC message of exactly this
                # size, ending where the stream now is (checked below: contiguous, each opening
                # with the continuation marker).
                size = pa.ipc.get_record_batch_size(batch)
                offsets.append(sink.tell() - size)
                lengths.append(size)
        data = sink.getvalue().to_pybytes()
        for i, at in enumerate(offsets):
            if data[at:at + 4] != b"\xff\xff\xff\xff" or (i and offsets[i - 1] + lengths[i - 1] != at):
                raise DedupError(f"assign row group {task.row_group}: batch {i} is not where the IPC writer "
                                 "was expected to put it (pyarrow's file layout changed?)")
        store.commit_bytes(self.name, task.partition, task.row_group, data, suffix=".arrow")
        return pa.table({"bucket": pa.array(present, pa.int32()), "rows": pa.array(counts, pa.int64()),
                         "offset": pa.array(offsets, pa.int64()), "length": pa.array(lengths, pa.int64())})


# ---- the batch manifest: where each bucket's rows lie, gathered once ---------------------

def _manifest_dir(store: CommitStore) -> str:
    """Under the assign stage's folder: it describes assign's files, so it goes (moved aside)
    with them when assign is recomputed, and survives a changed eps."""
    return f"{store.stage_dir('assign')}/{MANIFEST_DIR}"


def _manifest_path(store: CommitStore, bucket: int) -> str:
    return f"{_manifest_dir(store)}/b{bucket:05d}.parquet"


def _manifest_unit(run_root: RunRoot | str, plan_dict: dict, buckets: int, _unit: int) -> dict[str, Any]:
    """Read the G assign markers once (not once per bucket) and write, per bucket, its entries:
    (row_group, partition, batch, offset, length, rows), one per row group holding rows of the
    bucket. ``offset`` -1: a marker of an older run without offsets (that batch is read through
    its file footer, by index)."""
    store = CommitStore(run_root)
    plan = RowGroupPlan(**plan_dict)

    def entries(rg: int) -> dict[str, np.ndarray]:
        p = plan.partition_of(rg)
        t = store.read_table("assign", p, rg)
        n = t.num_rows
        has = "offset" in t.column_names
        return {"row_group": np.full(n, rg, np.int32), "partition": np.full(n, p, np.int32),
                "batch": np.arange(n, dtype=np.int32), "bucket": t.column("bucket").to_numpy().astype(np.int32),
                "offset": t.column("offset").to_numpy() if has else np.full(n, -1, np.int64),
                "length": t.column("length").to_numpy() if has else np.zeros(n, np.int64),
                "rows": t.column("rows").to_numpy().astype(np.int64)}

    with ThreadPoolExecutor(IO_THREADS) as pool:
        parts = list(pool.map(entries, range(plan.num_row_groups)))
    cols = {k: np.concatenate([p[k] for p in parts]) if parts else np.empty(0, np.int64) for k in MANIFEST_COLUMNS}
    order = np.lexsort((cols["row_group"], cols["bucket"]))
    cols = {k: v[order] for k, v in cols.items()}
    cuts = np.searchsorted(cols["bucket"], np.arange(buckets + 1))
    files = []
    for b in range(buckets):
        part = pa.table({k: cols[k][cuts[b]:cuts[b + 1]] for k in MANIFEST_COLUMNS if k != "bucket"})
        files.append((_manifest_path(store, b), table_to_parquet_bytes(part)))
    _write_all(store, files)
    return {"row_groups": plan.num_row_groups, "entries": int(len(order))}


def ensure_batch_manifest(store: CommitStore, plan: RowGroupPlan, buckets: int, *, execution: Execution,
                          log: Callable[[str], None] | None = None) -> None:
    """Make sure ``assign/_batches/`` holds every bucket's entries (:func:`_manifest_unit`, in a
    worker task: at 10^9 records the G x ~B entries are ~10^7 rows, more than an Airflow task
    process should hold). Once per run: afterwards one GET (``_done.json``) per call, and that
    record also stands for "assign is complete" (it was built after checking), so a mapped
    pairwise task does not list assign's P partitions again."""
    from winnow.ray.units import run_units

    say = log or (lambda _m: None)
    digest = store.fingerprint_digest("assign")

    def valid(done: dict[str, Any]) -> bool:
        return (done.get("assign"), done.get("buckets"), done.get("row_groups")) == (digest, buckets, plan.num_row_groups)

    def build() -> dict[str, Any]:
        _require_complete(store, plan, "assign", "pairwise")
        fn = functools.partial(_manifest_unit, store.run_root, plan.to_dict(), buckets)
        summary = run_units("pairwise.manifest", fn, [0], execution=execution, log=say)
        if summary.failed:
            raise DedupError(f"pairwise: gathering assign's batch offsets failed: {summary.failed[0]}")
        return {"assign": digest, "buckets": buckets, "row_groups": plan.num_row_groups,
                "entries": summary.results[0].get("entries")}

    _once(store, _manifest_dir(store), build, valid, wait=True)


def _read_entries(store: CommitStore, plan: RowGroupPlan, bucket: int) -> pa.Table | None:
    """The bucket's manifest entries (one GET), or None where there is none (then: footers).
    Each bucket's file is whole on its own (written after assign was checked complete), so it
    is read without its ``_done.json``."""
    return _read_parquet(store.fs, _manifest_path(store, bucket))


def read_bucket(store: CommitStore, plan: RowGroupPlan, bucket: int, entries: pa.Table | None = None, *,
                dim: int | None = None) -> pa.Table:
    """One bucket's assigned rows from every row group. With the manifest's ``entries`` (read
    here when not given): per row group holding rows of the bucket, one ranged read of exactly
    its record batch's IPC message, decoded with the known schema: no file footer is read.
    Without a manifest (or for entries of an old run without offsets): the batch through the
    file's footer, as before."""
    if entries is None:
        entries = _read_entries(store, plan, bucket)
    if entries is None:
        return _read_bucket_by_footers(store, plan, bucket)
    schema = assign_schema(dim or load_centroids(store)[0].shape[1])
    rows = entries.to_pydict()

    def batch(i: int) -> pa.RecordBatch:
        rg, p = rows["row_group"][i], rows["partition"][i]
        path = store.row_group_path("assign", p, rg, ".arrow")
        if rows["offset"][i] < 0:
            with store.fs.open_input_file(path) as f:
                old = pa.ipc.open_file(f).get_batch(rows["batch"][i])
            return pa.RecordBatch.from_arrays(old.columns, schema=schema)
        data = read_range(store.fs, path, rows["offset"][i], rows["length"][i])
        return pa.ipc.read_record_batch(pa.ipc.read_message(pa.py_buffer(data)), schema)

    with ThreadPoolExecutor(IO_THREADS) as pool:
        parts = list(pool.map(batch, range(entries.num_rows)))
    return pa.Table.from_batches(parts, schema=schema)


def _read_bucket_by_footers(store: CommitStore, plan: RowGroupPlan, bucket: int) -> pa.Table:
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
    """The bucket's output and commit marker: its duplicates (record_id, duplicate_of) sorted by
    record id, one Parquet row group per partition with rows (``winnow.partitions``: [partition,
    rows] of each, in order), its summary in ``winnow.pairwise``. One object per bucket, never
    one per (partition, bucket): what dedup needs comes through the gather."""
    return store.path("pairwise", f"b{bucket:05d}.parquet")


def _pairwise_part_path(store: CommitStore, partition: int, bucket: int) -> str:
    """Older runs' layout: a bucket's duplicates inside one partition's record range (with a
    marker ``b<bucket>.parquet`` holding only the summary). Read by the gather, never written."""
    return store.path("pairwise", f"p{partition:05d}", f"b{bucket:05d}.parquet")


def _pairwise_unit(run_root: RunRoot | str, plan_dict: dict, config: DedupConfig, bucket: int) -> dict[str, Any]:
    import torch

    from winnow.stages.dedup import dedup_cluster
    from winnow.stages.device import resolve_device

    store = CommitStore(run_root)
    plan = RowGroupPlan(**plan_dict)
    c, _meta = load_centroids(store)
    rows = read_bucket(store, plan, bucket, dim=c.shape[1])
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
    faults = FaultSpec.from_env()
    if faults is not None:
        faults.fire("pairwise", bucket)
    # One object per bucket, cut into Parquet row groups by partition record range, so the
    # gather reads a range of partitions from it without the rest.
    ids = table.column("record_id").to_numpy()
    bounds = [plan.partition_record_range(p)[0] for p in range(plan.num_partitions)] + [plan.num_records]
    cuts = np.searchsorted(ids, bounds)
    present = [[p, int(cuts[p + 1] - cuts[p])] for p in range(plan.num_partitions) if cuts[p + 1] > cuts[p]]
    table = table.replace_schema_metadata({_PAIRWISE_META: json.dumps(info), _PARTITIONS_META: json.dumps(present)})
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema, compression="zstd") as writer:
        for p, n in present:
            writer.write_table(table.slice(int(cuts[p]), n), row_group_size=max(n, 1))
    write_atomic(store.fs, _pairwise_path(store, bucket), sink.getvalue().to_pybytes())
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


def _centroids_meta(store: CommitStore) -> dict[str, Any]:
    """The committed centroids' metadata (bucket count, bucket map) from the file's footer: a
    driver that needs only the bucket count never reads the k x d centroids."""
    digest = (store.read_fingerprint("centroids") or {}).get("digest", "")
    meta = centroids_committed(store, digest) if digest else None
    if meta is None:
        raise DedupError(f"{store.path('centroids', CENTROIDS_FILE)} is missing or was made for another "
                         "configuration: run the centroids step (task 'centroids') first")
    return meta


def run_pairwise(
    run_root: RunRoot | str, plan: RowGroupPlan, config: DedupConfig | DedupStepConfig, buckets: list[int] | None = None, *,
    execution: Execution, log: Callable[[str], None] | None = None,
) -> UnitSummary:
    """Step 3 over ``buckets`` (all when None): one Ray task per bucket not yet committed, of the
    execution's ``worker_cpus`` CPUs (default 1) and ``worker_gpus`` GPUs (default 1 where a node
    has GPUs). Returns the :class:`~winnow.results.UnitSummary` (failures in ``failed``).

    Before the buckets: the batch manifest (:func:`ensure_batch_manifest`, once per run). After
    them, when every bucket of the run is committed: the gather (:func:`ensure_gathered`, once
    per run), so that the dedup step reads one object per row group."""
    from winnow.ray.units import run_units

    say = log or (lambda _m: None)
    if isinstance(config, DedupStepConfig):
        config = config.dedup
    store = CommitStore(run_root)
    ensure_step(store, plan, config, "pairwise")
    nb = int(_centroids_meta(store)["buckets"])
    wanted = list(range(nb)) if buckets is None else [int(b) for b in buckets]
    bad = [b for b in wanted if not 0 <= b < nb]
    if bad:
        raise DedupError(f"buckets {bad} are out of range: this run has {nb} buckets (0..{nb - 1})")
    done = committed_buckets(store)
    todo = [b for b in wanted if b not in done]
    if todo:
        ensure_batch_manifest(store, plan, nb, execution=execution, log=say)
    fn = functools.partial(_pairwise_unit, run_root, plan.to_dict(), config)
    summary = run_units("pairwise", fn, todo, skipped=len(wanted) - len(todo), execution=execution, use_gpu=True,
                        num_cpus=execution.worker_cpus, num_gpus=execution.worker_gpus, log=say)
    if not summary.failed:
        now = done | set(todo)
        if not set(range(nb)) <= now and todo:  # another task's buckets may have landed meanwhile
            now = committed_buckets(store)
        if set(range(nb)) <= now:
            ensure_gathered(store, plan, nb, execution=execution, log=say, wait=False)
    return summary


# ---- the gather: the duplicates of each row group in one object --------------------------

_EMPTY_DUPLICATES = pa.table({"record_id": pa.array([], pa.int64()), "duplicate_of": pa.array([], pa.int64())})


def _duplicates(t: pa.Table) -> pa.Table:
    return pa.table({"record_id": t.column("record_id").cast(pa.int64()),
                     "duplicate_of": t.column("duplicate_of").cast(pa.int64())})

def _gathered_dir(store: CommitStore) -> str:
    """Under pairwise's folder: made from its output, so moved aside with it (a changed eps)."""
    return store.path("pairwise", GATHER_DIR)


def _gathered_path(store: CommitStore, partition: int, row_group: int) -> str:
    return f"{_gathered_dir(store)}/p{partition:05d}/rg{row_group:09d}.parquet"


def _gather_unit(run_root: RunRoot | str, plan_dict: dict, buckets: int, _unit: int) -> dict[str, Any]:
    """Every bucket's duplicates, cut per row group: ``pairwise/gathered/p*/rg*.parquet``
    (record_id, duplicate_of of the row group's record range, sorted; written for every row
    group, empty or not, so a missing one means "not gathered", never "no duplicates").

    Why: the dedup step is a row-group stage, and the duplicates of a row group lie in every
    bucket. Read from the bucket files, that is G x B small reads (10^7 at 10^9 records, and
    a partition's row groups would each re-read the same files); gathered here, it is one
    GET per row group. The gather itself reads each bucket's footer once and then, for chunks
    of partitions holding at most :data:`GATHER_ROWS` duplicates, the Parquet row groups of
    those partitions from each bucket: O(B x chunks) reads, bounded memory."""
    store = CommitStore(run_root)
    plan = RowGroupPlan(**plan_dict)

    kept, lock = [0], threading.Lock()

    def footer(b: int) -> tuple[pq.FileMetaData, list[list[int]] | None, bytes | None]:
        path = _pairwise_path(store, b)
        try:
            with store.fs.open_input_file(path) as f:
                md = pq.read_metadata(f)
                # A small bucket file is kept whole (winnow's object-store reader fetched it
                # whole already), so the chunk pass reads it again only past the budget.
                size = f.size()
                with lock:
                    keep = size <= GATHER_KEEP_BYTES // 64 and kept[0] + size <= GATHER_KEEP_BYTES
                    kept[0] += size if keep else 0
                data = f.read_at(size, 0) if keep else None
        except FileNotFoundError:
            raise DedupError(f"{path} is missing: run the pairwise step for bucket {b} first") from None
        kv = md.metadata or {}
        return md, json.loads(kv[_PARTITIONS_META]) if _PARTITIONS_META in kv else None, data

    with ThreadPoolExecutor(IO_THREADS) as pool:
        footers = list(pool.map(footer, range(buckets)))
    rows = np.zeros(plan.num_partitions, np.int64)
    for _md, present, _data in footers:
        for p, n in present or []:
            rows[p] += n
    chunks, start, acc = [], 0, 0
    for p in range(plan.num_partitions):
        if acc and acc + rows[p] > GATHER_ROWS:
            chunks.append((start, p))
            start, acc = p, 0
        acc += int(rows[p])
    chunks.append((start, plan.num_partitions))

    def bucket_rows(b: int, p_lo: int, p_hi: int) -> pa.Table:
        md, present, data = footers[b]
        lo, hi = plan.partition_record_range(p_lo)[0], plan.partition_record_range(p_hi - 1)[1]
        if present is None:  # an older run's bucket: its per-partition files
            parts = []
            for p in range(p_lo, p_hi):
                t = _read_parquet(store.fs, _pairwise_part_path(store, p, b))
                if t is None:
                    raise DedupError(f"{_pairwise_part_path(store, p, b)} is missing: rerun the pairwise step "
                                     "with overwrite=true")
                parts.append(t.select(["record_id", "duplicate_of"]))
            return pa.concat_tables(parts)
        # The file's row ranges of the wanted partitions, then the Parquet row groups over them.
        first = sum(n for p, n in present if p < p_lo)
        last = first + sum(n for p, n in present if p_lo <= p < p_hi)
        groups, at = [], 0
        for i in range(md.num_row_groups):
            n = md.row_group(i).num_rows
            if at < last and at + n > first:
                groups.append(i)
            at += n
        if not groups:
            return _EMPTY_DUPLICATES
        with (pa.BufferReader(data) if data is not None else store.fs.open_input_file(_pairwise_path(store, b))) as f:
            t = pq.ParquetFile(f, metadata=md).read_row_groups(groups, columns=["record_id", "duplicate_of"])
        ids = t.column("record_id").to_numpy()
        a, z = np.searchsorted(ids, [lo, hi])
        return t.slice(int(a), int(z - a))

    written = 0
    for p_lo, p_hi in chunks:
        with ThreadPoolExecutor(IO_THREADS) as pool:
            parts = list(pool.map(bucket_rows, range(buckets), [p_lo] * buckets, [p_hi] * buckets))
        found = pa.concat_tables([_EMPTY_DUPLICATES, *(_duplicates(t) for t in parts)]).sort_by("record_id")
        ids = found.column("record_id").to_numpy()
        files = []
        for p in range(p_lo, p_hi):
            for rg in plan.partition_row_groups(p):
                lo, hi = plan.row_group_range(rg)
                a, z = np.searchsorted(ids, [lo, hi])
                files.append((_gathered_path(store, p, rg), table_to_parquet_bytes(found.slice(int(a), int(z - a)))))
        _write_all(store, files)
        written += len(found)
    return {"duplicates": written, "chunks": len(chunks)}


def ensure_gathered(store: CommitStore, plan: RowGroupPlan, buckets: int, *, execution: Execution | None,
                    log: Callable[[str], None] | None = None, wait: bool = True) -> None:
    """Make sure ``pairwise/gathered/`` holds every row group's duplicates (once per run; one
    GET after). ``execution`` None: build in this process (a dedup row-group task that found
    the gather missing, e.g. after the pairwise task that would have made it died)."""
    from winnow.ray.units import run_units

    say = log or (lambda _m: None)

    def valid(done: dict[str, Any]) -> bool:
        return (done.get("buckets"), done.get("row_groups")) == (buckets, plan.num_row_groups)

    def build() -> dict[str, Any]:
        missing = sorted(set(range(buckets)) - committed_buckets(store))
        if missing:
            raise DedupError(f"dedup needs every pairwise bucket; {len(missing)} are not committed "
                             f"(first: {missing[:10]}). Run the pairwise step for them first.")
        fn = functools.partial(_gather_unit, store.run_root, plan.to_dict(), buckets)
        if execution is None:
            out = fn(0)
        else:
            summary = run_units("pairwise.gather", fn, [0], execution=execution, log=say)
            if summary.failed:
                raise DedupError(f"pairwise: gathering the duplicates per row group failed: {summary.failed[0]}")
            out = summary.results[0]
        say(f"pairwise: gathered {out.get('duplicates')} duplicates into {plan.num_row_groups} row groups")
        return {"buckets": buckets, "row_groups": plan.num_row_groups, "duplicates": out.get("duplicates")}

    _once(store, _gathered_dir(store), build, valid, wait=wait)


# ---- step 4: dedup flags per row group ----------------------------------------------------

class DedupFlagsStage(_DedupRowGroupStage):
    """Row group -> its ``DEDUP`` table, from its gathered duplicates: one object (one GET on
    S3), whatever the number of buckets."""

    name: ClassVar[str] = "dedup"

    def process(self, task: RowGroupTask) -> pa.Table:
        store = task.store()
        ids = store.read_table("embed", task.partition, task.row_group, columns=["record_id"]).column("record_id").to_numpy()
        path = _gathered_path(store, task.partition, task.row_group)
        found = _read_parquet(store.fs, path)
        if found is None:
            ensure_gathered(store, task.plan, int(_centroids_meta(store)["buckets"]), execution=None)
            found = _read_parquet(store.fs, path)
            if found is None:
                raise DedupError(f"{path} is missing after the gather: rerun the pairwise step")
        result = DedupResult(found.column("record_id").to_numpy().astype(np.int64),
                             found.column("duplicate_of").to_numpy().astype(np.int64))
        table = dedup_table(ids.astype(np.int64), result)
        assert table.schema == DEDUP
        return table
