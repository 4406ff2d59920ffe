"""Run one stage over the row groups of one partition: skip what is committed, fan out the rest.

One Ray Data block per remaining row group (never a whole partition in one block); a stage with a
fused worker (embed: reads, decode, model and commits overlapped) gets a few row groups per block,
each still committed alone. Model stages
use a GPU per worker where there are GPUs; light stages run as plain tasks. Each row group
commits as soon as it is done; one that raises does not stop the others. The run's
:class:`~winnow.execution.Execution` says where: ``backend="local"`` runs the same loop in this
process, without Ray (the chassis, :mod:`winnow.ray.chassis`, is shared with the unit runner).

How a model stage runs is the execution's ``compute`` (as in Ray Data's ``map_batches``; the
default, :func:`winnow.execution.default_compute`, follows who else uses the Ray):

- ``"tasks"``, for an embedded Ray this process owns (``WINNOW_RAY_EMBEDDED=process``:
  ``run_all``, ``airflow dags test``): Ray Data tasks on Ray's reused worker processes, each
  keeping its set-up stage (the loaded model) in a small cache, so the model loads once per
  worker for the whole run, not once per partition;
- ``"actors"``, for a Ray other drivers share (a cluster, or the shared local head: every Airflow
  task is a driver of its own): one Ray Data actor per model worker for the partition, holding
  the model for all of its row groups. Plain tasks there lose their worker between row groups
  whenever other drivers' tasks wait for the same CPUs or GPUs (Ray ends an idle worker past its
  worker limit after about a second), and every row group would load the model again.

A model worker's size (``worker_cpus`` / ``worker_gpus``, or the policy of
:mod:`winnow.ray.resources`) never exceeds one alive node; light stages are 1-CPU tasks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from winnow.execution import LOCAL, Execution
from winnow.faults import FaultSpec
from winnow.ray.chassis import Driver, dispatch, set_up_worker
from winnow.results import PartitionSummary, RowGroupResult
from winnow.rowgroups import CommitStore, RowGroupPlan, RunRoot
from winnow.rowgroups.failures import record_failure
from winnow.rowgroups.task import RowGroupTask, Stage

logger = logging.getLogger(__name__)

#: Set-up stages a worker process keeps (embed model + two heads fit; bounded for memory).
STAGE_CACHE_SIZE = 4
#: Records to compute up to which a light stage's partition runs in the calling process
#: (:func:`in_driver`); BENCHMARKS.md section 15 has the measurement behind it.
IN_DRIVER_MAX_RECORDS = 4000
IN_DRIVER_ENV = "WINNOW_IN_DRIVER_MAX_RECORDS"
#: A Ray of at most this many CPUs (all nodes together) runs a light stage's partition of any
#: size in the calling process: its workers share those CPUs with this process, so a Ray Data
#: execution only adds its per-row-group cost (measured on 2 CPUs to 8,000 records: BENCHMARKS.md
#: section 15). Not when ``WINNOW_IN_DRIVER_MAX_RECORDS`` is set: then that bound alone decides.
IN_DRIVER_ANY_SIZE_CPUS = 2
_STAGE_CACHE: OrderedDict[str, Stage] = OrderedDict()


class _RowGroupWorker:
    """Computes and commits row groups: the body of one Ray Data task, or of the local loop."""

    def __init__(
        self, stage: Stage, run_root: RunRoot, plan: dict, partition: int, faults: FaultSpec | None,
        cache_key: str | None = None,
    ):
        set_up_worker()
        self.stage = _set_up(stage, cache_key)
        self.store = CommitStore(run_root)
        self.run_root = self.store.run_root
        self.plan = RowGroupPlan(**plan)
        self.partition = partition
        self.faults = faults

    def run_one(self, row_group: int) -> RowGroupResult:
        t0 = time.perf_counter()
        task = RowGroupTask(self.run_root, self.plan, self.partition, row_group)
        records_in = self.plan.row_group_size(row_group)
        try:
            committed_rows = self._committed_rows(row_group)
            if committed_rows is not None:
                # A retried Ray task whose first try committed and then died before replying.
                return RowGroupResult(row_group=row_group, records_in=records_in, records_out=committed_rows,
                                      seconds=time.perf_counter() - t0, skipped=True)
            table = self.stage.process(task)
            if self.faults is not None:
                self.faults.fire(self.stage.name, row_group)
            self.store.commit_table(self.stage.name, self.partition, row_group, table)
            return RowGroupResult(row_group=row_group, records_in=records_in, records_out=table.num_rows,
                                  seconds=time.perf_counter() - t0)
        except Exception as exc:  # a row group's failure is isolated and reported
            return RowGroupResult.from_error(self.stage.name, row_group, records_in, exc, time.perf_counter() - t0)

    def _committed_rows(self, row_group: int) -> int | None:
        """Rows of the row group's committed file, or None when it is not committed."""
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        path = self.store.row_group_path(self.stage.name, self.partition, row_group)
        if self.store.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.store.fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows

    def run_many(self, row_groups: list[int]) -> Iterator[RowGroupResult]:
        """Results of ``row_groups`` in the order they finish. A stage with a fused worker
        (``row_group_pipeline``: the embed stage) overlaps reads, decode, model and commits over
        all of them; others run one row group at a time."""
        pipeline_of = getattr(self.stage, "row_group_pipeline", None)
        if pipeline_of is None or len(row_groups) < 2:
            for rg in row_groups:
                yield self.run_one(rg)
            return
        tasks = []
        for rg in row_groups:
            try:
                committed_rows = self._committed_rows(rg)
            except Exception:  # noqa: BLE001 - run_one reports the storage error for this row group
                committed_rows = None
            if committed_rows is not None:
                yield self.run_one(rg)  # reports it as skipped
            else:
                tasks.append(RowGroupTask(self.run_root, self.plan, self.partition, rg))
        yield from pipeline_of().run(tasks, self._commit)

    def _commit(self, task: RowGroupTask, table) -> None:
        if self.faults is not None:
            self.faults.fire(self.stage.name, task.row_group)
        self.store.commit_table(self.stage.name, self.partition, task.row_group, table)

    def __call__(self, batch: dict) -> dict:
        """A Ray worker's batch; the storage requests it retried ride on its first result."""
        from dataclasses import replace

        from winnow.rowgroups import retry

        before = retry.counts()
        results = list(self.run_many([int(rg) for rg in batch["row_group"]]))
        if results:
            results[0] = replace(results[0], **retry.counts_since(before))
        return RowGroupResult.to_columns(results)


def _set_up(stage: Stage, cache_key: str | None) -> Stage:
    """``stage.setup()`` once per process and config: reused across partitions and stages."""
    if cache_key is None:
        stage.setup()
        return stage
    cached = _STAGE_CACHE.get(cache_key)
    if cached is not None:
        _STAGE_CACHE.move_to_end(cache_key)
        return cached
    stage.setup()
    _STAGE_CACHE[cache_key] = stage
    while len(_STAGE_CACHE) > STAGE_CACHE_SIZE:
        _STAGE_CACHE.popitem(last=False)
    return stage


def stage_cache_key(stage: Stage) -> str:
    """Same class and same config (before setup) -> same key: safe to share a set-up stage."""
    try:
        # Plain pickle first: the local backend must not import Ray (a GPU box may have none).
        data = pickle.dumps(stage, protocol=5)
    except (pickle.PicklingError, AttributeError, TypeError):
        import ray.cloudpickle

        data = ray.cloudpickle.dumps(stage)
    return hashlib.sha256(data).hexdigest()


def in_driver(execution: Execution, records: int, *, light: bool, cluster_cpus: float | None = None) -> bool:
    """Whether a partition's ``records`` to compute of a ``light`` stage (the registry's flag)
    run in this process rather than in a Ray Data execution: at most
    :data:`IN_DRIVER_MAX_RECORDS`, or any number on a Ray of at most
    :data:`IN_DRIVER_ANY_SIZE_CPUS` CPUs (``cluster_cpus``; None: the Ray this process is attached
    to, else the embedded one it would start). ``WINNOW_IN_DRIVER_MAX_RECORDS`` replaces both
    with its bound (0 turns it off)."""
    if not light or execution.backend == "local":
        return False
    limit = os.environ.get(IN_DRIVER_ENV, "").strip()
    if limit:
        try:
            bound = int(limit)
        except ValueError:
            from winnow.exceptions import ConfigError

            raise ConfigError(f"{IN_DRIVER_ENV}={limit!r} is not a whole number of records (0 turns "
                              "in-process light stages off)") from None
        return records <= bound
    if records <= IN_DRIVER_MAX_RECORDS:
        return True
    cpus = cluster_cpus if cluster_cpus is not None else _ray_cpus(execution)
    return cpus is not None and cpus <= IN_DRIVER_ANY_SIZE_CPUS


def _ray_cpus(execution: Execution) -> float | None:
    """CPUs of the Ray this process is attached to (every alive node), or of the embedded one a
    run without an address starts (this machine's); None: not attached to a cluster yet."""
    import ray

    if ray.is_initialized():
        from winnow.ray.resources import alive_nodes

        return sum(node.cpus for node in alive_nodes())
    if execution.ray_address is None:
        return float(os.cpu_count() or 1)
    return None


def run_stage_partition(
    stage: Stage,
    *,
    run_root: RunRoot | str,
    plan: RowGroupPlan,
    partition: int,
    execution: Execution,
    uses_model: bool = False,
    light: bool = False,
    log: Callable[[str], None] | None = None,
    store: CommitStore | None = None,
    done: set[int] | None = None,
) -> PartitionSummary:
    """Run ``stage`` over the uncommitted row groups of ``partition`` of the run at ``run_root``
    (where it stores: the value travels to every worker) and return a summary.

    ``uses_model`` (the registry's flag) makes the stage a model worker: the execution's
    ``compute`` (``"tasks"`` or ``"actors"``), each of its ``worker_cpus`` CPUs and
    ``worker_gpus`` GPUs (None: the policy of :func:`~winnow.ray.resources.model_worker_request`:
    1 GPU + 1 CPU where there are GPUs, else a CPU share of the largest node), never more than one
    node holds. Row-group failures never raise: they are in ``summary.failed`` (the Airflow
    operator turns them into a task failure after everything else committed). ``store``: the
    caller's :class:`CommitStore` of ``run_root`` (what it already found out about the stage's
    folder is not asked of the store again), else one made here. ``done``: the row groups the
    caller found committed when its try began (its listing of the partition, with temp files
    cleaned), so the partition is not listed again; None lists it here. ``light`` (the
    registry's flag): few records to compute (:func:`in_driver`) run in this process, a model
    stage's head on the CPU there.
    """
    log = log or logger.info
    t0 = time.perf_counter()
    store = store if store is not None else CommitStore(run_root)
    row_groups = plan.partition_row_groups(partition)
    if done is None:
        todo = store.missing(stage.name, plan, partition)
    else:  # the caller listed the partition when its try began (temp files cleaned then)
        todo = [rg for rg in row_groups if rg not in done]
    summary = PartitionSummary(
        stage=stage.name, partition=partition, row_groups=len(row_groups), skipped=len(row_groups) - len(todo)
    )
    if not todo:
        log(f"{stage.name} partition {partition}: all {len(row_groups)} row groups already committed")
        summary.seconds = time.perf_counter() - t0
        return summary
    driver = Driver(stage.name, f"{stage.name} partition {partition}", "row groups", total=len(row_groups),
                    skipped=summary.skipped, log=log, rate=True)
    if in_driver(execution, sum(plan.row_group_size(rg) for rg in todo), light=light):
        # A Ray Data execution costs ~0.2-0.6 s before its first row group: more than this work.
        stage = stage.on_cpu() if uses_model and hasattr(stage, "on_cpu") else stage
        execution = LOCAL
    args = (stage, store.run_root, plan.to_dict(), partition, driver.faults)
    results = dispatch(
        execution, todo,
        local=lambda: _RowGroupWorker(*args, stage_cache_key(stage)).run_many(todo),
        remote=lambda: _ray_results(stage, args, todo, execution, uses_model, log=log),
    )
    for result in results:
        summary.add(result)
        if result.error:
            record_failure(store, stage.name, partition, result.row_group, result.error)
        driver.finished(result.row_group, error=result.error, committed_before=result.skipped,
                        records=result.records_in)
    summary.seconds = time.perf_counter() - t0
    return summary


def _ray_results(stage: Stage, args: tuple, todo: list[int], execution: Execution, uses_model: bool, *,
                 log: Callable[[str], None]) -> Iterator[RowGroupResult]:
    import ray.data

    if not uses_model:
        ds = ray.data.from_items([{"row_group": rg} for rg in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(_run_cached, fn_args=(*args, None), batch_size=1, num_cpus=1)
    else:
        ds = _model_dataset(stage, args, todo, execution, log=log)
    # Ray Data rows are dicts of columns: back to results here, where they leave Ray.
    for row in ds.iter_rows():
        yield RowGroupResult.from_row(row)


def _model_dataset(stage: Stage, args: tuple, todo: list[int], execution: Execution, *,
                   log: Callable[[str], None]):
    """The model workers' Ray Data pipeline over ``todo``: tasks or actors, sized by the alive nodes."""
    import ray.data

    from winnow.ray.resources import model_worker_request

    compute = execution.compute
    # Sized by the alive nodes, never by their sum: a request no node holds waits forever.
    request = model_worker_request(compute=compute, worker_cpus=execution.worker_cpus,
                                   worker_gpus=execution.worker_gpus, max_width=len(todo))
    per_block = row_groups_per_block(stage, len(todo), request.width)
    blocks = -(-len(todo) // per_block)
    width = min(request.width, blocks)
    log(f"{stage.name} partition {args[3]}: {width} model worker(s) of {request.num_cpus:g} CPU(s) and "
        f"{request.num_gpus:g} GPU(s) as Ray Data {compute}, {blocks} block(s)")
    ds = ray.data.from_items([{"row_group": rg} for rg in todo], override_num_blocks=blocks)
    if compute == "tasks":
        ds = ds.map_batches(
            _run_cached, fn_args=(*args, stage_cache_key(stage)), batch_size=per_block,
            compute=ray.data.TaskPoolStrategy(size=width), **request.ray_args(),
        )  # a task whose worker dies is retried by Ray (commits are idempotent).
    else:
        ds = ds.map_batches(
            _RowGroupActor, fn_constructor_args=(*args, None), batch_size=per_block,
            compute=ray.data.ActorPoolStrategy(size=width), **request.ray_args(),
        )  # Ray Data restarts a dead actor and retries its row groups (commits are idempotent).
    return ds


class _RowGroupActor:
    """A model stage's worker for one partition on a shared Ray: set up once, then every row
    group of the partition that Ray Data sends it."""

    def __init__(self, *args: Any) -> None:
        self.worker = _RowGroupWorker(*args)

    def __call__(self, batch: dict) -> dict:
        return self.worker(batch)


#: Row groups one Ray Data block carries at most, for a stage with a fused worker.
MAX_ROW_GROUPS_PER_BLOCK = 8


def row_groups_per_block(stage: Stage, row_groups: int, workers: int) -> int:
    """1 for most stages (one block per row group). A stage with a fused worker
    (``row_group_pipeline``) gets several per block so its model does not idle between row groups,
    while every worker still gets at least two blocks to balance."""
    if not hasattr(stage, "row_group_pipeline"):
        return 1
    return max(1, min(MAX_ROW_GROUPS_PER_BLOCK, row_groups // (2 * max(1, workers))))


def _run_cached(batch: dict, stage: Stage, run_root: RunRoot, plan: dict, partition: int, faults, cache_key) -> dict:
    return _RowGroupWorker(stage, run_root, plan, partition, faults, cache_key)(batch)
