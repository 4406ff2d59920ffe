"""The stage graph, declared once: every stage's name, compute, upstream, scope and model use.

Everything that needs the graph derives it from here: :func:`winnow.pipeline.make_stage`, the
fingerprint chain, the run order of ``run_all``, the report, and the DAG's task ids. Importing
this module is cheap (no torch, Ray or Airflow), so a DAG file may read it at parse time.

It is data: each stage's compute, config factory and unit reader are ``"module:attribute"``
strings, imported only when a caller asks (``spec.load_compute()``, ``load_config()``,
``load_units()``); the callers are above the stages (the pipeline, the report), never below.

>>> [s.name for s in STAGES]
['index', 'embed', 'aesthetic', 'nsfw', 'clip_score', 'thresholds', 'centroids', 'assign', 'pairwise', 'dedup', 'status', 'write']
>>> [s.name for s in partition_stages()]
['embed', 'aesthetic', 'nsfw', 'clip_score', 'assign', 'dedup', 'status', 'write']
>>> task_id("nsfw"), task_id("write"), stage_spec("pairwise").map_over
('partition.nsfw', 'write', 'centroids')
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from winnow.filters import FILTERS

Scope = Literal["partition", "global", "bucket"]

#: The mapped task group that runs a partition's filter stages depth-first in the DAG.
PARTITION_GROUP = "partition"


@dataclass(frozen=True)
class StageSpec:
    """One node of the stage graph.

    :param name: the one word for the stage: its folder under the run root, its task id (inside
        ``group`` when set), its name in logs, fingerprints and the summary.
    :param compute: ``module:attribute`` of its compute, in the stage's own module, imported on
        demand: the stage class of a partition stage (``process`` per row group); the function of
        a global one, ``fn(run_root, plan, config, fingerprint, *, execution, log) -> summary
        dict``, which :func:`winnow.pipeline.run_global` calls once it holds the run root's lease,
        loaded the plan and checked the fingerprint (the index makes the plan: its
        ``build_index`` is called by :func:`winnow.pipeline.run_index`); the unit runner of a
        bucket one, ``fn(run_root, plan, config, units, *, execution, log) -> UnitSummary``.
    :param upstream: stages whose output it reads; their fingerprints feed its own.
    :param scope: ``partition`` (a row-group stage mapped over partitions), ``global`` (one
        task over the whole run) or ``bucket`` (units that are not row groups, e.g. buckets of
        dedup clusters, mapped over the list ``map_over``'s task returns).
    :param uses_model: loads a model (a GPU per worker where there are GPUs).
    :param group: the DAG task group it runs in (partition stages run depth-first there).
    :param map_over: the global stage whose task returns the list a mapped stage expands over
        (partition stages: ``index``'s partitions; bucket stages: their planner's units).
    :param units: for a stage that commits something other than row-group files (k-means
        centroids, dedup buckets): ``module:function`` that reads from storage how many units it
        has and which are committed, ``fn(store) -> (total or None while unknown, committed ids)``.
        None: the stage commits one file per row group (``<stage>/p<partition>/rg<id>.parquet``).
    :param config: ``module:function`` that builds the stage's config (which checks its knobs and
        gives ``fingerprint_config()``) from the run's ``CurationConfig``: ``fn(run_config, name)``.
        ``CurationConfig.stage_config`` calls it; nothing else knows which knob goes where.
    :param light: a partition stage whose work per record is small (no image decode, no large
        model: a score head's MLP over embeddings, the dedup flags, the status rows, the write of
        kept records): a partition with few records to compute runs in the calling process, where a
        Ray Data execution would cost more than the work (:data:`winnow.ray.runner.IN_DRIVER_MAX_RECORDS`).
    """

    name: str
    compute: str
    upstream: tuple[str, ...]
    scope: Scope
    uses_model: bool = False
    group: str | None = None
    map_over: str | None = None
    units: str | None = None
    config: str = ""
    light: bool = False

    def __post_init__(self) -> None:
        if self.scope == "partition" and self.map_over is None:
            object.__setattr__(self, "map_over", "index")

    @property
    def task_id(self) -> str:
        return f"{self.group}.{self.name}" if self.group else self.name

    @property
    def has_row_groups(self) -> bool:
        """Commits one file per row group (every partition stage, and the index)."""
        return self.units is None

    def load_compute(self) -> Any:
        """The stage's compute (see ``compute``)."""
        return _load(self.compute)

    def load_config(self) -> Any:
        """The stage's config factory (see ``config``)."""
        return _load(self.config)

    def load_units(self) -> Any:
        """The stage's unit reader (see ``units``); a ValueError for a row-group stage."""
        if self.units is None:
            raise ValueError(f"stage {self.name!r} commits row groups, not units of its own")
        return _load(self.units)


def _load(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


#: The stages whose scores the filters read (winnow.filters), less ``index`` and ``embed``: every
#: score stage reads both already, so they are upstream of the thresholds step through it (a filter
#: on embed's own columns, the watermark, adds nothing to the graph nor to existing fingerprints).
FILTER_STAGES: tuple[str, ...] = tuple(dict.fromkeys(f.stage for f in FILTERS if f.stage not in ("index", "embed")))

#: Topological order: every stage comes after the stages it reads.
STAGES: tuple[StageSpec, ...] = (
    StageSpec("index", "winnow.data.index:build_index", (), "global", config="winnow.data.index:index_config"),
    StageSpec("embed", "winnow.stages.embed:EmbedStage", ("index",), "partition", True, PARTITION_GROUP,
              config="winnow.stages.embed:embed_config"),
    StageSpec("aesthetic", "winnow.stages.aesthetic:AestheticStage", ("embed",), "partition", True, PARTITION_GROUP,
              config="winnow.stages.aesthetic:aesthetic_config", light=True),
    StageSpec("nsfw", "winnow.stages.nsfw:NsfwStage", ("embed",), "partition", True, PARTITION_GROUP,
              config="winnow.stages.nsfw:nsfw_config", light=True),
    StageSpec("clip_score", "winnow.stages.clip_score:ClipScoreStage", ("index", "embed"), "partition", True,
              PARTITION_GROUP, config="winnow.stages.clip_score:clip_score_config"),
    # The thresholds actually used (absolute, or the quantile a keep fraction picks over the
    # whole run): the one place a score becomes a keep decision (winnow.stages.kept).
    StageSpec("thresholds", "winnow.stages.thresholds:run_thresholds", FILTER_STAGES, "global",
              units="winnow.stages.thresholds:thresholds_units", config="winnow.stages.thresholds:thresholds_config"),
    # Semantic dedup as four steps (winnow.stages.dedup_steps): k-means on a sample, per row
    # group cluster assignment, per bucket pairwise, per row group duplicate flags.
    StageSpec("centroids", "winnow.stages.dedup_steps:run_centroids", ("embed", "thresholds"), "global",
              units="winnow.stages.dedup_steps:centroids_units", config="winnow.stages.dedup_steps:step_config"),
    StageSpec("assign", "winnow.stages.dedup_steps:AssignStage", ("embed", "thresholds", "centroids"), "partition", True,
              config="winnow.stages.dedup_steps:step_config"),
    StageSpec("pairwise", "winnow.stages.dedup_steps:run_pairwise", ("centroids", "assign"), "bucket", True,
              map_over="centroids", units="winnow.stages.dedup_steps:pairwise_units",
              config="winnow.stages.dedup_steps:step_config"),
    StageSpec("dedup", "winnow.stages.dedup_steps:DedupFlagsStage", ("embed", "pairwise"), "partition",
              config="winnow.stages.dedup_steps:step_config", light=True),
    # One row per input record with its outcome and scores: what write, the counts and the
    # report read (the outcome rule is applied here only).
    StageSpec("status", "winnow.stages.status:StatusStage",
              ("index", "embed", *FILTER_STAGES, "thresholds", "dedup"), "partition",
              config="winnow.stages.status:status_config", light=True),
    StageSpec("write", "winnow.stages.write:WriteStage", ("index", "embed", "status"), "partition",
              config="winnow.stages.write:write_config", light=True),
)

_BY_NAME = {s.name: s for s in STAGES}


def stage_spec(name: str) -> StageSpec:
    """The spec of stage ``name``; an unknown name is a ValueError listing the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(_BY_NAME)}") from None


def stage_order() -> tuple[str, ...]:
    return tuple(s.name for s in STAGES)


def partition_stages() -> tuple[StageSpec, ...]:
    return tuple(s for s in STAGES if s.scope == "partition")


def upstream_closure(name: str) -> tuple[str, ...]:
    """Every stage ``name`` reads, directly or through the stages it reads, in graph order.

    >>> upstream_closure("centroids")
    ('index', 'embed', 'aesthetic', 'nsfw', 'clip_score', 'thresholds')
    """
    wanted: set[str] = set()
    todo = list(stage_spec(name).upstream)
    while todo:
        up = todo.pop()
        if up not in wanted:
            wanted.add(up)
            todo.extend(stage_spec(up).upstream)
    return tuple(s.name for s in STAGES if s.name in wanted)


def task_id(name: str) -> str:
    return stage_spec(name).task_id


def run_phases() -> list[tuple[Scope, tuple[StageSpec, ...]]]:
    """The graph cut into the phases a run goes through, in order: each global or bucket stage
    alone, and each run of consecutive partition stages together (run depth-first per partition).

    >>> [(scope, [s.name for s in specs]) for scope, specs in run_phases()]  # doctest: +NORMALIZE_WHITESPACE
    [('global', ['index']), ('partition', ['embed', 'aesthetic', 'nsfw', 'clip_score']), ('global', ['thresholds']),
     ('global', ['centroids']), ('partition', ['assign']), ('bucket', ['pairwise']),
     ('partition', ['dedup', 'status', 'write'])]
    """
    phases: list[tuple[Scope, tuple[StageSpec, ...]]] = []
    for spec in STAGES:
        if spec.scope == "partition" and phases and phases[-1][0] == "partition":
            phases[-1] = ("partition", (*phases[-1][1], spec))
        else:
            phases.append((spec.scope, (spec,)))
    return phases


def _check_graph() -> None:
    for f in FILTERS:
        if f.stage not in _BY_NAME or not _BY_NAME[f.stage].has_row_groups:
            raise AssertionError(f"filter {f.name!r} reads stage {f.stage!r}, which is no stage committing row groups "
                                 f"(they are {', '.join(s.name for s in STAGES if s.has_row_groups)})")
    seen: set[str] = set()
    for spec in STAGES:
        unknown = [u for u in spec.upstream if u not in seen]
        if unknown:
            raise AssertionError(f"stage {spec.name!r} reads {unknown} which come later or do not exist")
        if spec.map_over is not None and (spec.map_over not in seen or _BY_NAME[spec.map_over].scope != "global"):
            raise AssertionError(f"stage {spec.name!r} maps over {spec.map_over!r}, which is not an earlier global stage")
        if not spec.config:
            raise AssertionError(f"stage {spec.name!r} names no config factory (config=)")
        if spec.scope == "bucket" and spec.units is None:
            raise AssertionError(f"bucket stage {spec.name!r} commits no row groups: name its unit reader (units=)")
        seen.add(spec.name)


_check_graph()
