"""Semantic dedup (SemDeDup) kernels: spherical k-means on the embeddings of records that passed
the filters, then within each cluster drop members too close to a higher-ranked one. The
pipeline runs them as the distributed steps of :mod:`winnow.stages.dedup_steps`; the exact
in-process reference they are tested against is ``benchmarks/_reference/dedup.py`` (not part of the
package).

Rule, per cluster: members are ranked by distance to the centroid, farthest first (ties by
record_id); member j is a duplicate when its cosine similarity to some higher-ranked member is
>= 1 - eps, and ``duplicate_of`` is the highest-ranked such member (which may itself be a
duplicate of another). Nothing is ever n x n: k-means works in row chunks against the k
centroids, and a cluster's pairwise similarities are computed in ``block_size`` square tiles.

Clusters are the unit of parallel work: :func:`dedup_clusters` takes any subset of cluster ids,
so a runner may farm them out; :func:`find_duplicates` clusters a candidate matrix and dedups
every cluster in-process.

Memory (:func:`find_duplicates`): the candidate matrix is float16, ``2 * d`` bytes per record:
1.54 GB (1.43 GiB) per million ViT-L/14 (768-d) records, plus its record ids (8 MB per million)
and O(chunk x max(k, d)) and O(block_size^2) float32 working sets (64 MiB each at the defaults).

Determinism: the same inputs, config and device type give the same duplicates bit for bit.
CPU and CUDA may round similarities differently, so resume a partial run on the same kind
of device as the run that started it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import torch

from winnow.checks import MAX_MAP_LENGTH, check, int_problem, number_problem
from winnow.exceptions import DedupError
from winnow.schemas import DEDUP

#: Bounds of ``eps``: (low, high], the one range every layer (DAG form, config) uses.
EPS_RANGE = (0.0, 1.0)
# Float32 elements of one k-means chunk's (rows x k) similarity and one-hot matrices: 64 MiB.
_CHUNK_ELEMS = 1 << 24
# k-means++ seeds on a sample of this many rows per cluster (all rows when there are fewer).
_INIT_SAMPLE_PER_K = 32


@dataclass(frozen=True, kw_only=True)
class DedupConfig:
    """:param eps: a member is a duplicate at cosine similarity >= 1 - eps to a higher-ranked
        member of its cluster; in (0, 1] (param ``dedup_eps``).
    :param n_clusters: k-means clusters; 0 picks round(sqrt(candidates)).
    :param seed: seed of the k-means initialisation.
    :param max_iter: k-means iterations at most (it stops earlier once at most 1 in 10^4
        rows changes cluster in an iteration).
    :param device: ``"auto"`` (CUDA where there is one), ``"cpu"``, ``"cuda:0"``...
    :param block_size: side of the pairwise similarity tiles; memory only, not output.
    :param sample_size: (distributed steps) rows the ``centroids`` step clusters; 0 picks
        ``min(candidates, 100 * k)`` (param ``dedup_sample_size``).
    :param buckets: (distributed steps) buckets of clusters the ``pairwise`` step is mapped
        over, at most :data:`~winnow.checks.MAX_MAP_LENGTH`; 0 picks one per ~65k candidates
        (param ``dedup_buckets``).
    """

    eps: float = 0.05
    n_clusters: int = 0
    seed: int = 0
    max_iter: int = 50
    device: str = "auto"
    block_size: int = 4096
    sample_size: int = 0
    buckets: int = 0

    def __post_init__(self) -> None:
        low, high = EPS_RANGE
        auto = "0 = automatic"
        check(
            number_problem("dedup_eps", self.eps, low=low, high=high, low_open=True,
                           hint="duplicates have cosine similarity >= 1 - eps"),
            int_problem("dedup_clusters", self.n_clusters, low=0, hint=auto),
            int_problem("dedup_sample_size", self.sample_size, low=0, hint=auto),
            int_problem("dedup_buckets", self.buckets, low=0, high=MAX_MAP_LENGTH,
                        hint=f"{auto}; one mapped pairwise task per bucket, at most Airflow's max_map_length"),
            int_problem("max_iter", self.max_iter, low=1),
            int_problem("block_size", self.block_size, low=1),
        )

    def fingerprint_config(self) -> dict[str, Any]:
        """The knobs that change which records are duplicates."""
        return {"eps": self.eps, "n_clusters": self.n_clusters, "seed": self.seed, "max_iter": self.max_iter}


def auto_clusters(n: int) -> int:
    """round(sqrt(n)), at least 1: clusters of ~sqrt(n) members keep every pairwise tile small."""
    return max(1, round(math.sqrt(n)))


def _chunk_rows(k: int, d: int) -> int:
    return max(1, _CHUNK_ELEMS // max(k, d))


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor, *, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cluster, cosine to it)`` of every row of ``x``: the same arithmetic as the k-means
    assignment (normalised float32 rows against the centroids, argmax), so the distributed
    ``assign`` step and the in-process reference put every row in the same cluster."""
    import torch  # lazily: a driver that only plans need not load torch (~500 MB)

    n = x.shape[0]
    assignment = torch.empty(n, dtype=torch.int64, device=x.device)
    similarity = torch.empty(n, dtype=torch.float32, device=x.device)
    for start in range(0, n, chunk_rows):
        xc = torch.nn.functional.normalize(x[start : start + chunk_rows].float(), dim=1)
        sims = xc @ centroids.T
        a = sims.argmax(dim=1)
        assignment[start : start + len(xc)] = a
        similarity[start : start + len(xc)] = sims.gather(1, a[:, None])[:, 0]
    return assignment, similarity


def _assign(
    x: torch.Tensor, centroids: torch.Tensor, *, with_sums: bool, chunk_rows: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Nearest centroid (max cosine) of every row, plus per-cluster sums and counts of rows."""
    import torch  # lazily: a driver that only plans need not load torch (~500 MB)

    n, k = x.shape[0], centroids.shape[0]
    assignment = torch.empty(n, dtype=torch.int64, device=x.device)
    sums = torch.zeros_like(centroids) if with_sums else None
    counts = torch.zeros(k, dtype=torch.float32, device=x.device) if with_sums else None
    for start in range(0, n, chunk_rows):
        xc = torch.nn.functional.normalize(x[start : start + chunk_rows].float(), dim=1)
        a = (xc @ centroids.T).argmax(dim=1)
        assignment[start : start + len(xc)] = a
        if with_sums and x.device.type == "cpu":
            sums.index_add_(0, a, xc)  # deterministic on the CPU
            counts += torch.bincount(a, minlength=k).float()
        elif with_sums:
            # A one-hot matmul, not index_add_: CUDA's index_add_ sums in a racy order, which
            # would make the centroids (and so the duplicates) differ from run to run.
            onehot = torch.zeros(len(xc), k, dtype=torch.float32, device=x.device)
            onehot.scatter_(1, a[:, None], 1.0)
            sums += onehot.T @ xc
            counts += onehot.sum(dim=0)
    return assignment, sums, counts


def _kmeanspp_init(x: torch.Tensor, k: int, *, seed: int) -> torch.Tensor:
    """k-means++ seeding (cosine distance) on a seeded sample of at most ``_INIT_SAMPLE_PER_K * k``
    rows: it spreads the initial centroids over the data, so separated groups are not merged,
    at a cost of ``k`` passes over the sample (not over all n rows)."""
    import torch  # lazily: a driver that only plans need not load torch (~500 MB)

    n = x.shape[0]
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randperm(n, generator=generator)[: min(n, _INIT_SAMPLE_PER_K * k)]
    xs = torch.nn.functional.normalize(x[sample.to(x.device)].float(), dim=1)
    chosen = [int(torch.randint(len(xs), (1,), generator=generator))]
    # Squared chord distance to the nearest chosen centroid, up to a factor 2: 1 - cos.
    dist = (1.0 - xs @ xs[chosen[0]]).clamp_min(0.0)
    for _ in range(1, k):
        weights = dist.double().cpu()
        if float(weights.sum()) > 0.0:
            nxt = int(torch.multinomial(weights, 1, generator=generator))
        else:  # every sampled row sits on a chosen centroid: take the first unused row
            used = set(chosen)
            nxt = next(i for i in range(len(xs)) if i not in used)
        chosen.append(nxt)
        dist = torch.minimum(dist, (1.0 - xs @ xs[nxt]).clamp_min(0.0))
    return xs[torch.tensor(chosen, device=xs.device)]


def spherical_kmeans(
    x: torch.Tensor, k: int, *, seed: int, max_iter: int, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on the unit sphere (cosine similarity); returns ``(centroids (k, d) float32,
    assignment (n,) int64)`` on ``x``'s device. Deterministic for a seed: the initial centroids
    are ``k`` distinct rows drawn by a seeded CPU generator. An empty cluster keeps its previous
    centroid. Memory beyond ``x``: ``chunk_rows x max(k, d)`` floats.

    >>> import torch
    >>> x = torch.nn.functional.normalize(torch.tensor([[1., 0.], [.9, .1], [0., 1.], [.1, .9]]), dim=1)
    >>> _, a = spherical_kmeans(x, 2, seed=0, max_iter=10)
    >>> bool(a[0] == a[1]) and bool(a[2] == a[3]) and bool(a[0] != a[2])
    True
    """
    import torch  # lazily: a driver that only plans need not load torch (~500 MB)

    n, d = x.shape
    if not 1 <= k <= n:
        raise DedupError(f"k-means needs 1 <= k <= n, got k={k} for n={n} rows")
    chunk_rows = chunk_rows or _chunk_rows(k, d)
    centroids = _kmeanspp_init(x, k, seed=seed)
    assignment: torch.Tensor | None = None
    settled = False
    for _ in range(max_iter):
        new_assignment, sums, counts = _assign(x, centroids, with_sums=True, chunk_rows=chunk_rows)
        # Settled when (almost) no row moves: at most 1 in 10^4, exact below 10^4 rows.
        if assignment is not None and int((new_assignment != assignment).sum()) <= n // 10_000:
            assignment = new_assignment
            settled = True
            break
        assignment = new_assignment
        centroids = torch.where((counts > 0)[:, None], torch.nn.functional.normalize(sums, dim=1), centroids)
    if not settled:
        # Centroids moved after the last assignment: assign once more so the two agree.
        assignment, _, _ = _assign(x, centroids, with_sums=False, chunk_rows=chunk_rows)
    return centroids, assignment


@dataclass
class DedupResult:
    """Duplicates found in some clusters: ``record_id[i]`` duplicates ``duplicate_of[i]``."""

    record_id: np.ndarray
    duplicate_of: np.ndarray
    clusters: int = 0  # non-empty clusters processed
    largest_block: int = 0  # most similarity entries held at once (rows x cols of one tile)

    @staticmethod
    def merge(parts: Iterable[DedupResult]) -> DedupResult:
        parts = list(parts)
        return DedupResult(
            record_id=np.concatenate([p.record_id for p in parts] or [np.empty(0, np.int64)]),
            duplicate_of=np.concatenate([p.duplicate_of for p in parts] or [np.empty(0, np.int64)]),
            clusters=sum(p.clusters for p in parts),
            largest_block=max([p.largest_block for p in parts] or [0]),
        )


def dedup_cluster(
    members: torch.Tensor, record_ids: np.ndarray, centroid: torch.Tensor, *, eps: float, block_size: int = 4096
) -> DedupResult:
    """Duplicates inside one cluster (see the module docstring for the rule).

    ``members`` are the cluster's embeddings ``(m, d)``, ``record_ids`` their ids ``(m,)``.
    Similarities are computed in ``block_size x block_size`` tiles, row block by row block; a
    row block scans column blocks from the top rank down and stops once every row found its
    first (highest-ranked) near member.
    """
    import torch  # lazily: a driver that only plans need not load torch (~500 MB)

    m = members.shape[0]
    record_ids = np.asarray(record_ids, dtype=np.int64)
    if m < 2:
        return DedupResult(np.empty(0, np.int64), np.empty(0, np.int64), clusters=int(m > 0))
    emb = torch.nn.functional.normalize(members.float(), dim=1)
    to_centroid = (emb @ centroid.float()).cpu().numpy()
    # Farthest from the centroid first (lowest similarity), ties broken by record_id.
    rank = np.lexsort((record_ids, to_centroid))
    emb = emb[torch.from_numpy(rank).to(emb.device)]
    ranked_ids = record_ids[rank]
    threshold = 1.0 - eps
    first_near = np.full(m, -1, dtype=np.int64)
    largest = 0
    for r0 in range(0, m, block_size):
        r1 = min(r0 + block_size, m)
        rows = torch.arange(r0, r1, device=emb.device)[:, None]
        found = torch.full((r1 - r0,), -1, dtype=torch.int64, device=emb.device)
        # Only columns ranked above a row matter, so column blocks stop at the row block's end.
        for c0 in range(0, r1, block_size):
            c1 = min(c0 + block_size, r1)
            sims = emb[r0:r1] @ emb[c0:c1].T
            largest = max(largest, sims.numel())
            cols = torch.arange(c0, c1, device=emb.device)[None, :]
            near = (sims >= threshold) & (cols < rows)
            hit = near.any(dim=1)
            # argmax of 0/1 gives the first 1: the highest-ranked near member in this tile.
            first = near.to(torch.uint8).argmax(dim=1) + c0
            new = hit & (found < 0)
            found = torch.where(new, first, found)
            if bool((found >= 0).all()):
                break
        first_near[r0:r1] = found.cpu().numpy()
    dup = first_near >= 0
    return DedupResult(
        record_id=ranked_ids[dup],
        duplicate_of=ranked_ids[first_near[dup]],
        clusters=1,
        largest_block=largest,
    )


def dedup_clusters(
    x: torch.Tensor | np.ndarray,
    record_ids: np.ndarray,
    centroids: torch.Tensor,
    assignment: torch.Tensor,
    *,
    eps: float,
    clusters: Iterable[int] | None = None,
    block_size: int = 4096,
) -> DedupResult:
    """Run :func:`dedup_cluster` over the given cluster ids (all when None).

    ``x`` (n, d) and ``record_ids`` (n,) are the candidates, ``assignment`` their cluster ids
    from :func:`spherical_kmeans`. Results do not depend on how clusters are split between
    calls, so callers may farm disjoint subsets out and :meth:`DedupResult.merge` them.
    """
    import torch  # lazily: a driver that only plans need not load torch (~500 MB)

    x = torch.as_tensor(x)
    record_ids = np.asarray(record_ids, dtype=np.int64)
    assignment_cpu = torch.as_tensor(assignment).cpu()
    k = centroids.shape[0]
    order = torch.argsort(assignment_cpu, stable=True)
    offsets = np.concatenate([[0], np.cumsum(torch.bincount(assignment_cpu, minlength=k).numpy())])
    parts = []
    for c in range(k) if clusters is None else clusters:
        idx = order[offsets[c] : offsets[c + 1]]
        if len(idx) == 0:
            continue
        members = x[idx.to(x.device)]
        parts.append(
            dedup_cluster(members, record_ids[idx.numpy()], centroids[c].to(x.device), eps=eps, block_size=block_size)
        )
    return DedupResult.merge(parts)


# ---- every candidate in one process -------------------------------------------------------


def find_duplicates(record_ids: np.ndarray, embeddings: np.ndarray, config: DedupConfig) -> DedupResult:
    """Cluster the candidates and dedup every cluster in-process."""
    import torch  # lazily: a driver that only plans need not load torch (~500 MB)

    n = len(record_ids)
    if n == 0:
        return DedupResult(np.empty(0, np.int64), np.empty(0, np.int64))
    from winnow.stages.device import resolve_device

    device = resolve_device(config.device)
    # A private, writable copy only when needed (arrays from Arrow are often read-only).
    x = torch.from_numpy(np.require(embeddings, requirements=["C", "W"])).to(device)
    k = min(config.n_clusters or auto_clusters(n), n)
    centroids, assignment = spherical_kmeans(x, k, seed=config.seed, max_iter=config.max_iter)
    return dedup_clusters(x, record_ids, centroids, assignment, eps=config.eps, block_size=config.block_size)


def dedup_table(record_ids: np.ndarray, duplicates: DedupResult) -> pa.Table:
    """One row group's ``DEDUP`` table: every record, duplicate false unless found."""
    order = np.argsort(duplicates.record_id)
    dup_sorted, of_sorted = duplicates.record_id[order], duplicates.duplicate_of[order]
    is_dup = np.zeros(len(record_ids), dtype=bool)
    of = np.zeros(len(record_ids), dtype=np.int64)
    if len(dup_sorted):
        pos = np.minimum(np.searchsorted(dup_sorted, record_ids), len(dup_sorted) - 1)
        is_dup = dup_sorted[pos] == record_ids
        of = of_sorted[pos]
    return pa.table(
        {
            "record_id": pa.array(record_ids, pa.int64()),
            "duplicate": pa.array(is_dup, pa.bool_()),
            "duplicate_of": pa.array(of, pa.int64(), mask=~is_dup),
        },
        schema=DEDUP,
    )
