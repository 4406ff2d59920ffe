"""Shared base of the curation operators: the run's config from params, engine errors as Airflow's.

Orchestration only. The engine (``winnow.pipeline``) is imported inside ``execute`` so a DAG
file that uses these operators parses without loading torch, Ray or storage clients.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from operators.hooks import ACTIVE_STATES, RayAuthError, RayHook
from operators.links import CurationViewLink
from operators.progress import PartitionProgress
from operators.ray_links import RayJobLink

if TYPE_CHECKING:
    from airflow.sdk import Context

    from winnow.pipeline import CurationConfig


#: Labels a mapped instance with its row-group range, e.g. "p3: row groups 12-15" (the operator
#: puts ``partition_label`` in the context once it has read the plan).
PARTITION_LABEL = "{{ partition_label | default('p' ~ ti.map_index) }}"


class RowGroupsFailed(AirflowException):
    """Some row groups of a partition failed; the others are committed and a retry does the rest."""


def default_run_key(context: Mapping[str, Any]) -> str:
    """``YYYYMMDD`` of the logical date, or the run id (path-safe) for runs without one."""
    dag_run = context.get("dag_run")
    logical_date = getattr(dag_run, "logical_date", None) or context.get("logical_date")
    if logical_date is not None:
        return logical_date.strftime("%Y%m%d")
    run_id = getattr(dag_run, "run_id", None) or context.get("run_id") or "manual"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(run_id)).strip("_")


@contextmanager
def engine_errors() -> Iterator[None]:
    """Config errors fail the task at once (no retry would fix them); the rest may retry."""
    from winnow.pipeline import ConfigError
    from winnow.rowgroups.errors import StageConfigMismatch

    try:
        yield
    except (ConfigError, StageConfigMismatch) as exc:
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


def use_storage_connection(conn_id: str | None, log) -> None:
    """Object-store settings for this task's engine calls and its Ray workers: the Airflow
    connection ``conn_id`` (type ``aws``: login = access key id, password = secret access key,
    extras ``endpoint_url`` and ``region_name``), or with none the AWS_* environment variables.
    The settings never enter the run's config, so no fingerprint, summary or XCom holds them."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    from winnow.rowgroups.fs import StorageOptions, use_storage

    if not conn_id:
        use_storage(None)
        return
    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException as exc:
        raise AirflowFailException(
            f"storage_conn_id {conn_id!r}: no such Airflow connection. Create a connection of type "
            "'aws' (login: access key id, password: secret access key, extra endpoint_url and "
            "region_name), or leave storage_conn_id empty to use the AWS_* environment variables."
        ) from exc
    extra = conn.extra_dejson or {}
    options = StorageOptions(
        endpoint_url=extra.get("endpoint_url") or None,
        region=extra.get("region_name") or None,
        access_key_id=conn.login or extra.get("aws_access_key_id") or None,
        secret_access_key=conn.password or extra.get("aws_secret_access_key") or None,
        session_token=extra.get("aws_session_token") or None,
        source=f"the Airflow connection {conn_id!r} (storage_conn_id)",
    )
    use_storage(options)
    log.info("object storage: connection %r, endpoint %s", conn_id, options.endpoint)


class CurationOperator(BaseOperator):
    """Base of every curation operator: builds the run's ``CurationConfig``.

    The config is the DAG run's params (typed and checked by their JSON schema), overlaid with
    ``stage_config``, then with the explicit fields below when they are not empty. An empty run
    key resolves to the logical date (``YYYYMMDD``) or, for a run without one, the run id.

    :param input_uri: WebDataset shards (folder, glob or URI); may hold a template such as
        ``s3://bucket/shards/{{ ds }}/``, rendered even when it comes from a param.
    :param output_root: where run roots live; the run root is ``<output_root>/<run_key>``.
    :param run_key: names this run's folder; empty means the default above.
    :param stage_config: other ``CurationConfig`` fields for this task (templated).
    :param ray_conn_id: Airflow connection of type ``ray``; falls back to the ``ray_conn_id``
        param, then ``ray_default``; no such connection means an embedded local Ray.
    """

    template_fields = ("input_uri", "output_root", "run_key", "stage_config", "ray_conn_id")
    template_fields_renderers = {"stage_config": "json"}
    ui_color = "#e8f4e8"

    def __init__(self, *, input_uri: str | None = None, output_root: str | None = None,
                 run_key: str | None = None, stage_config: dict[str, Any] | None = None,
                 ray_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.input_uri = input_uri
        self.output_root = output_root
        self.run_key = run_key
        self.stage_config = stage_config
        self.ray_conn_id = ray_conn_id

    def curation_config(self, context: Context) -> CurationConfig:
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
        with engine_errors():
            cfg = CurationConfig.from_params(merged)
        self.log.info("run root %s", cfg.run_root)
        use_storage_connection(merged.get("storage_conn_id"), self.log)
        return cfg

    @staticmethod
    def lease_owner(context: Context) -> str:
        """Every task of one DAG run shares the run root's lease; another run is refused."""
        return f"{context['dag'].dag_id}/{context['run_id']}"

    def ray_hook(self, context: Context) -> RayHook:
        """The ``ray`` connection of this task (its own, the ``ray_conn_id`` param, or the default)."""
        conn_id = self.ray_conn_id or (context.get("params") or {}).get("ray_conn_id")
        hook = RayHook(ray_conn_id=conn_id or RayHook.default_conn_name)
        try:
            self.log.info("Ray: %s", hook.describe())
        except ValueError as exc:  # a malformed connection: no retry fixes it
            raise AirflowFailException(str(exc)) from exc
        return hook

    def global_step_target(self, context: Context) -> dict[str, Any]:
        """Where a global step (index, centroids, a pairwise bucket) runs: on the connection's
        cluster in driver mode or on an embedded Ray. In job mode such a step runs in this task
        process (``backend="local"``, one unit at a time): only the per-partition stages are
        submitted as Ray Jobs so far."""
        hook = self.ray_hook(context)
        resolved = hook.resolve()
        if resolved is not None and resolved.mode == "job":
            self.log.info("connection %r is in job mode: this global step runs in the task process", hook.ray_conn_id)
            return {"ray_address": None, "backend": "local"}
        return {"ray_address": self.ray_address(context), "backend": "ray"}

    def ray_address(self, context: Context) -> str | None:
        """Attach this process to the connection's cluster (driver mode); its GCS address."""
        from winnow.ray.cluster import RayAuthFailed, connect

        hook = self.ray_hook(context)
        address = hook.get_address()
        resolved = hook.resolve()
        if address is not None:
            try:
                connect(address, token=resolved.token if resolved else None)
            except RayAuthFailed as exc:
                raise AirflowFailException(f"connection {hook.ray_conn_id!r}: {exc}") from exc
        return address


class RowGroupStageOperator(CurationOperator):
    """Runs one stage over the row groups of one partition; committed row groups are skipped.

    Progress (row groups committed and failed) is kept in the task state store of this map
    index, scoped by the stage fingerprint and reconciled with storage on start. The XCom is
    the small partition summary. When row groups fail, the others still commit and the task
    raises :class:`RowGroupsFailed` naming them, so its retry computes only those.

    With a job-mode ``ray`` connection the partition runs as one Ray Job (``python -m
    winnow.ray.job``) and the task defers while it runs (see :class:`RayJobRunner`); otherwise
    this process drives Ray itself.

    :param partition: the partition index (mapped: one task instance per partition).
    :param poll_interval: job mode: seconds between job status polls (default: the
        connection's extra ``poll_interval``, else 5).
    :param job_timeout: job mode: seconds the task may wait for its job before it fails (the
        job keeps running; a retry reattaches). ``None`` (default): no limit.
    :param cancel_on_kill: job mode: stop the Ray job when a person marks the task failed or
        clears it while it runs. Default ``False``: keep the job, the next try reattaches.
    :param runtime_env: job mode: Ray runtime env of the job (``working_dir``, ``py_modules``,
        ``image_uri``, ``env_vars``...), over the connection's extra ``runtime_env``.
    :param entrypoint_num_cpus: job mode: CPUs Ray reserves for the job's driver process.
    """

    stage: ClassVar[str]
    template_fields = (*CurationOperator.template_fields, "partition", "runtime_env")
    operator_extra_links = (CurationViewLink(), RayJobLink())

    def __init__(self, *, partition: int, poll_interval: float | None = None, job_timeout: float | None = None,
                 cancel_on_kill: bool = False, runtime_env: dict[str, Any] | None = None,
                 entrypoint_num_cpus: float | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("map_index_template", PARTITION_LABEL)
        super().__init__(**kwargs)
        self.partition = partition
        self.poll_interval = poll_interval
        self.job_timeout = job_timeout
        self.cancel_on_kill = cancel_on_kill
        self.runtime_env = runtime_env
        self.entrypoint_num_cpus = entrypoint_num_cpus

    def _partition_run(self, context: Context) -> PartitionRun:
        from winnow import pipeline
        from winnow.rowgroups import CommitStore

        cfg = self.curation_config(context)
        partition = int(self.partition)
        with engine_errors():
            plan = pipeline.load_plan(cfg)
        if not 0 <= partition < plan.num_partitions:
            raise AirflowFailException(
                f"partition {partition} is out of range: run {cfg.run_root} has "
                f"{plan.num_partitions} partitions; map this task over the index task's output"
            )
        context["partition_label"] = plan.describe_partition(partition)  # map_index_template
        store = CommitStore(cfg.run_root)
        fingerprint = (store.read_fingerprint(self.stage) or {}).get("digest", "unset")
        progress = PartitionProgress(context.get("task_state_store"), self.stage, fingerprint, self.log)
        return PartitionRun(cfg=cfg, plan=plan, partition=partition, store=store, fingerprint=fingerprint,
                            progress=progress, row_groups=len(plan.partition_row_groups(partition)),
                            try_number=getattr(context.get("ti"), "try_number", None),
                            label=context["partition_label"])

    def execute(self, context: Context) -> dict[str, Any]:
        from winnow import pipeline

        run = self._partition_run(context)
        run.progress.reconcile(len(run.store.completed(self.stage, run.partition)), run.row_groups,
                               try_number=run.try_number)
        hook = self.ray_hook(context)
        if hook.mode == "job":
            return RayJobRunner(self, hook).run(context, run)
        RayJobLink.persist(context, "")  # no Ray Job in this mode: the link is empty, not missing
        address = self.ray_address(context)
        with engine_errors():
            summary = pipeline.run_partition(run.cfg, self.stage, run.partition, ray_address=address,
                                             owner=self.lease_owner(context), log=self.log.info)
        return self.finish(context, run, summary.to_dict(), summary.failed)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Job mode: the trigger saw the job end; storage says what it committed."""
        run = self._partition_run(context)
        hook = self.ray_hook(context)
        return RayJobRunner(self, hook).complete(context, run, event)

    def finish(self, context: Context, run: PartitionRun, result: dict[str, Any], failed: dict[int, str]) -> dict[str, Any]:
        """Record the outcome; raise :class:`RowGroupsFailed` naming failed row groups."""
        committed = len(run.store.completed(self.stage, run.partition))
        run.progress.save(committed=committed, row_groups=run.row_groups, failed=failed,
                          state="failed" if failed else "done", try_number=run.try_number)
        self.log.info("%s %s: %s", self.stage, run.label, result)
        if failed:
            context["ti"].xcom_push(key="return_value", value=result)
            first = min(failed)
            raise RowGroupsFailed(
                f"stage {self.stage!r}, {run.label}: {len(failed)} of "
                f"{run.row_groups} row groups failed: {sorted(failed)[:20]}; first error "
                f"(row group {first}): {failed[first]}. The other row groups are "
                "committed; a retry or a cleared task computes only the failed ones."
            )
        return result

    def on_kill(self) -> None:
        """Killed while submitting (the deferred case is the trigger's ``on_kill``)."""
        job = getattr(self, "_submitted", None)
        if job and self.cancel_on_kill:
            hook, submission_id = job
            hook.stop_job(submission_id)
            self.log.info("asked Ray to stop job %s (cancel_on_kill)", submission_id)


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


class RayJobRunner:
    """Job mode for a per-partition task: find or submit its Ray Job, defer, then reconcile.

    Submission ids are deterministic: ``winnow-<digest of dag, run, task, map index, stage
    fingerprint>-g<generation>``. The id about to be submitted is saved in the task state store
    first; a later try (retry, clear) reads it back, or, with an emptied store, probes
    generations 0, 1, ... on the cluster. A job still PENDING/RUNNING is reattached (never a
    second one); a SUCCEEDED one goes to completion; after a FAILED/STOPPED one, the next
    generation is submitted (the previous has ended, so two never run at once). The job skips
    committed row groups, so a new generation computes only what is missing.

    :param operator: the task's operator (its stage, knobs and log).
    :param hook: the task's job-mode :class:`RayHook`.
    """

    STATE_KEY = "winnow.ray_job.{stage}"

    def __init__(self, operator: RowGroupStageOperator, hook: RayHook) -> None:
        self.op = operator
        self.hook = hook
        self.log = operator.log

    # ---- ids ---------------------------------------------------------------------------
    def base_id(self, context: Context, run: PartitionRun) -> str:
        ti = context["ti"]
        key = "|".join(str(x) for x in (context["dag"].dag_id, context["run_id"], ti.task_id,
                                         getattr(ti, "map_index", -1), self.op.stage, run.fingerprint))
        return f"winnow-{hashlib.sha256(key.encode()).hexdigest()[:20]}"

    @staticmethod
    def submission_id(base: str, generation: int) -> str:
        return f"{base}-g{generation}"

    def _recorded(self, context: Context, base: str) -> dict[str, Any] | None:
        state_store = context.get("task_state_store")
        record = state_store.get(self.STATE_KEY.format(stage=self.op.stage)) if state_store is not None else None
        if isinstance(record, dict) and record.get("base") == base:
            return record
        return None

    def _record(self, context: Context, base: str, generation: int, run: PartitionRun) -> None:
        state_store = context.get("task_state_store")
        if state_store is not None:
            state_store.set(self.STATE_KEY.format(stage=self.op.stage), {
                "base": base, "generation": generation, "submission_id": self.submission_id(base, generation),
                "fingerprint": run.fingerprint, "dashboard": self.hook.job_url(self.submission_id(base, generation)),
            })

    def current(self, context: Context, base: str) -> tuple[int, dict[str, Any] | None]:
        """The newest generation on the cluster (from the state store, then probing)."""
        record = self._recorded(context, base)
        generation = int(record["generation"]) if record else 0
        job = self.hook.get_job(self.submission_id(base, generation))
        while (newer := self.hook.get_job(self.submission_id(base, generation + 1))) is not None:
            generation, job = generation + 1, newer
        return generation, job

    # ---- the try -----------------------------------------------------------------------
    def run(self, context: Context, run: PartitionRun) -> dict[str, Any]:
        # Imported here: the trigger module loads Airflow's trigger machinery, which a DAG
        # file parse does not need.
        from operators.triggers import RayJobTrigger
        from winnow.ray.job import read_summary, summary_uri

        base = self.base_id(context, run)
        try:
            generation, job = self.current(context, base)
        except RayAuthError as exc:
            raise AirflowFailException(str(exc)) from exc
        submission_id = self.submission_id(base, generation)
        status = job["status"] if job else None
        if status in ACTIVE_STATES:
            self.log.info("Ray job %s is %s: attaching to it (no new job)", submission_id, status)
            self._record(context, base, generation, run)
        else:
            missing = run.store.missing(self.op.stage, run.plan, run.partition)
            if status == "SUCCEEDED" and not missing:
                self.log.info("Ray job %s already SUCCEEDED: completing from storage", submission_id)
                return self.complete(context, run, {"status": status, "submission_id": submission_id,
                                                    "message": job.get("message") or ""})
            if not missing:
                self.log.info("every row group of %s is committed: no Ray job needed", run.label)
                previous = read_summary(summary_uri(run.cfg.run_root, self.op.stage, run.partition, submission_id)) if job else None
                return self.op.finish(context, run, self._skipped_summary(run, previous), {})
            if job is not None:
                # Only an ended job gets a successor: two generations never run at once.
                self.log.info("Ray job %s ended %s: submitting generation %d for the %d uncommitted row groups",
                              submission_id, status, generation + 1, len(missing))
                generation += 1
                submission_id = self.submission_id(base, generation)
            self._submit(context, run, base, generation)
        RayJobLink.persist(context, self.hook.job_url(submission_id))
        self.op.defer(
            trigger=RayJobTrigger(
                conn_id=self.hook.ray_conn_id, submission_id=submission_id,
                poll_interval=self.op.poll_interval or self.hook.resolve().poll_interval,
                checkpoint_uri=summary_uri(run.cfg.run_root, self.op.stage, run.partition, submission_id)
                .replace(".json", f".try{run.try_number or 0}.log.json"),
                cancel_on_kill=self.op.cancel_on_kill,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.op.job_timeout) if self.op.job_timeout else None,
        )

    def _submit(self, context: Context, run: PartitionRun, base: str, generation: int) -> None:
        from winnow.ray.job import entrypoint, summary_uri

        submission_id = self.submission_id(base, generation)
        resolved = self.hook.resolve()
        assert resolved is not None
        runtime_env = _merge_runtime_env(resolved.runtime_env, self.op.runtime_env)
        ti = context["ti"]
        metadata = {
            "airflow_dag_id": context["dag"].dag_id, "airflow_run_id": str(context["run_id"]),
            "airflow_task_id": ti.task_id, "airflow_map_index": str(getattr(ti, "map_index", -1)),
            "airflow_try_number": str(run.try_number), "winnow_stage": self.op.stage,
            "winnow_partition": str(run.partition), "winnow_run_root": run.cfg.run_root,
            "winnow_generation": str(generation),
        }
        command = entrypoint(stage=self.op.stage, partition=run.partition, config=run.cfg.to_dict(),
                             summary=summary_uri(run.cfg.run_root, self.op.stage, run.partition, submission_id),
                             owner=self.op.lease_owner(context), python=resolved.entrypoint_python)
        # Saved before submitting: a try that dies right after the submit still finds its job.
        self._record(context, base, generation, run)
        self.op._submitted = (self.hook, submission_id)
        try:
            self.hook.submit_job(submission_id, command, metadata=metadata, runtime_env=runtime_env,
                                 entrypoint_num_cpus=self.op.entrypoint_num_cpus)
        except RayAuthError as exc:
            raise AirflowFailException(str(exc)) from exc
        self.log.info("submitted Ray job %s (generation %d): %s", submission_id, generation,
                      self.hook.job_url(submission_id))

    def complete(self, context: Context, run: PartitionRun, event: dict[str, Any]) -> dict[str, Any]:
        """Reconcile the ended job with storage: storage says what is committed."""
        from winnow.ray.job import read_summary, summary_uri

        status, submission_id = event.get("status"), event["submission_id"]
        RayJobLink.persist(context, self.hook.job_url(submission_id))
        if status == "ERROR":
            raise AirflowFailException(f"Ray job {submission_id}: {event.get('message')}")
        summary = read_summary(summary_uri(run.cfg.run_root, self.op.stage, run.partition, submission_id))
        missing = run.store.missing(self.op.stage, run.plan, run.partition)
        self.log.info("Ray job %s ended %s; storage: %d of %d row groups committed", submission_id, status,
                      run.row_groups - len(missing), run.row_groups)
        if not missing:
            result = {k: v for k, v in summary.items() if k != "errors"} if summary else self._skipped_summary(run, None)
            return self.op.finish(context, run, result, {})
        errors = (summary or {}).get("errors") or {}
        reason = (f"not committed: Ray job {submission_id} ended {status}"
                  f"{': ' + event['message'][-500:] if event.get('message') else ''}")
        failed = {rg: errors.get(str(rg), reason) for rg in missing}
        if summary is None:
            summary = {"stage": self.op.stage, "partition": run.partition, "row_groups": run.row_groups,
                       "computed": 0, "skipped": run.row_groups - len(missing)}
        result = {k: v for k, v in summary.items() if k != "errors"}
        result.update(failed=missing[:100], failed_count=len(missing), first_error=failed[missing[0]])
        return self.op.finish(context, run, result, failed)

    def _skipped_summary(self, run: PartitionRun, previous: dict[str, Any] | None) -> dict[str, Any]:
        if previous and not previous.get("failed"):
            return {k: v for k, v in previous.items() if k != "errors"}
        return {"stage": self.op.stage, "partition": run.partition, "row_groups": run.row_groups, "computed": 0,
                "skipped": run.row_groups, "failed": [], "failed_count": 0, "first_error": None,
                "records_in": 0, "records_out": 0, "seconds": 0.0}


def _merge_runtime_env(conn_env: dict[str, Any] | None, task_env: dict[str, Any] | None) -> dict[str, Any] | None:
    """The task's runtime env over the connection's; ``env_vars`` are merged key by key."""
    if not conn_env and not task_env:
        return None
    merged = {**(conn_env or {}), **(task_env or {})}
    if (conn_env or {}).get("env_vars") and (task_env or {}).get("env_vars"):
        merged["env_vars"] = {**conn_env["env_vars"], **task_env["env_vars"]}
    return merged
