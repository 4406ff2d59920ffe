"""The curation run as engine calls: index, per-partition stages, dedup, write, report.

This is what the Airflow operators call and what a plain script can call without Airflow
(``run_all``). Every call resumes from storage: committed row groups are never recomputed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterable, Mapping

from winnow.ray.runner import PartitionSummary, run_stage_partition
from winnow.rowgroups import CommitStore, RowGroupPlan, StageFingerprint, WinnowError
from winnow.rowgroups import lease
from winnow.rowgroups.plan import MAX_MAP_LENGTH
from winnow.rowgroups.store import read_json, write_json

logger = logging.getLogger(__name__)

PARTITION_STAGES = ("embed", "aesthetic", "nsfw", "output")
#: Stage order; a stage's fingerprint includes those of the stages it reads.
STAGE_ORDER = ("index", "embed", "aesthetic", "nsfw", "dedup", "output")
SUMMARY_FILE = "_summary.json"


class ConfigError(WinnowError):
    """A run parameter is invalid; the message names the parameter and the fix."""


@dataclass(frozen=True, kw_only=True)
class CurationConfig:
    """Everything a curation run needs; the DAG's params map onto these fields one to one."""

    input_uri: str
    output_root: str
    run_key: str
    buffer_size: int = 256
    max_partitions: int = 64
    model: str = "ViT-L-14-quickgelu"
    pretrained: str = "openai"
    model_dir: str | None = None
    aesthetic_weights: str | None = None
    nsfw_weights: str | None = None
    aesthetic_threshold: float = 5.0
    nsfw_threshold: float = 0.5
    dedup_eps: float = 0.05
    dedup_clusters: int = 0
    allow_random_weights: bool = False
    overwrite: bool = False
    skip_bad_shards: bool = False
    decode_backend: str = "auto"
    batch_size: int = 64

    @property
    def run_root(self) -> str:
        return f"{self.output_root.rstrip('/')}/{self.run_key}"

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "CurationConfig":
        """Build from DAG params / run conf; unknown keys (``ray_conn_id``) are ignored and
        empty strings mean "not set" for optional paths."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in params.items() if k in known}
        for optional in ("model_dir", "aesthetic_weights", "nsfw_weights"):
            if values.get(optional) in ("", None):
                values[optional] = None
        missing = [k for k in ("input_uri", "output_root", "run_key") if not values.get(k)]
        if missing:
            raise ConfigError(f"missing required parameter(s): {', '.join(missing)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        """Fail fast, before any GPU work, with messages a user understands."""
        problems: list[str] = []
        for name in ("buffer_size", "max_partitions", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.max_partitions, int) and self.max_partitions > MAX_MAP_LENGTH:
            problems.append(f"max_partitions must be <= {MAX_MAP_LENGTH} (Airflow's max_map_length), got {self.max_partitions}")
        if not 0.0 <= float(self.nsfw_threshold) <= 1.0:
            problems.append(f"nsfw_threshold is a probability in [0, 1], got {self.nsfw_threshold}")
        if not 0.0 < float(self.dedup_eps) < 1.0:
            problems.append(f"dedup_eps must be in (0, 1) (duplicates have cosine >= 1 - eps), got {self.dedup_eps}")
        if self.dedup_clusters < 0:
            problems.append(f"dedup_clusters must be >= 0 (0 picks a size from the data), got {self.dedup_clusters}")
        if self.decode_backend not in ("auto", "pillow", "dali-cpu", "dali-gpu"):
            problems.append(f"decode_backend must be auto, pillow, dali-cpu or dali-gpu, got {self.decode_backend!r}")
        if "/" in self.run_key.strip("/") or self.run_key in (".", ".."):
            problems.append(f"run_key must be a single folder name, got {self.run_key!r}")
        try:
            from winnow.data.shards import list_shards

            list_shards(self.input_uri)
        except WinnowError as exc:
            problems.append(f"input_uri: {exc}")
        from winnow.stages.models import validate_model_spec

        try:
            validate_model_spec(self.model, self.pretrained, self.model_dir, self.allow_random_weights)
        except WinnowError as exc:
            problems.append(f"model/pretrained: {exc}")
        for name in ("aesthetic_weights", "nsfw_weights"):
            path = getattr(self, name)
            if path is None and not self.allow_random_weights:
                problems.append(
                    f"{name} is not set: give the path of the head's weights file, or set "
                    "allow_random_weights=true for a test run (scores are then meaningless)"
                )
            elif path is not None and "://" not in path and not os.path.isfile(path):
                problems.append(f"{name}: no such file {path!r}")
        if problems:
            raise ConfigError("invalid curation parameters:\n  - " + "\n  - ".join(problems))


# ---- stages ------------------------------------------------------------------------------

def make_stage(cfg: CurationConfig, name: str):
    """The stage object for one of the row-group stages of a run."""
    if name == "embed":
        from winnow.stages.embed import EmbedConfig, EmbedStage

        return EmbedStage(
            EmbedConfig(
                model=cfg.model,
                pretrained=cfg.pretrained,
                model_dir=cfg.model_dir,
                allow_random_weights=cfg.allow_random_weights,
                batch_size=cfg.batch_size,
                decode_backend=cfg.decode_backend,
            )
        )
    if name in ("aesthetic", "nsfw"):
        from winnow.stages.aesthetic import AestheticConfig, AestheticStage
        from winnow.stages.nsfw import NsfwConfig, NsfwStage

        config_cls, stage_cls = {
            "aesthetic": (AestheticConfig, AestheticStage),
            "nsfw": (NsfwConfig, NsfwStage),
        }[name]
        return stage_cls(
            config_cls(
                weights=getattr(cfg, f"{name}_weights"),
                threshold=getattr(cfg, f"{name}_threshold"),
                allow_random_weights=cfg.allow_random_weights,
            )
        )
    if name == "output":
        from winnow.stages.write import WriteConfig, WriteStage

        return WriteStage(WriteConfig())
    raise ConfigError(f"unknown stage {name!r}; row-group stages are {', '.join(PARTITION_STAGES)}")


def _dedup_config(cfg: CurationConfig):
    from winnow.stages.dedup import DedupConfig

    return DedupConfig(eps=cfg.dedup_eps, n_clusters=cfg.dedup_clusters)


def stage_fingerprints(cfg: CurationConfig, plan: RowGroupPlan) -> dict[str, StageFingerprint]:
    """Fingerprints of every stage after the index, each chained to the stages it reads."""
    store = CommitStore(cfg.run_root)
    index_fp = store.read_fingerprint("index") or {}
    digests = {"index": index_fp.get("digest", "")}
    configs = {
        "embed": make_stage(cfg, "embed").fingerprint_config(),
        "aesthetic": make_stage(cfg, "aesthetic").fingerprint_config(),
        "nsfw": make_stage(cfg, "nsfw").fingerprint_config(),
        "dedup": _dedup_config(cfg).fingerprint_config(),
        "output": make_stage(cfg, "output").fingerprint_config(),
    }
    upstreams = {
        "embed": ("index",),
        "aesthetic": ("embed",),
        "nsfw": ("embed",),
        "dedup": ("embed", "aesthetic", "nsfw"),
        "output": ("index", "embed", "aesthetic", "nsfw", "dedup"),
    }
    out: dict[str, StageFingerprint] = {}
    for name in STAGE_ORDER[1:]:
        f = StageFingerprint(
            stage=name,
            config=configs[name],
            upstream={u: digests[u] for u in upstreams[name]},
            num_records=plan.num_records,
            buffer_size=plan.buffer_size,
        )
        digests[name] = f.digest
        out[name] = f
    return out


def prepare_stages(cfg: CurationConfig, plan: RowGroupPlan, *, log: Callable[[str], None] | None = None) -> dict[str, str]:
    """Check (or record) every stage's fingerprint once per run, before any partition starts.

    A changed config raises StageConfigMismatch for the first changed stage; with
    ``overwrite`` the changed stages (and, through the chained upstream digests, every stage
    after them) are moved aside, the stages before them are kept.
    """
    log = log or logger.info
    store = CommitStore(cfg.run_root)
    moved: dict[str, str] = {}
    for name, f in stage_fingerprints(cfg, plan).items():
        target = store.ensure_stage(f, overwrite=cfg.overwrite)
        if target:
            moved[name] = target
            log(f"stage {name}: configuration changed, old output moved to {target}")
    return moved


# ---- the run -------------------------------------------------------------------------------

def _hold_lease(cfg: CurationConfig, owner: str | None) -> None:
    """Take or renew the run root's lease (``owner`` = the DAG run id); None skips it."""
    if owner:
        lease.acquire(CommitStore(cfg.run_root), owner)


def run_index(
    cfg: CurationConfig, *, owner: str | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Validate, index the shards (resumable), fix the plan and check every stage's fingerprint."""
    log = log or logger.info
    cfg.validate()
    _hold_lease(cfg, owner)
    try:
        return _index_and_prepare(cfg, log)
    except WinnowError:
        # Failing fast (changed config, bad shard) must not lock the run root against the
        # corrected rerun, which comes under a new run id.
        if owner:
            lease.release(CommitStore(cfg.run_root), owner)
        raise


def _index_and_prepare(cfg: CurationConfig, log: Callable[[str], None]) -> dict[str, Any]:
    from winnow.data.index import IndexConfig, build_index

    result = build_index(
        cfg.run_root,
        IndexConfig(
            input_uri=cfg.input_uri,
            buffer_size=cfg.buffer_size,
            max_partitions=cfg.max_partitions,
            skip_bad_shards=cfg.skip_bad_shards,
        ),
        overwrite=cfg.overwrite,
        log=log,
    )
    plan = result.plan
    moved = prepare_stages(cfg, plan, log=log)
    partitions = list(range(plan.num_partitions))
    log(
        f"index: {plan.num_records} records in {plan.num_row_groups} row groups of {plan.buffer_size}, "
        f"{plan.num_partitions} partitions"
    )
    return {
        "num_records": plan.num_records,
        "num_row_groups": plan.num_row_groups,
        "num_partitions": plan.num_partitions,
        "partitions": partitions,
        "labels": [plan.describe_partition(p) for p in partitions],
        "counts": result.counts,
        "moved_aside": moved,
    }


def load_plan(cfg: CurationConfig) -> RowGroupPlan:
    from winnow.data.index import load_index

    return load_index(cfg.run_root).plan


def run_partition(
    cfg: CurationConfig,
    stage: str,
    partition: int,
    *,
    ray_address: str | None = None,
    executor: str = "ray",
    owner: str | None = None,
    log: Callable[[str], None] | None = None,
) -> PartitionSummary:
    """Run one row-group stage over one partition; failures are in ``summary.failed``."""
    _hold_lease(cfg, owner)
    plan = load_plan(cfg)
    stage_obj = make_stage(cfg, stage)
    store = CommitStore(cfg.run_root)
    # Never overwrite here: prepare_stages did that once for the run. This only refuses a
    # partition task whose config differs from what the stage folder was made with.
    store.ensure_stage(stage_fingerprints(cfg, plan)[stage], overwrite=False)
    return run_stage_partition(
        stage_obj, run_root=cfg.run_root, plan=plan, partition=partition,
        ray_address=ray_address, executor=executor, log=log,
    )


def run_dedup(
    cfg: CurationConfig, *, owner: str | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    from winnow.stages.dedup import run_dedup as dedup

    _hold_lease(cfg, owner)
    # run_dedup checks the fingerprint itself (never overwriting: prepare_stages did that).
    return dedup(cfg.run_root, load_plan(cfg), _dedup_config(cfg), log=log)


def run_report(
    cfg: CurationConfig, summaries: Iterable[Mapping[str, Any]] = (), *, owner: str | None = None
) -> dict[str, Any]:
    """Count outcomes from storage, write ``<run_root>/_summary.json`` and return it.

    ``summaries`` are the partition summaries of this run (``PartitionSummary.to_dict()``);
    they give how many row groups were computed versus skipped.
    """
    from winnow.data.index import load_index
    from winnow.stages.write import count_outcomes

    index = load_index(cfg.run_root)
    plan = index.plan
    counts = count_outcomes(cfg.run_root, plan)
    computed = skipped = 0
    per_stage: dict[str, dict[str, int]] = {}
    for s in summaries:
        computed += int(s.get("computed", 0))
        skipped += int(s.get("skipped", 0))
        st = per_stage.setdefault(s["stage"], {"computed": 0, "skipped": 0})
        st["computed"] += int(s.get("computed", 0))
        st["skipped"] += int(s.get("skipped", 0))
    store = CommitStore(cfg.run_root)
    summary = {
        **counts,
        "members_without_image": index.counts.get("members_without_image", 0),
        "duplicate_keys": index.counts.get("duplicate_keys", 0),
        "shards": index.counts.get("shards", 0),
        "zero_byte_shards": index.counts.get("zero_byte_shards", 0),
        "bad_shards": index.counts.get("bad_shards", 0),
        "row_groups": plan.num_row_groups,
        "partitions": plan.num_partitions,
        "row_groups_computed": computed,
        "row_groups_skipped": skipped,
        "row_groups_by_stage": per_stage,
        "run_root": cfg.run_root,
        "output": store.path("output"),
        "config": cfg.to_dict(),
    }
    write_json(store.fs, store.path(SUMMARY_FILE), summary)
    if owner:
        lease.release(store, owner)  # the run is complete: the run root is free again
    return summary


def run_all(
    cfg: CurationConfig,
    *,
    ray_address: str | None = None,
    executor: str = "ray",
    owner: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The whole curation without Airflow, in the DAG's order (depth-first per partition).

    Raises :class:`RowGroupsFailedError` after every stage that could run has run, when any
    row group failed. ``owner`` names the run-root lease. By default it is this process: if it
    dies (SIGKILL, power loss of a laptop run), the next run_all on this host takes the run
    root over at once and resumes. An explicit owner (e.g. a DAG run id) is only freed by its
    owner or by expiry; a rerun with the same owner resumes at once.
    """
    log = log or logger.info
    t0 = time.perf_counter()
    owner = owner or lease.process_owner()
    try:
        info = run_index(cfg, owner=owner, log=log)
        summaries: list[dict[str, Any]] = []
        failed: list[PartitionSummary] = []
        for p in info["partitions"]:
            for stage in ("embed", "aesthetic", "nsfw"):
                s = run_partition(cfg, stage, p, ray_address=ray_address, executor=executor, owner=owner, log=log)
                summaries.append(s.to_dict())
                if not s.ok:
                    failed.append(s)
                    break
        if failed:
            raise RowGroupsFailedError(failed)
        run_dedup(cfg, owner=owner, log=log)
        for p in info["partitions"]:
            s = run_partition(cfg, "output", p, ray_address=ray_address, executor=executor, owner=owner, log=log)
            summaries.append(s.to_dict())
            if not s.ok:
                failed.append(s)
        if failed:
            raise RowGroupsFailedError(failed)
        summary = run_report(cfg, summaries, owner=owner)
    finally:
        # A failed run_all leaves no lease behind: rerunning it resumes at once.
        lease.release(CommitStore(cfg.run_root), owner)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    log(f"curation done: {json.dumps({k: summary[k] for k in ('records', 'kept', 'duplicates')})} -> {summary['output']}")
    return summary


def run_progress(run_root: str) -> dict[str, Any]:
    """Row groups committed per stage of a run, from storage (one listing per partition).

    What the Airflow plugin shows; cheap enough to poll: O(partitions) listings, no reads.
    """
    from winnow.data.index import load_index

    store = CommitStore(run_root)
    plan = load_index(run_root).plan
    stages: dict[str, dict[str, Any]] = {}
    for name in STAGE_ORDER:
        committed = sum(len(store.completed(name, p)) for p in range(plan.num_partitions))
        stages[name] = {
            "committed": committed,
            "row_groups": plan.num_row_groups,
            "fingerprint": (store.read_fingerprint(name) or {}).get("digest"),
        }
    summary = read_json(store.fs, store.path(SUMMARY_FILE))
    return {
        "run_root": run_root,
        "records": plan.num_records,
        "row_groups": plan.num_row_groups,
        "partitions": plan.num_partitions,
        "stages": stages,
        "complete": summary is not None and stages["output"]["committed"] == plan.num_row_groups,
        "summary": summary,
    }


class RowGroupsFailedError(WinnowError):
    """Some row groups failed; the others are committed and a rerun does only these."""

    def __init__(self, summaries: list[PartitionSummary]) -> None:
        self.summaries = summaries
        parts = [f"{s.stage} p{s.partition}: row groups {sorted(s.failed)}" for s in summaries]
        first = next(iter(summaries[0].failed.values()))
        super().__init__(f"row groups failed ({'; '.join(parts)}); first error: {first}. Rerun to retry only those.")
