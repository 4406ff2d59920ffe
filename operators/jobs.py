"""Job mode: each step of a run (a partition stage, the index, centroids, one pairwise bucket)
as one Ray Job on the connection's cluster, found again by a deterministic id.

Submission ids are ``winnow-<digest of dag, run, task, map index, stage, fingerprint>-g<generation>``.
The id about to be submitted is saved in the task state store first; a later try (retry, clear)
reads it back, or, with an emptied store, probes generations 0, 1, ... on the cluster. A job
still PENDING/RUNNING is reattached (never a second one); a SUCCEEDED one goes to completion;
after a FAILED/STOPPED one, the next generation is submitted (the previous has ended, so two
never run at once). Every step skips committed work, so a new generation computes only what
is missing. The Airflow worker submits, defers and reads the job's small summary from storage:
it holds no embeddings, no index scan and no bucket.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowFailException

from winnow_airflow.exceptions import RayAuthError
from winnow_airflow.hooks import ACTIVE_STATES, RayHook
from winnow_airflow.ray_links import RayJobLink

if TYPE_CHECKING:
    from airflow.sdk import Context

    from winnow.pipeline import CurationConfig


@dataclass
class JobTarget:
    """One step of one run as a Ray Job: which stage, which unit, under which fingerprint.

    :param state: what the operator keeps of its try (e.g. the partition's plan and progress).
    """

    stage: str
    cfg: CurationConfig
    fingerprint: str
    label: str
    try_number: int | None
    partition: int | None = None
    bucket: int | None = None
    state: Any = None

    @property
    def unit(self) -> str:
        from winnow.job import unit_name

        return unit_name(self.partition, self.bucket)

    def summary_uri(self, submission_id: str) -> str:
        from winnow.job import summary_uri

        return summary_uri(self.cfg.run_root, self.stage, self.unit, submission_id)


class RayJobRunner:
    """Find or submit the Ray Job of one step, defer to its trigger, then hand the outcome to the
    operator (``job_shortcut`` before submitting, ``job_result`` once the job ended).

    :param operator: the task's operator (a ``CurationOperator``: its knobs, log and the two hooks).
    :param hook: the task's job-mode :class:`RayHook`.
    """

    STATE_KEY = "winnow.ray_job.{stage}"

    def __init__(self, operator: Any, hook: RayHook) -> None:
        self.op = operator
        self.hook = hook
        self.log = operator.log

    # ---- ids ---------------------------------------------------------------------------
    def base_id(self, context: Context, target: JobTarget) -> str:
        ti = context["ti"]
        key = "|".join(str(x) for x in (context["dag"].dag_id, context["run_id"], ti.task_id,
                                         getattr(ti, "map_index", -1), target.stage, target.fingerprint))
        return f"winnow-{hashlib.sha256(key.encode()).hexdigest()[:20]}"

    @staticmethod
    def submission_id(base: str, generation: int) -> str:
        return f"{base}-g{generation}"

    def _recorded(self, context: Context, target: JobTarget, base: str) -> dict[str, Any] | None:
        state_store = context.get("task_state_store")
        record = state_store.get(self.STATE_KEY.format(stage=target.stage)) if state_store is not None else None
        if isinstance(record, dict) and record.get("base") == base:
            return record
        return None

    def _record(self, context: Context, target: JobTarget, base: str, generation: int) -> None:
        state_store = context.get("task_state_store")
        if state_store is not None:
            state_store.set(self.STATE_KEY.format(stage=target.stage), {
                "base": base, "generation": generation, "submission_id": self.submission_id(base, generation),
                "fingerprint": target.fingerprint, "dashboard": self.hook.job_url(self.submission_id(base, generation)),
            })

    def current(self, context: Context, target: JobTarget, base: str) -> tuple[int, dict[str, Any] | None]:
        """The newest generation on the cluster (from the state store, then probing)."""
        record = self._recorded(context, target, base)
        generation = int(record["generation"]) if record else 0
        job = self.hook.get_job(self.submission_id(base, generation))
        while (newer := self.hook.get_job(self.submission_id(base, generation + 1))) is not None:
            generation, job = generation + 1, newer
        return generation, job

    # ---- the try -----------------------------------------------------------------------
    def run(self, context: Context, target: JobTarget) -> Any:
        # Imported here: the trigger module loads Airflow's trigger machinery, which a DAG
        # file parse does not need.
        from winnow_airflow.triggers import RayJobTrigger

        base = self.base_id(context, target)
        try:
            generation, job = self.current(context, target, base)
        except RayAuthError as exc:
            raise AirflowFailException(str(exc)) from exc
        submission_id = self.submission_id(base, generation)
        status = job["status"] if job else None
        if status in ACTIVE_STATES:
            self.log.info("Ray job %s is %s: attaching to it (no new job)", submission_id, status)
            self._record(context, target, base, generation)
        else:
            done = self.op.job_shortcut(context, target, status, submission_id if job else None)
            if done is not None:
                return done
            if job is not None:
                # Only an ended job gets a successor: two generations never run at once.
                self.log.info("Ray job %s ended %s: submitting generation %d", submission_id, status, generation + 1)
                generation += 1
                submission_id = self.submission_id(base, generation)
            self._submit(context, target, base, generation)
        RayJobLink.persist(context, self.hook.job_url(submission_id))
        self.op.defer(
            trigger=RayJobTrigger(
                conn_id=self.hook.ray_conn_id, submission_id=submission_id,
                poll_interval=self.op.poll_interval or self.hook.resolve().poll_interval,
                checkpoint_uri=target.summary_uri(submission_id).replace(".json", f".try{target.try_number or 0}.log.json"),
                cancel_on_kill=self.op.cancel_on_kill,
                storage_conn_id=self.op.storage_conn_id(context),
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.op.job_timeout) if self.op.job_timeout else None,
        )

    def _submit(self, context: Context, target: JobTarget, base: str, generation: int) -> None:
        from winnow.job import entrypoint
        from winnow_airflow.storage import job_storage_env

        submission_id = self.submission_id(base, generation)
        resolved = self.hook.resolve()
        assert resolved is not None
        storage_env = job_storage_env(self.op.storage_conn_id(context), session_name=submission_id, log=self.log)
        runtime_env = merge_runtime_env(resolved.runtime_env, self.op.runtime_env,
                                        {"env_vars": storage_env} if storage_env else None)
        ti = context["ti"]
        metadata = {
            "airflow_dag_id": context["dag"].dag_id, "airflow_run_id": str(context["run_id"]),
            "airflow_task_id": ti.task_id, "airflow_map_index": str(getattr(ti, "map_index", -1)),
            "airflow_try_number": str(target.try_number), "winnow_stage": target.stage,
            "winnow_unit": target.unit, "winnow_run_root": target.cfg.run_root,
            "winnow_generation": str(generation),
        }
        if target.partition is not None:
            metadata["winnow_partition"] = str(target.partition)
        command = entrypoint(stage=target.stage, partition=target.partition, bucket=target.bucket,
                             config=target.cfg.to_dict(), execution=self.op.execution(context),
                             summary=target.summary_uri(submission_id), owner=self.op.lease_owner(context),
                             python=resolved.entrypoint_python, chain=target.partition is not None,
                             one_job_max_records=resolved.one_job_max_records if target.stage == "index" else None)
        # Saved before submitting: a try that dies right after the submit still finds its job.
        self._record(context, target, base, generation)
        self.op._submitted = (self.hook, submission_id)
        try:
            self.hook.submit_job(submission_id, command, metadata=metadata, runtime_env=runtime_env,
                                 entrypoint_num_cpus=self.op.entrypoint_num_cpus)
        except RayAuthError as exc:
            raise AirflowFailException(str(exc)) from exc
        self.log.info("submitted Ray job %s (generation %d) for %s: %s", submission_id, generation, target.label,
                      self.hook.job_url(submission_id))

    def complete(self, context: Context, target: JobTarget, event: dict[str, Any]) -> Any:
        """The job ended: its summary (from storage) and its own error line go to the operator."""
        from winnow.job import error_line, read_summary
        from winnow.results import MAX_ERROR_CHARS

        status, submission_id = event.get("status"), event["submission_id"]
        RayJobLink.persist(context, self.hook.job_url(submission_id))
        if status == "ERROR":
            raise AirflowFailException(f"Ray job {submission_id}: {event.get('message')}")
        summary = read_summary(target.summary_uri(submission_id), target.cfg.storage)
        message = event.get("message") or ""
        error = error_line(message)
        if error is None and status != "SUCCEEDED":
            # No line of ours: Ray's own words (a lost job, a driver killed), its last line only.
            tail = [line.strip() for line in message.strip().splitlines() if line.strip()]
            error = tail[-1][:MAX_ERROR_CHARS] if tail else ""
        reason = f"Ray job {submission_id} ended {status}" + (f": {error}" if error else "")
        self.log.info("Ray job %s ended %s", submission_id, status)
        return self.op.job_result(context, target, status, summary, reason)


def merge_runtime_env(*envs: dict[str, Any] | None) -> dict[str, Any] | None:
    """Later runtime envs over earlier ones; ``env_vars`` are merged key by key."""
    merged: dict[str, Any] = {}
    env_vars: dict[str, str] = {}
    for env in envs:
        if not env:
            continue
        env_vars.update(env.get("env_vars") or {})
        merged.update(env)
    if env_vars:
        merged["env_vars"] = env_vars
    return merged or None
