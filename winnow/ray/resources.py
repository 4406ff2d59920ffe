"""How big a Ray request may be: sized by the alive nodes, never by the cluster's sum.

``ray.cluster_resources()`` adds every node up. A worker sized by it (``{'CPU': 3}`` on a head of
1 CPU plus a worker node of 2) fits no node, and Ray waits forever without an error. Everything
here reads the alive nodes (``ray.nodes()``) instead, so that:

- no request ever exceeds one node: an explicit knob larger than every alive node is a
  :class:`ResourceRequestError` naming the knob and the largest node, at once, not a hang;
- a GPU model worker is 1 GPU + 1 CPU by default, and a partition gets as many of them as fit
  (the sum over nodes of what each node holds), capped by its row groups;
- a CPU-only model worker is one per partition: as wide as the largest node when the caller owns
  its Ray (``compute="tasks"``), half of it on a shared cluster (``compute="actors"``; see
  :func:`model_worker_request` for why).

``compute`` says how a partition's model worker runs on Ray Data, as in Ray Data's own
``map_batches(compute=...)``: ``"tasks"`` (reused worker processes that cache the loaded model:
right when this process owns the Ray) or ``"actors"`` (one actor pool per partition that holds
the model for all of its row groups: right when other drivers share the Ray). It is part of the
run's :class:`~winnow.execution.Execution`; :func:`~winnow.execution.default_compute` is the one
default.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from winnow.exceptions import ResourceRequestError
from winnow.execution import Compute, Execution, check_knobs


@dataclass(frozen=True)
class Node:
    """What one alive Ray node offers to schedule onto (its totals, not what is free now)."""

    node_id: str
    cpus: float
    gpus: float

    def fits(self, cpus: float, gpus: float) -> int:
        """How many workers of ``cpus`` CPUs and ``gpus`` GPUs this node holds at once."""
        by_cpu = math.floor(self.cpus / cpus + 1e-9) if cpus > 0 else math.inf
        by_gpu = math.floor(self.gpus / gpus + 1e-9) if gpus > 0 else math.inf
        n = min(by_cpu, by_gpu)
        return 0 if n == math.inf else int(n)

    def describe(self) -> str:
        return f"{_num(self.cpus)} CPUs and {_num(self.gpus)} GPUs"


@dataclass(frozen=True)
class WorkerRequest:
    """A model worker's Ray request: each worker's CPUs and GPUs, and how many workers."""

    num_cpus: float
    num_gpus: float
    width: int

    def ray_args(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}

    def describe(self) -> str:
        return f"{self.width} worker(s) of {_num(self.num_cpus)} CPU(s) and {_num(self.num_gpus)} GPU(s)"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# ---- the cluster as it is now ------------------------------------------------------------

def alive_nodes() -> list[Node]:
    """The alive nodes of the Ray this process is attached to, with their CPU and GPU totals.

    A node with ``--num-cpus=0`` (the usual head) is listed with 0 CPUs. A node that just died
    stays listed until Ray's health check notices it (seconds).
    """
    import ray

    nodes = []
    for info in ray.nodes():
        if not info.get("Alive"):
            continue
        res = info.get("Resources") or {}
        nodes.append(Node(str(info.get("NodeID", "")), float(res.get("CPU", 0)), float(res.get("GPU", 0))))
    return nodes


def largest_node(nodes: Sequence[Node] | None = None) -> Node:
    """The biggest alive node: the most GPUs, then the most CPUs. A real node, so its CPUs and
    GPUs can be asked for together."""
    nodes = alive_nodes() if nodes is None else list(nodes)
    if not nodes:
        raise ResourceRequestError("the Ray cluster has no alive node")
    return max(nodes, key=lambda n: (n.gpus, n.cpus))


def cluster_has_gpus(nodes: Sequence[Node] | None = None) -> bool:
    nodes = alive_nodes() if nodes is None else nodes
    return any(n.gpus > 0 for n in nodes)


# ---- worker sizes ------------------------------------------------------------------------

def check_fits(execution: Execution) -> None:
    """Fail fast on an explicit worker size no alive node holds (the run would otherwise wait
    forever at its first model stage); attaches to the execution's Ray to look."""
    if execution.backend != "ray" or not execution.sized:
        return
    from winnow.ray.cluster import connect

    connect(execution.ray_address)
    model_worker_request(compute=execution.compute, worker_cpus=execution.worker_cpus,
                         worker_gpus=execution.worker_gpus)


def model_worker_request(*, compute: Compute, worker_cpus: float | None = None, worker_gpus: float | None = None,
                         max_width: int | None = None, nodes: Sequence[Node] | None = None) -> WorkerRequest:
    """The Ray Data request of a partition's model worker(s) on the alive ``nodes``.

    - ``worker_gpus`` (default: 1 where any node has a GPU, else 0; 0 forces CPU). With GPUs a
      worker takes ``worker_cpus`` CPUs (default 1: decode threads and the commit loop; the model
      runs on the GPU), and the partition gets as many workers as the nodes hold at once (the
      sum over nodes, each node counted alone), capped by ``max_width`` (its row groups).
    - CPU only: one worker per partition, of ``worker_cpus`` CPUs, or by default
      ``compute="tasks"``: every CPU of the largest node (this process owns the Ray, partitions
      run one after another: torch threads as wide as a direct call); ``compute="actors"``: half
      the largest node, at least 1. On a shared cluster Airflow runs partitions side by side; a
      worker of a whole node would make each wait for a node of its own, queueing partitions
      behind each other while half-busy nodes idle. Half a node lets two partitions share one
      node, and CPU inference gains little from its last cores (memory-bound), so a partition
      loses little running alone.

    No request exceeds one node: a knob no alive node can hold is a
    :class:`ResourceRequestError` naming it and the largest node.
    """
    check_knobs(worker_cpus, worker_gpus, compute)
    nodes = alive_nodes() if nodes is None else list(nodes)
    biggest = largest_node(nodes)
    gpus = float(worker_gpus) if worker_gpus is not None else (1.0 if cluster_has_gpus(nodes) else 0.0)
    if gpus > 0:
        cpus = float(worker_cpus) if worker_cpus is not None else 1.0
        width = _width(nodes, cpus, gpus, worker_cpus, worker_gpus, biggest)
    else:
        if worker_cpus is not None:
            cpus = float(worker_cpus)
        else:
            most = max(n.cpus for n in nodes)
            cpus = float(max(1, math.floor(most) if compute == "tasks" else math.floor(most / 2)))
        _width(nodes, cpus, 0.0, worker_cpus, worker_gpus, biggest)  # checks that one fits
        width = 1
    if max_width is not None:
        width = max(1, min(width, int(max_width)))
    return WorkerRequest(num_cpus=cpus, num_gpus=gpus, width=width)


def unit_request(*, use_gpu: bool, worker_cpus: float | None = None, worker_gpus: float | None = None,
                 max_width: int | None = None, nodes: Sequence[Node] | None = None) -> WorkerRequest:
    """The request of independent unit tasks (:mod:`winnow.ray.units`): ``worker_cpus``
    (default 1) and, with ``use_gpu`` where a node has GPUs, ``worker_gpus`` (default 1) each;
    as many in flight as the nodes hold at once."""
    check_knobs(worker_cpus, worker_gpus)
    nodes = alive_nodes() if nodes is None else list(nodes)
    biggest = largest_node(nodes)
    gpus = 0.0
    if use_gpu:
        gpus = float(worker_gpus) if worker_gpus is not None else (1.0 if cluster_has_gpus(nodes) else 0.0)
    cpus = float(worker_cpus) if worker_cpus is not None else 1.0
    width = _width(nodes, cpus, gpus, worker_cpus, worker_gpus if use_gpu else None, biggest)
    if max_width is not None:
        width = max(1, min(width, int(max_width)))
    return WorkerRequest(num_cpus=cpus, num_gpus=gpus, width=width)


def largest_node_cpus(worker_cpus: float | None = None, nodes: Sequence[Node] | None = None) -> float:
    """``worker_cpus`` (checked to fit a node) or every CPU of the node with the most: the size
    of one heavy unit (k-means) that may use all the cores a single node has."""
    check_knobs(worker_cpus)
    nodes = alive_nodes() if nodes is None else list(nodes)
    biggest = largest_node(nodes)
    cpus = float(worker_cpus) if worker_cpus is not None else float(max(1, math.floor(max(n.cpus for n in nodes))))
    _width(nodes, cpus, 0.0, worker_cpus, None, biggest)
    return cpus


def _width(nodes: Sequence[Node], cpus: float, gpus: float, worker_cpus: float | None,
           worker_gpus: float | None, biggest: Node) -> int:
    """Workers of (cpus, gpus) the nodes hold at once; an error when not even one fits."""
    width = sum(n.fits(cpus, gpus) for n in nodes)
    if width > 0:
        return width
    where = f"the largest alive Ray node has {biggest.describe()} ({len(nodes)} node(s) alive)"
    if worker_gpus is not None and gpus > max(n.gpus for n in nodes):
        raise ResourceRequestError(f"worker_gpus={_num(gpus)} is more than any node has: {where}")
    if worker_cpus is not None and cpus > max(n.cpus for n in nodes):
        raise ResourceRequestError(f"worker_cpus={_num(cpus)} is more than any node has: {where}")
    knobs = ", ".join(f"{k}={_num(v)}" for k, v in (("worker_cpus", worker_cpus), ("worker_gpus", worker_gpus))
                      if v is not None) or "the default worker size"
    raise ResourceRequestError(
        f"no alive Ray node holds a worker of {_num(cpus)} CPU(s) and {_num(gpus)} GPU(s) ({knobs}): {where}; "
        "set worker_cpus / worker_gpus to what one node has"
    )


# ---- inside the worker -------------------------------------------------------------------

def match_torch_threads() -> int | None:
    """In a Ray task or actor: torch's intra-op threads = the CPUs Ray gave it (floor, >= 1).

    Ray sets ``OMP_NUM_THREADS`` only for the first task of a worker process, and a reused
    worker keeps whatever torch read then (a light 1-CPU task before a whole-node model task
    leaves torch on one thread). Called before each row-group batch and unit. Outside a Ray
    worker (the driver, the local backend) nothing changes: a direct call uses torch's default.
    Returns the thread count it set, or None.
    """
    if "ray" not in sys.modules:
        return None
    import ray

    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    if ctx.worker.mode != ray.WORKER_MODE:
        return None
    cpus = ctx.get_assigned_resources().get("CPU")
    threads = max(1, math.floor(cpus)) if cpus else 1
    torch = sys.modules.get("torch")
    if torch is None:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # read by torch when it is imported
    elif torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
