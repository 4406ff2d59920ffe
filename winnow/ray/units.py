"""Run independent units of work (dedup buckets, index shard groups, one k-means) as Ray tasks.

The row-group runner (:mod:`winnow.ray.runner`) maps a stage over a partition's row groups;
the units here are not row groups, so this is its small sibling: one Ray task per unit, at most
``width`` in flight, each unit committing its own output. A unit that raises does not stop the
others: its error is in ``summary.failed``. ``backend="local"`` runs the same loop in this
process. The caller decides what is still to do (it lists what storage holds); a Ray task whose
worker died is retried by Ray, and a unit must be idempotent (commit = one atomic write).

The driver (an Airflow task process) holds only the unit ids and the small per-unit results.
"""

from __future__ import annotations

import logging
import resource
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

logger = logging.getLogger(__name__)



@dataclass
class UnitSummary:
    """What one call did over its units; small enough for XCom."""

    stage: str
    units: int = 0
    computed: int = 0
    skipped: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    #: Highest peak RSS (MiB) any worker process reported after one of its units.
    worker_peak_rss_mb: float = 0.0
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        from winnow.ray.runner import failure_fields

        d = {**asdict(self), **failure_fields(self.failed), "seconds": round(self.seconds, 3)}
        d.pop("results")
        return d


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _call(fn: Callable[[int], dict[str, Any]], unit: int, storage=None) -> dict[str, Any]:
    if storage is not None:  # a Ray worker: use the driver's object-store settings
        from winnow.rowgroups.fs import use_storage

        use_storage(storage)
    t0 = time.perf_counter()
    try:
        out = dict(fn(unit) or {})
        error = ""
    except Exception as exc:  # one unit's failure is isolated and reported
        text = f"{type(exc).__name__}: {exc}"
        logger.warning("unit %d failed: %s\n%s", unit, text, traceback.format_exc(limit=5))
        out, error = {}, text[:2000]
    out.update(unit=unit, error=error, seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())
    return out


def run_units(
    stage: str,
    fn: Callable[[int], dict[str, Any]],
    units: Iterable[int],
    *,
    skipped: int = 0,
    backend: Literal["ray", "local"] = "ray",
    ray_address: str | None = None,
    use_gpu: bool = False,
    num_cpus: int | None = None,
    width: int | None = None,
    log: Callable[[str], None] | None = None,
) -> UnitSummary:
    """Run ``fn(unit)`` for every unit, one Ray task each, and collect their result dicts.

    :param fn: computes and commits one unit; must be picklable (a module-level function or a
        ``functools.partial`` of one) and return a small dict.
    :param skipped: units the caller found committed already (only counted).
    :param use_gpu: one GPU per task where the cluster has GPUs.
    :param num_cpus: CPUs per task (default 1; a single heavy unit may ask for all).
    :param width: most tasks in flight (default: as many as the cluster's CPUs or GPUs allow).
    """
    log = log or logger.info
    if backend not in ("ray", "local"):
        raise ValueError(f"backend must be 'ray' or 'local', got {backend!r}")
    todo = list(units)
    summary = UnitSummary(stage=stage, units=len(todo) + skipped, skipped=skipped)
    t0 = time.perf_counter()
    if backend == "local":
        results: Iterable[dict[str, Any]] = (_call(fn, u) for u in todo)
    else:
        results = _ray_results(fn, todo, ray_address, use_gpu, num_cpus, width)
    from winnow.faults import FaultSpec

    faults = FaultSpec.from_env()  # test-only: kill this driver after a chosen unit committed
    last = 0.0
    for r in results:
        summary.results.append(r)
        summary.worker_peak_rss_mb = max(summary.worker_peak_rss_mb, float(r.get("peak_rss_mb", 0.0)))
        if r["error"]:
            summary.failed[int(r["unit"])] = r["error"]
        else:
            summary.computed += 1
            if faults is not None:
                faults.fire_driver(stage, int(r["unit"]))
        now = time.perf_counter()
        if now - last >= 2.0 or len(summary.results) == len(todo):
            last = now
            log(f"{stage}: {len(summary.results) + skipped}/{summary.units} units "
                f"({summary.computed} computed, {skipped} skipped, {len(summary.failed)} failed)")
    summary.seconds = time.perf_counter() - t0
    return summary


def _ray_results(fn, todo: list[int], ray_address: str | None, use_gpu: bool, num_cpus: int | None, width: int | None):
    if not todo:
        return
    import ray

    from winnow.ray.cluster import connect, gpu_count

    connect(ray_address)
    gpus = gpu_count() if use_gpu else 0
    cpus = num_cpus or 1
    if width is None:
        width = gpus if gpus else max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus)
    from winnow.rowgroups.fs import current_storage

    remote = ray.remote(_call).options(num_cpus=cpus, num_gpus=1 if gpus else 0, max_retries=3)
    fn_ref = ray.put(fn)
    # Object-store settings go as a task argument, not in the runtime env: secrets stay out of
    # Ray's job metadata and logs (as in the row-group runner).
    storage_ref = ray.put(current_storage())
    pending: list = []
    queue = list(todo)
    while queue or pending:
        while queue and len(pending) < width:
            pending.append(remote.remote(fn_ref, queue.pop(0), storage_ref))
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            yield ray.get(ref)
