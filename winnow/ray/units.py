"""Run independent units of work (dedup buckets, index shard groups, one k-means) as Ray tasks.

The row-group runner (:mod:`winnow.ray.runner`) maps a stage over a partition's row groups;
the units here are not row groups, so this is its small sibling on the same chassis
(:mod:`winnow.ray.chassis`): one Ray task per unit, at most ``width`` in flight, each unit
committing its own output. A unit that raises does not stop the others: its error is in
``summary.failed``. The run's :class:`~winnow.execution.Execution` says where (``backend="local"``
runs the same loop in this process). The caller decides what is still to do (it lists what
storage holds); a Ray task whose worker died is retried by Ray, and a unit must be idempotent
(commit = one atomic write).

The driver (an Airflow task process) holds only the unit ids and the small per-unit results.
"""

from __future__ import annotations

import logging
import resource
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from winnow.execution import Execution
from winnow.ray.chassis import Driver, dispatch, set_up_worker
from winnow.results import UnitSummary, error_text

logger = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _call(fn: Callable[[int], dict[str, Any]], unit: int) -> dict[str, Any]:
    set_up_worker()
    t0 = time.perf_counter()
    try:
        out = dict(fn(unit) or {})
        error = ""
    except Exception as exc:  # one unit's failure is isolated and reported
        error = error_text(exc)
        logger.warning("unit %d failed: %s\n%s", unit, error, traceback.format_exc(limit=5))
        out = {}
    out.update(unit=unit, error=error, seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())
    return out


def _remote_call(fn: Callable[[int], dict[str, Any]], unit: int) -> dict[str, Any]:
    """:func:`_call` in a Ray worker: its result also carries the storage requests the worker
    retried for the unit (the caller's own process counts its own)."""
    from winnow.rowgroups import retry

    before = retry.counts()
    out = _call(fn, unit)
    out.update(retry.counts_since(before))
    return out


def run_units(
    stage: str,
    fn: Callable[[int], dict[str, Any]],
    units: Iterable[int],
    *,
    execution: Execution,
    skipped: int = 0,
    use_gpu: bool = False,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    width: int | None = None,
    log: Callable[[str], None] | None = None,
) -> UnitSummary:
    """Run ``fn(unit)`` for every unit, one Ray task each, and collect their result dicts.

    :param fn: computes and commits one unit; must be picklable (a module-level function or a
        ``functools.partial`` of one, with the run's :class:`~winnow.rowgroups.fs.RunRoot` among
        its arguments: that is how a worker knows where the run stores) and return a small dict.
    :param execution: where they run (its worker sizes are the model workers'; a unit's size is
        ``num_cpus`` / ``num_gpus``).
    :param skipped: units the caller found committed already (only counted).
    :param use_gpu: ``num_gpus`` GPUs (default 1) per task where a node has GPUs.
    :param num_cpus: CPUs per task (default 1; a single heavy unit may ask for a whole node).
        No task asks for more than one alive node has (an error instead of a task that never
        starts; see :mod:`winnow.ray.resources`).
    :param width: most tasks in flight (default: as many as the alive nodes hold at once).
    """
    log = log or logger.info
    todo = list(units)
    summary = UnitSummary(stage=stage, units=len(todo) + skipped, skipped=skipped)
    t0 = time.perf_counter()
    driver = Driver(stage, stage, "units", total=summary.units, skipped=skipped, log=log)
    results = dispatch(
        execution, todo,
        local=lambda: (_call(fn, u) for u in todo),
        remote=lambda: _ray_results(fn, todo, use_gpu=use_gpu, num_cpus=num_cpus, num_gpus=num_gpus, width=width),
    )
    for r in results:
        summary.results.append(r)
        summary.worker_peak_rss_mb = max(summary.worker_peak_rss_mb, float(r.get("peak_rss_mb", 0.0)))
        summary.add_storage(r)
        if r["error"]:
            summary.failed[int(r["unit"])] = r["error"]
        else:
            summary.computed += 1
        driver.finished(int(r["unit"]), error=r["error"])
    summary.seconds = time.perf_counter() - t0
    return summary


def _ray_results(fn, todo: list[int], *, use_gpu: bool, num_cpus: float | None,
                 num_gpus: float | None, width: int | None) -> Iterator[dict[str, Any]]:
    import ray

    from winnow.ray.resources import unit_request

    # Each task fits one alive node; width = how many the nodes hold at once (not the sum of
    # their CPUs divided, which counts cores no single task can combine).
    request = unit_request(use_gpu=use_gpu, worker_cpus=num_cpus, worker_gpus=num_gpus, max_width=len(todo))
    if width is None:
        width = request.width
    remote = ray.remote(_remote_call).options(**request.ray_args(), max_retries=3)
    fn_ref = ray.put(fn)
    pending: list = []
    queue = list(todo)
    while queue or pending:
        while queue and len(pending) < width:
            pending.append(remote.remote(fn_ref, queue.pop(0)))
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            yield ray.get(ref)
