"""Shared base of the curation operators: the run's config from params, engine errors as Airflow's.

Orchestration only. The engine (``winnow.pipeline``) is imported inside ``execute`` so a DAG
file that uses these operators parses without loading torch, Ray or storage clients.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from operators.hooks import RayHook
from operators.links import CurationViewLink
from operators.progress import PartitionProgress

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

    def ray_address(self, context: Context) -> str | None:
        conn_id = self.ray_conn_id or (context.get("params") or {}).get("ray_conn_id")
        hook = RayHook(ray_conn_id=conn_id or RayHook.default_conn_name)
        try:
            address = hook.get_address()
        except (ValueError, NotImplementedError) as exc:
            raise AirflowFailException(str(exc)) from exc
        self.log.info("Ray: %s", hook.describe())
        return address


class RowGroupStageOperator(CurationOperator):
    """Runs one stage over the row groups of one partition; committed row groups are skipped.

    Progress (row groups committed and failed) is kept in the task state store of this map
    index, scoped by the stage fingerprint and reconciled with storage on start. The XCom is
    the small partition summary. When row groups fail, the others still commit and the task
    raises :class:`RowGroupsFailed` naming them, so its retry computes only those.

    :param partition: the partition index (mapped: one task instance per partition).
    """

    stage: ClassVar[str]
    template_fields = (*CurationOperator.template_fields, "partition")
    operator_extra_links = (CurationViewLink(),)

    def __init__(self, *, partition: int, **kwargs: Any) -> None:
        kwargs.setdefault("map_index_template", PARTITION_LABEL)
        super().__init__(**kwargs)
        self.partition = partition

    def execute(self, context: Context) -> dict[str, Any]:
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
        row_groups = len(plan.partition_row_groups(partition))
        store = CommitStore(cfg.run_root)
        fingerprint = (store.read_fingerprint(self.stage) or {}).get("digest", "unset")
        progress = PartitionProgress(context.get("task_state_store"), self.stage, fingerprint, self.log)
        try_number = getattr(context.get("ti"), "try_number", None)
        progress.reconcile(len(store.completed(self.stage, partition)), row_groups, try_number=try_number)

        address = self.ray_address(context)
        with engine_errors():
            summary = pipeline.run_partition(cfg, self.stage, partition, ray_address=address,
                                             owner=self.lease_owner(context), log=self.log.info)
        committed = len(store.completed(self.stage, partition))
        progress.save(committed=committed, row_groups=row_groups, failed=summary.failed,
                      state="failed" if summary.failed else "done", try_number=try_number)
        result = summary.to_dict()
        self.log.info("%s %s: %s", self.stage, context["partition_label"], result)
        if summary.failed:
            context["ti"].xcom_push(key="return_value", value=result)
            first = min(summary.failed)
            raise RowGroupsFailed(
                f"stage {self.stage!r}, {context['partition_label']}: {len(summary.failed)} of "
                f"{row_groups} row groups failed: {sorted(summary.failed)[:20]}; first error "
                f"(row group {first}): {summary.failed[first]}. The other row groups are "
                "committed; a retry or a cleared task computes only the failed ones."
            )
        return result
