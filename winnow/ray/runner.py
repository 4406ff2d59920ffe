"""Run one stage over the row groups of one partition: skip what is committed, fan out the rest.

One Ray Data block per remaining row group (never a whole partition in one block). Model stages
use a GPU per worker where there are GPUs; light stages run as plain tasks. Each row group
commits as soon as it is done; one that raises does not stop the others. ``backend="local"``
runs the same loop in this process, without Ray.

Model stages run as Ray Data tasks on Ray's reused worker processes, each process keeping its
set-up stage (the loaded model) in a small cache, so the model loads once per worker for the
whole run rather than once per partition (an actor pool would start new processes, and load the
model again, for every partition of every stage; see BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import logging
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from winnow.faults import FaultSpec
from winnow.rowgroups import CommitStore, RowGroupPlan
from winnow.rowgroups.failures import record_failure
from winnow.stages.base import RowGroupTask, Stage

logger = logging.getLogger(__name__)

MAX_FAILED_IN_SUMMARY = 50
#: Set-up stages a worker process keeps (embed model + two heads fit; bounded for memory).
STAGE_CACHE_SIZE = 4
_STAGE_CACHE: "OrderedDict[str, Stage]" = OrderedDict()


@dataclass
class PartitionSummary:
    """What one partition's run of one stage did; small enough for XCom."""

    stage: str
    partition: int
    row_groups: int = 0
    computed: int = 0
    skipped: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    records_in: int = 0
    records_out: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        failed = sorted(self.failed)
        d["failed"] = failed[:MAX_FAILED_IN_SUMMARY]
        d["failed_count"] = len(failed)
        d["first_error"] = self.failed[failed[0]] if failed else None
        d["seconds"] = round(self.seconds, 3)
        return d


class _RowGroupWorker:
    """Computes and commits row groups: the body of one Ray Data task, or of the local loop."""

    def __init__(
        self, stage: Stage, run_root: str, plan: dict, partition: int, faults: FaultSpec | None,
        cache_key: str | None = None, storage=None,
    ):
        if storage is not None:  # a Ray worker: use the driver's object-store settings
            from winnow.rowgroups.fs import use_storage

            use_storage(storage)
        self.stage = _set_up(stage, cache_key)
        self.run_root = run_root
        self.plan = RowGroupPlan(**plan)
        self.partition = partition
        self.faults = faults
        self.store = CommitStore(run_root)

    def run_one(self, row_group: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        task = RowGroupTask(self.run_root, self.plan, self.partition, row_group)
        records_in = self.plan.row_group_size(row_group)
        try:
            committed_rows = self._committed_rows(row_group)
            if committed_rows is not None:
                # A retried Ray task whose first try committed and then died before replying.
                return {
                    "row_group": row_group,
                    "error": "",
                    "records_in": records_in,
                    "records_out": committed_rows,
                    "seconds": time.perf_counter() - t0,
                    "skipped": True,
                }
            table = self.stage.process(task)
            if self.faults is not None:
                self.faults.fire(self.stage.name, row_group)
            self.store.commit_table(self.stage.name, self.partition, row_group, table)
            return {
                "row_group": row_group,
                "error": "",
                "records_in": records_in,
                "records_out": table.num_rows,
                "seconds": time.perf_counter() - t0,
                "skipped": False,
            }
        except Exception as exc:  # a row group's failure is isolated and reported
            text = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "stage %s row group %d failed: %s\n%s",
                self.stage.name, row_group, text, traceback.format_exc(limit=5),
            )
            return {
                "row_group": row_group,
                "error": text[:2000],
                "records_in": records_in,
                "records_out": 0,
                "seconds": time.perf_counter() - t0,
                "skipped": False,
            }

    def _committed_rows(self, row_group: int) -> int | None:
        """Rows of the row group's committed file, or None when it is not committed."""
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        path = self.store.row_group_path(self.stage.name, self.partition, row_group)
        if self.store.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.store.fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows

    def __call__(self, batch: dict) -> dict:
        rows = [self.run_one(int(rg)) for rg in batch["row_group"]]
        return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


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
    import ray.cloudpickle

    return hashlib.sha256(ray.cloudpickle.dumps(stage)).hexdigest()


class _Progress:
    def __init__(self, stage: str, partition: int, total: int, skipped: int, log: Callable[[str], None]):
        self.stage, self.partition, self.total, self.skipped, self.log = stage, partition, total, skipped, log
        self.t0 = time.perf_counter()
        self.done = 0
        self.failed = 0
        self.records = 0
        self.last = 0.0

    def update(self, result: dict[str, Any]) -> None:
        if result["error"]:
            self.failed += 1
        else:
            self.done += 1
            self.records += int(result["records_in"])
        now = time.perf_counter()
        finished = self.done + self.failed + self.skipped
        if now - self.last >= 2.0 or finished == self.total:
            self.last = now
            rate = self.records / max(now - self.t0, 1e-9)
            self.log(
                f"{self.stage} partition {self.partition}: {finished}/{self.total} row groups "
                f"({self.done} computed, {self.skipped} skipped, {self.failed} failed), "
                f"{rate:.1f} records/s"
            )


def run_stage_partition(
    stage: Stage,
    *,
    run_root: str,
    plan: RowGroupPlan,
    partition: int,
    uses_model: bool = False,
    ray_address: str | None = None,
    backend: Literal["ray", "local"] = "ray",
    log: Callable[[str], None] | None = None,
) -> PartitionSummary:
    """Run ``stage`` over the uncommitted row groups of ``partition`` and return a summary.

    ``uses_model`` (the registry's flag) gives each Ray worker a GPU where there are GPUs, or
    every CPU core on a CPU-only cluster. Row-group failures never raise: they are in
    ``summary.failed`` (the Airflow operator turns them into a task failure after everything
    else committed).
    """
    log = log or logger.info
    if backend not in ("ray", "local"):
        raise ValueError(f"backend must be 'ray' or 'local', got {backend!r}")
    t0 = time.perf_counter()
    store = CommitStore(run_root)
    row_groups = plan.partition_row_groups(partition)
    todo = store.missing(stage.name, plan, partition)
    summary = PartitionSummary(
        stage=stage.name, partition=partition, row_groups=len(row_groups), skipped=len(row_groups) - len(todo)
    )
    progress = _Progress(stage.name, partition, len(row_groups), summary.skipped, log)
    if not todo:
        log(f"{stage.name} partition {partition}: all {len(row_groups)} row groups already committed")
        summary.seconds = time.perf_counter() - t0
        return summary
    faults = FaultSpec.from_env()
    args = (stage, run_root, plan.to_dict(), partition, faults)
    if backend == "local":
        worker = _RowGroupWorker(*args, stage_cache_key(stage))
        results = (worker.run_one(rg) for rg in todo)
    else:
        results = _ray_results(stage, args, todo, ray_address, uses_model)
    for result in results:
        progress.update(result)
        if result["error"]:
            summary.failed[int(result["row_group"])] = result["error"]
            record_failure(store, stage.name, partition, int(result["row_group"]), result["error"])
        elif result.get("skipped"):
            summary.skipped += 1  # committed by an earlier try of the same Ray task
        else:
            if faults is not None:
                faults.fire_driver(stage.name, int(result["row_group"]))
            summary.computed += 1
            summary.records_in += int(result["records_in"])
            summary.records_out += int(result["records_out"])
    summary.seconds = time.perf_counter() - t0
    return summary


def _ray_results(stage: Stage, args: tuple, todo: list[int], ray_address: str | None, uses_model: bool):
    import ray.data

    from winnow.ray.cluster import connect, gpu_count

    connect(ray_address)
    from winnow.rowgroups.fs import current_storage

    # Object-store settings go to the workers as a task argument, not in the runtime env:
    # secrets stay out of Ray's job metadata and logs.
    storage = {"storage": current_storage()}
    ds = ray.data.from_items([{"row_group": rg} for rg in todo], override_num_blocks=len(todo))
    if not uses_model:
        ds = ds.map_batches(_run_cached, fn_args=(*args, None), fn_kwargs=storage, batch_size=1, num_cpus=1)
    else:
        gpus = gpu_count()
        width = max(1, min(gpus, len(todo))) if gpus else 1
        ds = ds.map_batches(
            _run_cached,
            fn_args=(*args, stage_cache_key(stage)),
            fn_kwargs=storage,
            batch_size=1,
            compute=ray.data.TaskPoolStrategy(size=width),
            num_gpus=1 if gpus else 0,
            # On CPU the one model worker gets every core: torch threads as wide as a direct call.
            num_cpus=1 if gpus else max(1, int(ray.cluster_resources().get("CPU", 1))),
        )  # a task whose worker dies is retried by Ray (commits are idempotent).
    yield from ds.iter_rows()


def _run_cached(batch: dict, stage: Stage, run_root: str, plan: dict, partition: int, faults, cache_key,
                storage=None) -> dict:
    return _RowGroupWorker(stage, run_root, plan, partition, faults, cache_key, storage)(batch)
