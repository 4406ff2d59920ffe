"""One operator per curation stage; each delegates to ``winnow.pipeline`` and stays small.

The stage graph is the engine's registry (``winnow.registry``): ``OPERATORS`` gives the
operator of each registered stage, and the DAG wires them in the registry's order. Importing this
module checks that ``OPERATORS`` names exactly the registry's stages: a stage added there needs
its operator here (most are three lines: a ``RowGroupStageOperator`` or ``GlobalStageOperator``
subclass naming its ``stage``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar

from winnow.registry import STAGES
from winnow_airflow.base import CurationOperator, RowGroupStageOperator, engine_errors, step_fingerprint
from winnow_airflow.exceptions import BucketsFailedError
from winnow_airflow.jobs import JobTarget
from winnow_airflow.links import CurationViewLink

if TYPE_CHECKING:
    from airflow.sdk import Context

#: Index summary keys too big or too detailed for the index task's XCom.
_INDEX_LOCAL_KEYS = ("partitions", "labels")


class IndexOperator(CurationOperator):
    """Validates the config, indexes the shards and fixes every stage's fingerprint.

    Returns the partition list ``range(P)`` (what the mapped tasks expand over; Airflow maps
    only over return values) and pushes the small index summary under XCom key ``summary``. With ``overwrite`` the stages whose
    config changed are moved aside here, once, before any partition runs. Shard groups are
    scanned by Ray tasks (driver mode, embedded Ray) or inside one Ray Job (job mode): this
    process only plans. Takes the :class:`CurationOperator` params.
    """


    def job_target(self, context: Context) -> JobTarget:
        import hashlib
        import json

        cfg = self.curation_config(context)
        # The index has no stage folder yet: its job is scoped by the whole config.
        digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
        self._run_root = cfg.run_root
        return JobTarget(stage=self.stage, cfg=cfg, fingerprint=digest, label="the run",
                         try_number=getattr(context.get("ti"), "try_number", None))

    def execute(self, context: Context) -> list[int]:
        from winnow import pipeline

        target = self.job_target(context)
        # A run that fails fast here (changed config, bad shard) gives the run root's lease
        # back in the engine, so a corrected run need not wait for it to expire.
        return self.run_step(context, target, lambda **where: self.step_result(context, pipeline.run_index(
            target.cfg, owner=self.lease_owner(context), log=self.log.info, **where)))

    def step_result(self, context: Context, summary: dict[str, Any]) -> list[int]:
        result = {k: v for k, v in summary.items() if k not in _INDEX_LOCAL_KEYS}
        result["run_root"] = self._run_root
        context["ti"].xcom_push(key="summary", value=result)
        self.log.info("index: %s", result)
        return list(summary["partitions"])


# ---- partition stages: the row groups of one partition per task instance ------------------------
# (mapped over the partition list the index task returns)


class EmbedOperator(RowGroupStageOperator):
    """Decodes each record's image and embeds it with the CLIP image tower (model workers, on GPUs
    where the cluster has them): an L2-normalised float16 embedding, or the decode error."""



class AestheticOperator(RowGroupStageOperator):
    """Scores each embedding with the LAION aesthetic head (the ``thresholds`` step decides who passes)."""



class NsfwOperator(RowGroupStageOperator):
    """Scores each embedding with the LAION CLIP NSFW head (the ``thresholds`` step decides who passes)."""



class ClipScoreOperator(RowGroupStageOperator):
    """Scores how well each record's caption describes its image: the cosine of the CLIP text
    embedding of the caption and the image embedding."""



class AssignOperator(RowGroupStageOperator):
    """Dedup step 2: each kept record's nearest centroid, written bucket by bucket for the
    pairwise step."""



class DedupOperator(RowGroupStageOperator):
    """Dedup step 4: each row group's duplicate flags, from its partition's pairwise results."""



class StatusOperator(RowGroupStageOperator):
    """One row per input record: its outcome (kept, or why it was dropped) and every score."""



class WriteOperator(RowGroupStageOperator):
    """Writes the kept records of each row group: a WebDataset tar of their original bytes and the
    curated Parquet beside it."""



# ---- global stages: one task over the whole run -------------------------------------------------


class GlobalStageOperator(CurationOperator):
    """A global step of the registry with no Airflow behaviour of its own (e.g. ``thresholds``):
    its engine call (``winnow.pipeline.run_global``) in a Ray task, or as a Ray Job in
    job mode. Returns the step's summary (XCom)."""

    stage: ClassVar[str]

    def job_target(self, context: Context) -> JobTarget:
        cfg = self.curation_config(context)
        return JobTarget(stage=self.stage, cfg=cfg, fingerprint=step_fingerprint(cfg, self.stage), label="the run",
                         try_number=getattr(context.get("ti"), "try_number", None))

    def execute(self, context: Context) -> dict[str, Any]:
        from winnow import pipeline

        target = self.job_target(context)
        return self.run_step(context, target, lambda **where: self.step_result(context, pipeline.run_global(
            target.cfg, self.stage, owner=self.lease_owner(context), log=self.log.info, **where)))

    def step_result(self, context: Context, summary: dict[str, Any]) -> dict[str, Any]:
        self.log.info("%s: %s", self.stage, summary)
        return summary


class ThresholdsOperator(GlobalStageOperator):
    """Fixes the threshold each score filter uses over the whole run: the absolute one given, or
    the score a keep fraction picks."""



class CentroidsOperator(CurationOperator):
    """Dedup step 1: spherical k-means on a bounded sample of the kept embeddings, run in a Ray
    task or a Ray Job (this process holds none of it). Returns the bucket list ``range(B)`` the
    pairwise step is mapped over; the small summary goes under XCom key ``summary``."""


    def job_target(self, context: Context) -> JobTarget:
        cfg = self.curation_config(context)
        return JobTarget(stage=self.stage, cfg=cfg, fingerprint=step_fingerprint(cfg, self.stage), label="the run",
                         try_number=getattr(context.get("ti"), "try_number", None))

    def execute(self, context: Context) -> list[int]:
        from winnow import pipeline

        target = self.job_target(context)
        return self.run_step(context, target, lambda **where: self.step_result(context, pipeline.run_global(
            target.cfg, self.stage, owner=self.lease_owner(context), log=self.log.info, **where)))

    def step_result(self, context: Context, summary: dict[str, Any]) -> list[int]:
        result = dict(summary)
        buckets = list(range(result["buckets"]))
        context["ti"].xcom_push(key="summary", value=result)
        self.log.info("centroids: %s", result)
        return buckets


#: Labels a mapped pairwise instance with its bucket.
BUCKET_LABEL = "{{ bucket_label | default('bucket ' ~ ti.map_index) }}"


class PairwiseOperator(CurationOperator):
    """Dedup step 3 for one bucket of clusters (mapped over the centroids task's bucket list):
    one Ray task reads that bucket's rows and flags near-duplicates; a committed bucket is skipped.

    :param bucket: the bucket id (mapped: one task instance per bucket, at most
        :data:`winnow.checks.MAX_MAP_LENGTH`).
    """

    template_fields = (*CurationOperator.template_fields, "bucket")

    def __init__(self, *, bucket: int, **kwargs: Any) -> None:
        kwargs.setdefault("map_index_template", BUCKET_LABEL)
        super().__init__(**kwargs)
        self.bucket = bucket


    def job_target(self, context: Context) -> JobTarget:
        cfg = self.curation_config(context)
        bucket = int(self.bucket)
        context["bucket_label"] = f"bucket {bucket}"
        return JobTarget(stage=self.stage, cfg=cfg, fingerprint=step_fingerprint(cfg, self.stage),
                         label=f"bucket {bucket}", try_number=getattr(context.get("ti"), "try_number", None),
                         bucket=bucket)

    def execute(self, context: Context) -> dict[str, Any]:
        from winnow import pipeline

        target = self.job_target(context)

        def in_process(**where: Any) -> dict[str, Any]:
            summary = pipeline.run_buckets(target.cfg, self.stage, [target.bucket], owner=self.lease_owner(context),
                                           log=self.log.info, **where)
            result = summary.to_dict()
            result.update(next(iter(summary.results), {}))
            return self.step_result(context, result)

        return self.run_step(context, target, in_process)

    def step_result(self, context: Context, summary: dict[str, Any]) -> dict[str, Any]:
        self.log.info("pairwise bucket %s: %s", self.bucket, summary)
        if summary.get("failed_count"):
            from winnow import exceptions as engine
            from winnow.results import UnitSummary

            cause = engine.BucketsFailedError(self.stage, UnitSummary.from_dict(summary).failed)
            raise BucketsFailedError(str(cause)) from cause
        return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool, type(None)))}


class ReportOperator(CurationOperator):
    """Writes ``<run_root>/_summary.json`` and returns it; attaches its counts to the outlet event.

    :param partition_task_ids: the per-partition tasks whose XCom summaries say how many row
        groups this run computed versus skipped (one small dict per map index); by default the
        task ids of the registry's partition stages, as the ``image_curation`` DAG names them.
    """

    operator_extra_links = (CurationViewLink(),)

    def __init__(self, *, partition_task_ids: list[str] | tuple[str, ...] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if partition_task_ids is None:
            from winnow.registry import partition_stages

            partition_task_ids = [spec.task_id for spec in partition_stages()]
        self.partition_task_ids = list(partition_task_ids)

    def execute(self, context: Context) -> dict[str, Any]:
        from winnow import pipeline

        cfg = self.curation_config(context)
        pulled = context["ti"].xcom_pull(task_ids=self.partition_task_ids) if self.partition_task_ids else []
        summaries = [s for s in pulled or [] if isinstance(s, dict) and "stage" in s]
        with engine_errors():
            summary = pipeline.run_report(cfg, summaries, owner=self.lease_owner(context))
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = {"run_root": cfg.run_root, **_counts(summary)}
        self.log.info("report: %s", summary)
        return summary


def stage_of(operator_name: str) -> str:
    """The stage an operator class runs, from its name: ``DedupFlagsOperator`` would run ``dedup_flags``.

    >>> stage_of("DedupFlagsOperator"), stage_of("EmbedOperator")
    ('dedup_flags', 'embed')
    """
    return re.sub(r"(?<!^)(?=[A-Z])", "_", operator_name.removesuffix("Operator")).lower()


def _by_stage(*operators: type[CurationOperator]) -> dict[str, type[CurationOperator]]:
    for op in operators:
        op.stage = stage_of(op.__name__)
    return {op.stage: op for op in operators}


#: The operator of every stage of the engine's registry (``winnow.registry.STAGES``), by
#: stage name, in the registry's order; each runs the stage its class is named after.
OPERATORS: dict[str, type[CurationOperator]] = _by_stage(
    IndexOperator, EmbedOperator, AestheticOperator, NsfwOperator, ClipScoreOperator, ThresholdsOperator,
    CentroidsOperator, AssignOperator, PairwiseOperator, DedupOperator, StatusOperator, WriteOperator,
)


def _check_operators() -> None:
    """Every registry stage has an operator of its kind running that stage, and nothing else does."""
    names = {spec.name for spec in STAGES}
    if set(OPERATORS) != names:
        raise AssertionError(
            f"winnow_airflow.stages.OPERATORS does not match the stage registry: no operator for "
            f"{sorted(names - set(OPERATORS))}, operators of unknown stages {sorted(set(OPERATORS) - names)}"
        )
    for spec in STAGES:
        op = OPERATORS[spec.name]
        if getattr(op, "stage", None) != spec.name:
            raise AssertionError(f"OPERATORS[{spec.name!r}] ({op.__name__}) runs stage {getattr(op, 'stage', None)!r}")
        if (spec.scope == "partition") != issubclass(op, RowGroupStageOperator):
            raise AssertionError(f"{op.__name__} runs {spec.scope} stage {spec.name!r}: partition stages, and "
                                 "only they, take a RowGroupStageOperator")


_check_operators()


def _counts(summary: dict[str, Any]) -> dict[str, Any]:
    """Flat numbers only: asset event extras should stay small."""
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}
