"""Shared base of the curation operators: the run's config from params, engine errors as Airflow's.

Orchestration only. The engine (``winnow.pipeline``) is imported inside ``execute`` so a DAG
file that uses these operators parses without loading torch, Ray or storage clients.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from winnow_airflow.exceptions import RayJobError, RowGroupsFailedError
from winnow_airflow.hooks import RayHook
from winnow_airflow.jobs import JobTarget, RayJobRunner
from winnow_airflow.links import CurationViewLink
from winnow_airflow.progress import PartitionProgress
from winnow_airflow.ray_links import RayJobLink
from winnow_airflow.storage import run_storage

if TYPE_CHECKING:
    from airflow.sdk import Context

    from winnow.execution import Execution
    from winnow.pipeline import CurationConfig
    from winnow.results import PartitionSummary
    from winnow.rowgroups.fs import StorageOptions


#: Labels a mapped instance with its row-group range, e.g. "p3: row groups 12-15" (the operator
#: puts ``partition_label`` in the context once it has read the plan).
PARTITION_LABEL = "{{ partition_label | default('p' ~ ti.map_index) }}"


#: The DAG params the operators handle themselves, not run parameters of the engine's
#: ``CurationConfig``: accepted in params and run conf, left out of the config. Any other key
#: that is not a config field fails the task that reads it (the index first) naming it.
AIRFLOW_PARAMS = frozenset({"ray_conn_id", "storage_conn_id"})


def default_run_key(context: Mapping[str, Any]) -> str:
    """``YYYYMMDD`` of the logical date, or the run id (path-safe) for runs without one
    (:func:`winnow.runkey.default_run_key`)."""
    from winnow.runkey import default_run_key as from_run

    dag_run = context.get("dag_run")
    logical_date = getattr(dag_run, "logical_date", None) or context.get("logical_date")
    return from_run(logical_date, getattr(dag_run, "run_id", None) or context.get("run_id"))


@contextmanager
def engine_errors() -> Iterator[None]:
    """Config errors fail the task at once (no retry would fix them); the rest may retry."""
    from winnow.exceptions import ConfigError, StageConfigMismatch

    try:
        yield
    except (ConfigError, StageConfigMismatch) as exc:
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


def step_fingerprint(cfg: CurationConfig, stage: str) -> str:
    """The digest in a stage's ``_stage.json`` (the index task wrote it); ``"unset"`` before."""
    from winnow.rowgroups import CommitStore

    return CommitStore(cfg.root).fingerprint_digest(stage)


class CurationOperator(BaseOperator):
    """Base of every curation operator: builds the run's ``CurationConfig`` and says where its
    work runs.

    The config is the DAG run's params (typed and checked by their JSON schema), overlaid with
    ``stage_config``, then with the explicit fields below when they are not empty. An empty run
    key resolves to the logical date (``YYYYMMDD``) or, for a run without one, the run id.

    Where the work runs is the ``ray`` connection's: an embedded local Ray (no connection), the
    cluster this process attaches to (driver mode), or one Ray Job per step on a remote cluster
    (job mode: the task submits, defers to :class:`~winnow_airflow.triggers.RayJobTrigger` and reads
    the job's summary from storage; see :mod:`winnow_airflow.jobs`).

    :param input_uri: WebDataset shards (folder, glob or URI); may hold a template such as
        ``s3://bucket/shards/{{ ds }}/``, rendered even when it comes from a param.
    :param output_root: where run roots live; the run root is ``<output_root>/<run_key>``.
    :param run_key: names this run's folder; empty means the default above.
    :param stage_config: other ``CurationConfig`` fields for this task (templated).
    :param ray_conn_id: Airflow connection of type ``ray``; falls back to the ``ray_conn_id``
        param, then ``ray_default``; no such connection means an embedded local Ray.
    :param worker_cpus: CPUs of one model worker (over the connection's extra ``worker_cpus``);
        default: winnow's policy (see the README's cluster section). Never more than one node has.
    :param worker_gpus: GPUs of one model worker (over the connection's extra ``worker_gpus``);
        default 1 where the cluster has GPUs.
    :param poll_interval: job mode: most seconds between job status polls (default: the
        connection's extra ``poll_interval``, else 5).
    :param job_timeout: job mode: seconds the task may wait for its job before it fails (the
        job keeps running; a retry reattaches). ``None`` (default): no limit.
    :param cancel_on_kill: job mode: stop the Ray job when a person marks the task failed or
        clears it while it runs. Default ``False``: keep the job, the next try reattaches.
    :param runtime_env: job mode: Ray runtime env of the job (``working_dir``, ``py_modules``,
        ``image_uri``, ``env_vars``...), over the connection's extra ``runtime_env``.
    :param entrypoint_num_cpus: job mode: CPUs Ray reserves for the job's driver process.
    """

    template_fields = ("input_uri", "output_root", "run_key", "stage_config", "ray_conn_id", "runtime_env")
    template_fields_renderers = {"stage_config": "json"}
    ui_color = "#e8f4e8"
    operator_extra_links = (CurationViewLink(), RayJobLink())

    def __init__(self, *, input_uri: str | None = None, output_root: str | None = None,
                 run_key: str | None = None, stage_config: dict[str, Any] | None = None,
                 ray_conn_id: str | None = None, worker_cpus: float | None = None, worker_gpus: float | None = None,
                 poll_interval: float | None = None, job_timeout: float | None = None,
                 cancel_on_kill: bool = False, runtime_env: dict[str, Any] | None = None,
                 entrypoint_num_cpus: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.input_uri, self.output_root, self.run_key = input_uri, output_root, run_key
        self.stage_config, self.ray_conn_id = stage_config, ray_conn_id
        self.worker_cpus, self.worker_gpus = worker_cpus, worker_gpus
        # job mode
        self.poll_interval, self.job_timeout, self.cancel_on_kill = poll_interval, job_timeout, cancel_on_kill
        self.runtime_env, self.entrypoint_num_cpus = runtime_env, entrypoint_num_cpus

    def curation_config(self, context: Context) -> CurationConfig:
        """The run's config, with where it stores (:meth:`run_storage`): the value this try's
        engine calls, Ray workers and Ray Jobs all work from."""
        from winnow.pipeline import CurationConfig

        merged: dict[str, Any] = {**(context.get("params") or {}), **(self.stage_config or {})}
        for name in ("input_uri", "output_root", "run_key"):
            if getattr(self, name):
                merged[name] = getattr(self, name)
        if isinstance(merged.get("input_uri"), str) and "{{" in merged["input_uri"]:
            merged["input_uri"] = self.render_template(merged["input_uri"], context)
        if not merged.get("run_key"):
            merged["run_key"] = default_run_key(context)
        # Full validation (it lists the input) runs once, in the index task.
        storage = self.run_storage(context)
        with engine_errors():
            cfg = CurationConfig.from_params(merged, also_accepted=AIRFLOW_PARAMS, storage=storage)
        self.log.info("run root %s", cfg.run_root)
        return cfg

    def run_storage(self, context: Context) -> StorageOptions:
        """How this run reaches its object store: the connection named by ``storage_conn_id``,
        else the AWS_* environment (:func:`winnow_airflow.storage.run_storage`); looked up once
        per try. Never in the config's params, so no fingerprint, summary or XCom holds it."""
        conn_id = self.storage_conn_id(context)
        cached = getattr(self, "_run_storage", None)
        if cached is not None and cached[0] == conn_id:
            return cached[1]
        options = run_storage(conn_id)
        if conn_id:
            self.log.info("object storage: connection %r, endpoint %s", conn_id, options.endpoint)
        self._run_storage = (conn_id, options)
        return options

    def storage_conn_id(self, context: Context) -> str | None:
        """The run's ``storage_conn_id`` (this task's ``stage_config``, else the run's params)."""
        return (self.stage_config or {}).get("storage_conn_id") or (context.get("params") or {}).get("storage_conn_id") or None

    @staticmethod
    def lease_owner(context: Context) -> str:
        """Every task of one DAG run shares the run root's lease; another run is refused."""
        return f"{context['dag'].dag_id}/{context['run_id']}"

    def ray_hook(self, context: Context) -> RayHook:
        """The ``ray`` connection of this task (its own, the ``ray_conn_id`` param, or the default)."""
        conn_id = self.ray_conn_id or (context.get("params") or {}).get("ray_conn_id") or RayHook.default_conn_name
        cached = getattr(self, "_ray_hook", None)
        if cached is not None and cached.ray_conn_id == conn_id:
            return cached  # one lookup and one log line per try
        hook = RayHook(ray_conn_id=conn_id)
        try:
            self.log.info("Ray: %s", hook.describe())
        except ValueError as exc:  # a malformed connection: no retry fixes it
            raise AirflowFailException(str(exc)) from exc
        self._ray_hook = hook
        return hook

    def execution(self, context: Context) -> Execution:
        """Where this try's step runs, as the engine's one value (built once per call). Job mode:
        the job's (:func:`winnow.job.job_execution`: the cluster the job runs on, a model actor
        per partition). Otherwise this process: attached to the connection's cluster (driver
        mode) or an embedded local Ray (no connection), model stages as tasks that keep their
        model across partitions on a Ray this process started for itself, one model actor per
        partition on a Ray other drivers share (:func:`winnow.execution.default_compute`). Model
        workers of ``worker_cpus`` CPUs and ``worker_gpus`` GPUs: this task's arguments over the
        connection's extras."""
        from winnow.execution import Execution
        from winnow.job import job_execution

        hook = self.ray_hook(context)
        resolved = hook.resolve()
        cpus = self.worker_cpus if self.worker_cpus is not None else (resolved.worker_cpus if resolved else None)
        gpus = self.worker_gpus if self.worker_gpus is not None else (resolved.worker_gpus if resolved else None)
        if hook.mode == "job":
            return job_execution(worker_cpus=cpus, worker_gpus=gpus)
        return Execution(ray_address=self.ray_address(context), worker_cpus=cpus, worker_gpus=gpus)

    def ray_address(self, context: Context) -> str | None:
        """Attach this process to the connection's cluster (driver mode); its GCS address."""
        from winnow.exceptions import RayAuthError  # the engine's: connect() refused the token
        from winnow.ray.cluster import connect

        hook = self.ray_hook(context)
        address = hook.get_address()
        resolved = hook.resolve()
        if address is not None:
            try:
                connect(address, token=resolved.token if resolved else None)
            except RayAuthError as exc:
                raise AirflowFailException(f"connection {hook.ray_conn_id!r}: {exc}") from exc
        return address

    # ---- job mode: one Ray Job per step (winnow_airflow.jobs) ----------------------------------
    def run_step(self, context: Context, target: JobTarget, in_process) -> Any:
        """Run this task's step: as a Ray Job in job mode (this try defers), else ``in_process``
        (the engine call, taking ``execution=``: :meth:`execution`) returning the result."""
        hook = self.ray_hook(context)
        if hook.mode == "job":
            return RayJobRunner(self, hook).run(context, target)
        # No Ray Job in this mode: nothing to push; the task runner's finalize pushes the link's
        # value (empty: no job) for every try, as it does for every extra link.
        with engine_errors():
            return in_process(execution=self.execution(context))

    def job_target(self, context: Context) -> JobTarget:
        """This task's step as a Ray Job target (job mode's ``execute_complete`` rebuilds it)."""
        raise NotImplementedError

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        """Job mode: the trigger saw the job end; storage says what it did."""
        return RayJobRunner(self, self.ray_hook(context)).complete(context, self.job_target(context), event)

    def job_shortcut(self, context: Context, target: JobTarget, status: str | None, submission_id: str | None) -> Any:
        """Job mode, before submitting: the result when no job is needed (this step's job already
        SUCCEEDED: its summary in storage is the result; or, with no job of its own yet, the run's
        one job ran this step: :func:`winnow.job.run_rest`), else None."""
        if status is None:
            return self.chained_result(context, target)
        if status != "SUCCEEDED":
            return None
        from winnow.job import read_summary

        self.log.info("Ray job %s already SUCCEEDED: completing from storage", submission_id)
        RayJobLink.persist(context, self.ray_hook(context).job_url(submission_id))
        return self.job_result(context, target, status,
                               read_summary(target.summary_uri(submission_id), target.cfg.storage),
                               f"Ray job {submission_id} ended SUCCEEDED")

    def chained_result(self, context: Context, target: JobTarget) -> Any:
        """The result of this step as another step's Ray Job ran it (a small run's index job runs
        every later step: :func:`winnow.job.run_rest`), or None where no such job left a summary
        without failures under this step's fingerprint."""
        from winnow.job import chained_summary_uri, read_summary

        summary = read_summary(chained_summary_uri(target.cfg.run_root, target.stage, target.partition,
                                                   target.fingerprint, bucket=target.bucket), target.cfg.storage)
        if summary is None or summary.get("failed") or summary.get("failed_count"):
            return None
        self.log.info("%s (%s) ran in the run's Ray job (the index's job runs a small run whole): no Ray job "
                      "needed", target.stage, target.label)
        return self.step_result(context, {k: v for k, v in summary.items() if k != "errors"})

    def job_result(self, context: Context, target: JobTarget, status: str, summary: dict[str, Any] | None,
                   reason: str) -> Any:
        """Job mode, after the job ended: the task's result from the job's summary; a job that did
        not succeed fails the try with the job's own error (a retry submits the next generation)."""
        if status != "SUCCEEDED" or summary is None:
            raise RayJobError(f"{target.stage} ({target.label}): {reason.rstrip('.')}. A retry submits a new Ray job; "
                              "committed work is kept.")
        return self.step_result(context, {k: v for k, v in summary.items() if k != "errors"})

    def step_result(self, context: Context, summary: dict[str, Any]) -> Any:
        """The task's return value from its step's summary (the same in every mode)."""
        return summary

    def on_kill(self) -> None:
        """Killed while submitting (the deferred case is the trigger's ``on_kill``)."""
        job = getattr(self, "_submitted", None)
        if job and self.cancel_on_kill:
            hook, submission_id = job
            hook.stop_job(submission_id)
            self.log.info("asked Ray to stop job %s (cancel_on_kill)", submission_id)

    # ---- OpenLineage (winnow_airflow.lineage; the provider is the optional extra) ---------------
    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """What this task read and wrote, and the run's model, weights, thresholds and counts, as
        the OpenLineage provider's ``OperatorLineage`` (:mod:`winnow_airflow.lineage`); None
        without the provider, or when it cannot be built (the task's outcome never depends on it)."""
        return self.openlineage(task_instance)

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        """The same datasets and facets for a failed try (what it committed stays in the run
        root); the provider adds the error."""
        return self.openlineage(task_instance)

    def openlineage_step(self) -> str:
        """The step this task runs, by the name the run root and the lineage give it: its stage,
        its corpus step, or ``report``."""
        step = getattr(self, "stage", None) or getattr(self, "step", None)
        if step:
            return step
        if any(cls.__name__ == "ReportOperator" for cls in type(self).__mro__):
            return "report"
        raise ValueError(f"{type(self).__name__} runs no stage winnow's lineage knows")

    def openlineage(self, task_instance: Any) -> Any:
        """The ``OperatorLineage`` of this try, from the run's config as ``execute`` built it (the
        try's template context, the storage settings this try looked up): None without the
        provider or on any error (logged)."""
        from winnow_airflow import lineage

        def build() -> Any:
            step = self.openlineage_step()
            return lineage.operator_lineage(step, self.curation_config(task_instance.get_template_context()))

        return lineage.guarded(build, self.task_id, self.log)


class RowGroupStageOperator(CurationOperator):
    """Runs one stage over the row groups of one partition; committed row groups are skipped.

    Progress (row groups committed and failed) is kept in the task state store of this map
    index, scoped by the stage fingerprint and reconciled with storage on start. The XCom is
    the small partition summary. When row groups fail, the others still commit and the task
    raises :class:`~winnow_airflow.exceptions.RowGroupsFailedError` naming them, so its retry computes only those.

    With a job-mode ``ray`` connection the partition runs as one Ray Job (``python -m
    winnow.job``) and the task defers while it runs; otherwise this process drives Ray
    itself. Takes the :class:`CurationOperator` arguments.

    :param partition: the partition index (mapped: one task instance per partition).
    """

    stage: ClassVar[str]
    template_fields = (*CurationOperator.template_fields, "partition")

    def __init__(self, *, partition: int, **kwargs: Any) -> None:
        kwargs.setdefault("map_index_template", PARTITION_LABEL)
        super().__init__(**kwargs)
        self.partition = partition

    def _partition_run(self, context: Context) -> PartitionRun:
        from winnow import pipeline
        from winnow.rowgroups import CommitStore
        from winnow.rowgroups.store import stored_plan

        cfg = self.curation_config(context)
        partition = int(self.partition)
        store = CommitStore(cfg.root)
        with engine_errors():
            # The stage's _stage.json (one GET) has the plan and the digest; the index's file
            # only where it predates the plan in it.
            stored = store.read_fingerprint(self.stage)
            plan = stored_plan(stored)
            if plan is None or (plan.buffer_size, plan.max_partitions) != (cfg.buffer_size, cfg.max_partitions):
                plan = pipeline.load_plan(cfg)
        if not 0 <= partition < plan.num_partitions:
            raise AirflowFailException(
                f"partition {partition} is out of range: run {cfg.run_root} has "
                f"{plan.num_partitions} partitions; map this task over the index task's output"
            )
        context["partition_label"] = plan.describe_partition(partition)  # map_index_template
        fingerprint = (stored or {}).get("digest", "unset")
        progress = PartitionProgress(context.get("task_state_store"), self.stage, fingerprint, self.log)
        return PartitionRun(cfg=cfg, plan=plan, partition=partition, store=store, fingerprint=fingerprint,
                            stored=stored,
                            progress=progress, row_groups=len(plan.partition_row_groups(partition)),
                            try_number=getattr(context.get("ti"), "try_number", None),
                            label=context["partition_label"])

    def job_target(self, context: Context) -> JobTarget:
        run = self._partition_run(context)
        return JobTarget(stage=self.stage, cfg=run.cfg, fingerprint=run.fingerprint, label=run.label,
                         try_number=run.try_number, partition=run.partition, state=run)

    def execute(self, context: Context) -> dict[str, Any]:
        from winnow import pipeline

        target = self.job_target(context)
        run: PartitionRun = target.state
        # The one listing of the partition this try makes (temp files of a crashed writer
        # cleaned: no writer of this run is active yet); the run below starts from it.
        done = run.store.completed(self.stage, run.partition, clean_temp=True)
        run.progress.reconcile(len(done), run.row_groups, try_number=run.try_number)

        def in_process(**where: Any) -> dict[str, Any]:
            summary = pipeline.run_partition(run.cfg, self.stage, run.partition, owner=self.lease_owner(context),
                                             log=self.log.info, store=run.store, stored=run.stored, done=done,
                                             **where)
            return self.finish(context, run, summary)

        return self.run_step(context, target, in_process)

    def job_shortcut(self, context: Context, target: JobTarget, status: str | None, submission_id: str | None) -> Any:
        from winnow.job import read_summary

        run: PartitionRun = target.state
        missing = run.store.missing(self.stage, run.plan, run.partition)
        if missing:
            return None
        if status == "SUCCEEDED":
            return super().job_shortcut(context, target, status, submission_id)
        previous = read_summary(target.summary_uri(submission_id), run.cfg.storage) if submission_id else None
        if previous is None:
            # Run by the job of an earlier stage of this partition (winnow.job --chain).
            from winnow.job import chained_summary_uri

            previous = read_summary(chained_summary_uri(run.cfg.run_root, self.stage, run.partition, run.fingerprint),
                                    run.cfg.storage)
            if previous is not None:
                self.log.info("every row group of %s was committed by the Ray job of an earlier stage of this "
                              "partition: no Ray job needed", run.label)
        else:
            self.log.info("every row group of %s is committed: no Ray job needed", run.label)
        RayJobLink.persist(context, "")
        return self.finish(context, run, self._skipped_summary(run, previous))

    def job_result(self, context: Context, target: JobTarget, status: str, summary: dict[str, Any] | None,
                   reason: str) -> dict[str, Any]:
        """Reconcile the ended job with storage: storage says what is committed."""
        run: PartitionRun = target.state
        missing = run.store.missing(self.stage, run.plan, run.partition)
        self.log.info("storage: %d of %d row groups of %s committed", run.row_groups - len(missing),
                      run.row_groups, run.label)
        from winnow.results import PartitionSummary

        errors = (summary or {}).get("errors") or {}
        reason = f"not committed: {reason}"
        result = PartitionSummary.from_dict(summary) if summary else PartitionSummary(
            stage=self.stage, partition=run.partition, row_groups=run.row_groups,
            skipped=run.row_groups - len(missing))
        result.failed = {rg: errors.get(str(rg), reason) for rg in missing}  # storage wins
        return self.finish(context, run, result)

    def finish(self, context: Context, run: PartitionRun, summary: PartitionSummary) -> dict[str, Any]:
        """Record the outcome; return the summary's XCom, or raise
        :class:`~winnow_airflow.exceptions.RowGroupsFailedError` naming the failed row groups."""
        from winnow import exceptions as engine
        from winnow.rowgroups import retry

        # Every row group of the partition is committed but the failed ones (the job path's
        # summary took its failures from storage): no listing again.
        committed = run.row_groups - len(summary.failed)
        summary.add_storage(retry.counts_since(run.storage_before))
        run.progress.save(committed=committed, row_groups=run.row_groups, failed=summary.failed,
                          state="failed" if summary.failed else "done", try_number=run.try_number)
        result = summary.to_dict()
        self.log.info("%s %s: %s", self.stage, run.label, result)
        if summary.failed:
            context["ti"].xcom_push(key="return_value", value=result)
            cause = engine.RowGroupsFailedError([summary])
            raise RowGroupsFailedError(str(cause)) from cause
        return result

    def _skipped_summary(self, run: PartitionRun, previous: dict[str, Any] | None) -> PartitionSummary:
        """The summary of a partition with nothing left to do: the job's that did it, else all skipped."""
        from winnow.results import PartitionSummary

        if previous and not previous.get("failed"):
            return PartitionSummary.from_dict(previous)
        return PartitionSummary(stage=self.stage, partition=run.partition, row_groups=run.row_groups,
                                skipped=run.row_groups)


@dataclass
class PartitionRun:
    """One stage over one partition of one run, as a task try sees it."""

    cfg: CurationConfig
    plan: Any
    partition: int
    store: Any
    fingerprint: str
    progress: PartitionProgress
    row_groups: int
    try_number: int | None
    label: str
    #: The stage's ``_stage.json`` as this try read it (None: not recorded).
    stored: Any = None
    #: Storage requests this process had retried when the try began (its own are added at the end).
    storage_before: dict = field(default_factory=lambda: _storage_counts())


def _storage_counts() -> dict:
    from winnow.rowgroups import retry

    return retry.counts()
