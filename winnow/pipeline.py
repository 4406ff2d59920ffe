"""The curation run as engine calls: index, per-partition stages, dedup, write, report.

This is what the Airflow operators call and what a plain script can call without Airflow
(``run_all``). Every call resumes from storage: committed row groups are never recomputed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

from winnow.checks import DEFAULT_MAX_PARTITIONS, bool_problem
from winnow.exceptions import BucketsFailedError, ConfigError, RowGroupsFailedError, WinnowError
from winnow.execution import Backend, Compute, Execution
from winnow.filters import PARAMS as FILTER_PARAMS
from winnow.ray.runner import run_stage_partition
from winnow.registry import STAGES, partition_stages, run_phases, stage_spec
from winnow.results import PartitionSummary, UnitSummary
from winnow.rowgroups import CommitStore, RowGroupPlan, RunRoot, StageFingerprint, StorageOptions, lease, retry
from winnow.rowgroups.store import SUMMARY_FILE, stage_fingerprint, write_json

if TYPE_CHECKING:
    from winnow.rowgroups.task import Stage
    from winnow.stages.decode import DecodeBackend
    from winnow.stages.models import ModelSpec

logger = logging.getLogger(__name__)

#: Fields of :class:`CurationConfig` that are not run parameters (not in params, run conf,
#: ``to_dict`` or fingerprints): where the run's storage is reached, which may hold secrets.
NOT_PARAMS = frozenset({"storage"})
#: The corpus's fields: in :meth:`CurationConfig.to_dict` only while ``corpus_uri`` is set, so a
#: run without a corpus has the summary, fingerprints and Ray Job arguments it had before.
CORPUS_FIELDS = ("corpus_uri", "url_field")


def _with_filter_params(cls: type) -> type:
    """Give ``cls`` one field per filter param (:data:`winnow.filters.PARAMS`: each filter's
    threshold and keep fraction, with its declared default), after the field ``nsfw_weights``."""
    annotations: dict[str, Any] = {}
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():
        annotations[name] = annotation
        if name == "nsfw_weights":
            for param in FILTER_PARAMS:
                kind = "int" if param.integer else "float"
                annotations[param.name] = f"{kind} | None" if param.nullable else kind
                setattr(cls, param.name, param.default)
    cls.__annotations__ = annotations
    return cls


@dataclass(frozen=True, kw_only=True)
@_with_filter_params
class CurationConfig:
    """Everything a curation run needs; the DAG's params map onto these fields one to one.

    Each knob is checked by the config of the stage that owns it (``EmbedConfig``,
    ``AestheticConfig``, ``DedupConfig``...); :meth:`validate` builds them all and reports every
    problem at once. Besides the fields written here, every filter param of
    :data:`winnow.filters.PARAMS` is a field (``aesthetic_threshold``, ``nsfw_threshold``,
    ``clip_score_keep_fraction``...), with its declared default.
    """

    input_uri: str
    output_root: str
    run_key: str
    buffer_size: int = 256
    max_partitions: int = DEFAULT_MAX_PARTITIONS
    model: str = "ViT-L-14-quickgelu"
    pretrained: str = "openai"
    model_dir: str | None = None
    aesthetic_weights: str | None = None
    nsfw_weights: str | None = None
    watermark_weights: str | None = None
    caption_field: str = "caption"
    dedup_eps: float = 0.05
    dedup_clusters: int = 0
    dedup_sample_size: int = 0
    dedup_buckets: int = 0
    allow_random_weights: bool = False
    overwrite: bool = False
    skip_bad_shards: bool = False
    decode_backend: DecodeBackend = "auto"
    batch_size: int = 64
    #: The corpus this run adds to (:mod:`winnow.corpus`): local path, ``s3://`` or ``gs://``.
    #: None: the run stands alone (no cross-run dedup, takedowns nor publish).
    corpus_uri: str | None = None
    #: The JSON sidecar field that holds a record's source URL (the corpus manifest's ``url``,
    #: and what a takedown by URL matches).
    url_field: str = "url"
    #: How the run's object store (its input and its run root) is reached: built once by the
    #: run's entry point (``run_all``: the AWS environment unless given; an operator's try: its
    #: ``storage_conn_id``; the Ray Job entry: its environment). Not a run parameter: never in
    #: :meth:`to_dict`, a fingerprint, a summary or a log line.
    storage: StorageOptions | None = field(default=None, repr=False, compare=False)

    @property
    def run_root(self) -> str:
        return f"{self.output_root.rstrip('/')}/{self.run_key}"

    @property
    def root(self) -> RunRoot:
        """Where the run stores, as the one value its work carries: the run root's URI and
        :attr:`storage`."""
        return RunRoot(self.run_root, self.storage)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, also_accepted: Collection[str] = (),
                    storage: StorageOptions | None = None) -> CurationConfig:
        """Build from DAG params / run conf; empty strings mean "not set" for optional paths.
        ``storage``: how the run's object store is reached (never a param: see :attr:`storage`).

        ``also_accepted``: keys the caller handles itself (the operators' connection ids); they
        are left out of the config. Any other key that is not a field is a :class:`ConfigError`
        naming it and the closest known parameter: a misspelt run-conf key must not quietly
        run with the defaults.

        >>> CurationConfig.from_params({"input_uri": "in", "output_root": "out", "run_key": "r",
        ...                             "aesthetic_treshold": 5})
        Traceback (most recent call last):
        ...
        winnow.exceptions.ConfigError: unknown parameter 'aesthetic_treshold' (did you mean 'aesthetic_threshold'?); ...
        """
        known = {f.name for f in fields(cls)} - NOT_PARAMS
        unknown = sorted(set(params) - known - set(also_accepted))
        if unknown:
            raise ConfigError(_unknown_keys(unknown, known | set(also_accepted)))
        values = {k: v for k, v in params.items() if k in known}
        for optional in ("model_dir", "aesthetic_weights", "nsfw_weights", "watermark_weights", "corpus_uri",
                         *(p.name for p in FILTER_PARAMS if p.nullable)):
            if values.get(optional) in ("", None):
                values[optional] = None
        missing = [k for k in ("input_uri", "output_root", "run_key") if not values.get(k)]
        if missing:
            raise ConfigError(f"missing required parameter(s): {', '.join(missing)}")
        # A model directory filled by `python -m winnow.models fetch` names the heads' weights in
        # its lock: `model_dir` alone is then enough (a weights param given wins). The watermark
        # detector only where its filter is on (it costs a model in the embed stage).
        from winnow.stages.models import locked_weights

        watermark_on = bool(values.get("watermark_threshold")) or values.get("watermark_keep_fraction") is not None
        for param, path in locked_weights(values.get("model_dir")).items():
            if values.get(param) is None and (param != "watermark_weights" or watermark_on):
                values[param] = path
        return cls(**values, storage=storage)

    def to_dict(self) -> dict[str, Any]:
        """The run parameters (what a Ray Job's arguments and the summary carry): every field
        but :attr:`storage`."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in NOT_PARAMS and (self.corpus_uri is not None or f.name not in CORPUS_FIELDS)}

    @property
    def corpus(self) -> Any:
        """The run's :class:`winnow.corpus.Corpus` (reached with :attr:`storage`), or None."""
        if self.corpus_uri is None:
            return None
        from winnow.corpus import open_corpus

        return open_corpus(self.corpus_uri, self.storage)

    @cached_property
    def model_spec(self) -> ModelSpec:
        """The embedding model, checked to be loadable (no model is built)."""
        from winnow.stages.models import validate_model_spec

        return validate_model_spec(self.model, self.pretrained, self.model_dir, self.allow_random_weights)

    def stage_config(self, name: str) -> Any:
        """The config object of stage ``name``, built (and so checked) by the factory the
        registry names for it (``StageSpec.config``), from these fields."""
        return stage_spec(name).load_config()(self, name)

    def dedup_config(self) -> Any:
        """The one dedup config; each dedup step fingerprints its own slice of it."""
        from winnow.stages.dedup import DedupConfig

        return DedupConfig(eps=self.dedup_eps, n_clusters=self.dedup_clusters,
                           sample_size=self.dedup_sample_size, buckets=self.dedup_buckets)

    def validate(self) -> None:
        """Fail fast, before any GPU work, with every problem a user must fix listed at once."""
        problems: list[str] = []
        from winnow.runkey import run_key_problem

        if run_key_problem(self.run_key):
            problems.append(run_key_problem(self.run_key))
        # The run's own flags; every other knob is its stage config's (built below).
        problems += filter(None, (bool_problem(name, getattr(self, name)) for name in ("overwrite", "allow_random_weights")))
        problems += _corpus_problems(self)
        model_error = ""
        try:
            _ = self.model_spec  # resolving it checks the model name and weights
        except WinnowError as exc:
            model_error = str(exc)
            problems.append(f"model/pretrained: {exc}")
        by_message: dict[str, list[str]] = {}  # stages sharing one config report its problem once
        for spec in STAGES:
            try:
                stage_config = self.stage_config(spec.name)
            except (ValueError, TypeError, WinnowError) as exc:
                if str(exc) != model_error:  # said once above, not again per stage of that model
                    by_message.setdefault(str(exc), []).append(spec.name)
                continue
            # A stage whose config names files (a head's weights) checks them here, once.
            problems += getattr(stage_config, "file_problems", lambda: [])()
        problems += [f"{', '.join(names)}: {message}" for message, names in by_message.items()]
        try:
            from winnow.data.shards import list_shards

            list_shards(self.input_uri, self.storage)
        except WinnowError as exc:
            problems.append(f"input_uri: {exc}")
        if problems:
            raise ConfigError("invalid curation parameters:\n  - " + "\n  - ".join(problems))


def _corpus_problems(cfg: CurationConfig) -> list[str]:
    if cfg.corpus_uri is None:
        return []
    problems = []
    if not isinstance(cfg.corpus_uri, str) or not cfg.corpus_uri.strip():
        problems.append(f"corpus_uri: must be a path or URI, got {cfg.corpus_uri!r}")
    elif cfg.corpus_uri.rstrip("/") == cfg.run_root.rstrip("/") or cfg.corpus_uri.rstrip("/").startswith(cfg.run_root.rstrip("/") + "/"):
        problems.append(f"corpus_uri: {cfg.corpus_uri!r} is inside the run root {cfg.run_root!r}; a corpus outlives runs: "
                        "put it beside the runs (e.g. <output_root>/_corpus)")
    if not isinstance(cfg.url_field, str) or not cfg.url_field.strip():
        problems.append(f"url_field: must be a JSON field name, got {cfg.url_field!r}")
    return problems


def _unknown_keys(unknown: list[str], known: set[str]) -> str:
    """``unknown parameter 'x' (did you mean 'y'?)`` for each key, then the parameters there are."""
    import difflib

    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        parts.append(f"{key!r} (did you mean {close[0]!r}?)" if close else f"{key!r} (no parameter is close)")
    noun = "parameter" if len(unknown) == 1 else "parameters"
    return f"unknown {noun} {', '.join(parts)}; the parameters are: {', '.join(sorted(known))}"


# ---- stages ------------------------------------------------------------------------------

def make_stage(cfg: CurationConfig, name: str) -> Stage:
    """The stage object of one of the row-group (partition) stages of a run."""
    spec = stage_spec(name)
    if spec.scope != "partition":
        partition = ", ".join(s.name for s in partition_stages())
        raise ConfigError(f"stage {name!r} runs over the whole run, not per partition; row-group stages are {partition}")
    return spec.load_compute()(cfg.stage_config(name))


def stage_fingerprints(cfg: CurationConfig, plan: RowGroupPlan, *, index_digest: str | None = None,
                       until: str | None = None) -> dict[str, StageFingerprint]:
    """Fingerprints of every stage after the index (up to ``until``), each chained to the
    stages it reads: the index's digest (``index_digest``, else the stored one, ``""`` before
    the index is recorded), then the digests of this chain, so a changed stage changes every
    stage after it before anything is recorded. With ``index_digest`` nothing is read."""
    store = CommitStore(cfg.root)
    if index_digest is None:
        index_digest = (store.read_fingerprint("index") or {}).get("digest", "")
        chain_store: CommitStore | None = store
    else:
        chain_store = None
    digests = {"index": index_digest}
    out: dict[str, StageFingerprint] = {}
    for spec in STAGES[1:]:
        owner = make_stage(cfg, spec.name) if spec.scope == "partition" else cfg.stage_config(spec.name)
        f = stage_fingerprint(chain_store, spec.name, owner, plan, digests=digests)
        digests[spec.name] = f.digest
        out[spec.name] = f
        if spec.name == until:
            break
    return out


def prepare_stages(cfg: CurationConfig, plan: RowGroupPlan, *, log: Callable[[str], None] | None = None) -> dict[str, str]:
    """Check (or record) every stage's fingerprint once per run, before any partition starts.

    A changed config raises StageConfigMismatch for the first changed stage; with
    ``overwrite`` the changed stages (and, through the chained upstream digests, every stage
    after them) are moved aside, the stages before them are kept.
    """
    log = log or logger.info
    store = CommitStore(cfg.root)
    moved: dict[str, str] = {}
    for name, f in stage_fingerprints(cfg, plan).items():
        target = store.ensure_stage(f, overwrite=cfg.overwrite)
        if target:
            moved[name] = target
            log(f"stage {name}: configuration changed, old output moved to {target}")
    return moved


# ---- the run -------------------------------------------------------------------------------
#
# Every step below takes the run's ``execution`` (where it runs: backend, Ray address, compute,
# worker sizes) and reads where it stores from ``cfg.root`` (the run root with ``cfg.storage``),
# both built once by its caller: run_all, an operator's try, the Ray Job entry.

def _hold_lease(cfg: CurationConfig, owner: str | None) -> None:
    """Take or renew the run root's lease (``owner`` = the DAG run id); None skips it. A task of
    a running run whose lease is fresh pays one GET; a renewal the store fails while the lease
    has time left does not stop the run (:func:`lease.acquire`)."""
    if owner:
        lease.acquire(CommitStore(cfg.root), owner)


def run_index(cfg: CurationConfig, *, execution: Execution, owner: str | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Validate, index the shards (resumable; scanned by Ray tasks in shard groups), fix the
    plan and check every stage's fingerprint.

    The execution's worker sizes are the model workers' (the scan tasks take 1 CPU each):
    checked here, before any work, against the alive Ray nodes."""
    from winnow.ray.resources import check_fits

    log = log or logger.info
    cfg.validate()
    check_fits(execution)
    _hold_lease(cfg, owner)
    try:
        return _index_and_prepare(cfg, log, execution)
    except WinnowError:
        # Failing fast (changed config, bad shard) must not lock the run root against the
        # corrected rerun, which comes under a new run id.
        if owner:
            lease.release_quietly(CommitStore(cfg.root), owner)
        raise


def _index_and_prepare(cfg: CurationConfig, log: Callable[[str], None], execution: Execution) -> dict[str, Any]:
    build_index = stage_spec("index").load_compute()
    result = build_index(cfg.root, cfg.stage_config("index"), overwrite=cfg.overwrite, log=log,
                         execution=execution)
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
    """The run's plan, from the index's ``_index.json`` (one read; not the index's fingerprint)."""
    from winnow.data.index import load_index

    return load_index(cfg.root, fingerprint=False).plan


def run_partition(cfg: CurationConfig, stage: str, partition: int, *, execution: Execution,
                  owner: str | None = None, log: Callable[[str], None] | None = None,
                  store: CommitStore | None = None, stored: Any = ..., done: set[int] | None = None,
                  ) -> PartitionSummary:
    """Run one row-group stage over one partition; failures are in ``summary.failed``.

    A model stage runs as the execution's ``compute``, each model worker of its ``worker_cpus``
    CPUs and ``worker_gpus`` GPUs (None: the policy of :mod:`winnow.ray.resources`), never more
    than one alive node holds.

    What a caller (the partition operator) already read is not read again: ``store`` (its
    :class:`CommitStore`), ``stored`` (the stage's ``_stage.json`` as it read it), ``done`` (the
    row groups its listing found committed). A rerun's task then makes one GET of the lease
    beside the caller's GET of ``_stage.json`` and its LIST of the partition."""
    from winnow.rowgroups.store import stored_plan

    _hold_lease(cfg, owner)
    stage_obj = make_stage(cfg, stage)
    store = store if store is not None else CommitStore(cfg.root)
    # Never overwrite here: prepare_stages did that once for the run. This only refuses a
    # partition task whose config differs from what the stage folder was made with.
    if stored is ...:
        stored = store.read_fingerprint(stage)
    plan = stored_plan(stored)
    if plan is not None and (plan.buffer_size, plan.max_partitions) == (cfg.buffer_size, cfg.max_partitions):
        # The stage's file has the plan and the index digest the chain starts from (written
        # there by prepare_stages): the chain of this run's config is checked against it with
        # no other read. Not the index's files: a changed index changes every stage's digest
        # and prepare_stages, which the index task runs, re-records them all.
        fingerprint = stage_fingerprints(cfg, plan, index_digest=stored["run"]["index"], until=stage)[stage]
    else:  # a stage file from before its run block, or a config whose plan knobs changed
        plan = load_plan(cfg)
        fingerprint = stage_fingerprints(cfg, plan)[stage]
    store.ensure_stage(fingerprint, overwrite=False, stored=stored)
    spec = stage_spec(stage)
    return run_stage_partition(stage_obj, run_root=cfg.root, plan=plan, partition=partition, execution=execution,
                               uses_model=spec.uses_model, light=spec.light, log=log, store=store, done=done)


def run_global(cfg: CurationConfig, stage: str, *, execution: Execution, owner: str | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run a global stage (one task over the whole run) and return its summary.

    The index makes the plan (:func:`run_index`). Every other global stage gets the run root's
    lease, the plan, its fingerprint checked (never overwriting: :func:`prepare_stages` did that
    once for the run) and every row group of the partition stages it reads; then the compute its
    registry entry names runs: ``fn(run_root, plan, config, fingerprint, *, execution, log)``
    (``thresholds``: the threshold each filter uses; ``centroids``: dedup's k-means, whose
    ``buckets`` is the number of pairwise units)."""
    spec = stage_spec(stage)
    if spec.scope != "global":
        raise ConfigError(f"stage {stage!r} is not a global stage; global stages are "
                          f"{', '.join(s.name for s in STAGES if s.scope == 'global')}")
    if stage == "index":
        return run_index(cfg, execution=execution, owner=owner, log=log)
    _hold_lease(cfg, owner)
    plan = load_plan(cfg)
    store = CommitStore(cfg.root)
    fingerprint = stage_fingerprints(cfg, plan)[stage]
    store.ensure_stage(fingerprint, overwrite=False)
    for up in spec.upstream:
        if stage_spec(up).scope != "partition":
            continue
        missing = [rg for p in range(plan.num_partitions) for rg in store.missing(up, plan, p, clean_temp=False)]
        if missing:
            raise WinnowError(f"{stage} needs every row group of stage {up!r}; {len(missing)} are not "
                              f"committed (first: {missing[:10]}). Run stage {up!r} for all partitions first.")
    compute = spec.load_compute()
    return compute(cfg.root, plan, cfg.stage_config(stage), fingerprint, log=log, execution=execution)


def _corpus_step(cfg: CurationConfig, owner: str | None, stage_needed: str, what: str) -> tuple[Any, RowGroupPlan]:
    _hold_lease(cfg, owner)
    plan = load_plan(cfg)
    store = CommitStore(cfg.root)
    missing = [rg for p in range(plan.num_partitions) for rg in store.missing(stage_needed, plan, p, clean_temp=False)]
    if missing:
        raise WinnowError(f"{what} needs every row group of stage {stage_needed!r}; {len(missing)} are not committed "
                          f"(first: {missing[:10]}). Run stage {stage_needed!r} for all partitions first.")
    return cfg.corpus, plan


def run_corpus_pre(cfg: CurationConfig, *, execution: Execution | None = None, owner: str | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """After the index, before embed: the records a takedown lists or whose bytes the corpus holds
    (:func:`winnow.stages.corpus.run_pre`); never waits for an earlier date. A run without a
    corpus: nothing (``{"corpus": None}``)."""
    if cfg.corpus_uri is None:
        return {"corpus": None}
    from winnow.stages.corpus import run_pre

    corpus, plan = _corpus_step(cfg, owner, "index", "the corpus pre-check")
    return run_pre(cfg.root, plan, corpus, url_field=cfg.url_field, log=log or logger.info)


def run_corpus_check(cfg: CurationConfig, *, execution: Execution | None = None, owner: str | None = None,
                     log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """After the score stages, before thresholds: the records a takedown lists or whose bytes the
    corpus holds, against the corpus as it is now (:func:`winnow.stages.corpus.run_check`); from
    here on they count for nothing (thresholds, dedup), as if the pre-check had found them. The
    caller runs it only once every earlier date published (the DAG's ``corpus_check`` task waits
    for that), so dates run side by side build the corpus dates one after another build. A run
    without a corpus: nothing."""
    if cfg.corpus_uri is None:
        return {"corpus": None}
    from winnow.stages.corpus import run_check

    corpus, plan = _corpus_step(cfg, owner, "embed", "the corpus check")
    return run_check(cfg.root, plan, corpus, url_field=cfg.url_field, log=log or logger.info)


def run_corpus_near(cfg: CurationConfig, *, execution: Execution | None = None, owner: str | None = None,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """After the run's dedup, before status: the records that pass the filters and lie within
    ``dedup_eps`` of a corpus record (:func:`winnow.stages.corpus.run_near`), one corpus bucket at
    a time. Needs no wait of its own: the corpus is the one the check saw. A run without a
    corpus: nothing."""
    if cfg.corpus_uri is None:
        return {"corpus": None}
    from winnow.stages.corpus import run_near

    corpus, plan = _corpus_step(cfg, owner, "dedup", "the corpus near-duplicate check")
    return run_near(cfg.root, plan, corpus, eps=cfg.dedup_eps, log=log or logger.info)


def embed_model_digest(cfg: CurationConfig) -> str:
    """What makes two runs' embeddings comparable (model, weights, preprocessing, precision): a
    corpus holds one kind only."""
    import hashlib

    fp = make_stage(cfg, "embed").fingerprint_config()
    same = {k: fp[k] for k in ("model", "weights_digest", "embed_dim", "preprocess", "precision", "max_pixels") if k in fp}
    return hashlib.sha256(json.dumps(same, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_publish(cfg: CurationConfig, *, logical_date: str | None = None, execution: Execution | None = None,
                owner: str | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """After write: the run's kept records join the corpus in one atomic step
    (:func:`winnow.corpus.publish`); a rerun of a published run publishes nothing. A run without
    a corpus: nothing."""
    if cfg.corpus_uri is None:
        return {"corpus": None}
    from winnow.card import write_corpus_card
    from winnow.corpus import publish
    from winnow.stages.corpus import checked_generation
    from winnow.stages.status import count_outcomes

    corpus, plan = _corpus_step(cfg, owner, "write", "publishing to the corpus")
    store = CommitStore(cfg.root)
    counts = {k: v for k, v in count_outcomes(cfg.root, plan).items() if isinstance(v, int)}
    summary = publish(corpus, cfg.root, run_key=cfg.run_key, logical_date=logical_date,
                      checked_generation=checked_generation(store), embed_fingerprint=embed_model_digest(cfg),
                      url_field=cfg.url_field, counts=counts, owner=owner, log=log or logger.info)
    # Also on a rerun that published nothing: a try that committed and died before its card.
    write_corpus_card(corpus)
    return summary


def run_buckets(cfg: CurationConfig, stage: str, buckets: list[int] | None = None, *, execution: Execution,
                owner: str | None = None, log: Callable[[str], None] | None = None) -> UnitSummary:
    """A bucket stage (dedup's ``pairwise``: its registry ``compute``) over ``buckets`` (all when
    None): a Ray task per bucket not committed yet, of the execution's ``worker_cpus`` CPUs
    (default 1) and ``worker_gpus`` GPUs (default 1 where a node has GPUs)."""
    spec = stage_spec(stage)
    if spec.scope != "bucket":
        raise ConfigError(f"stage {stage!r} is not mapped over buckets")
    _hold_lease(cfg, owner)
    plan = load_plan(cfg)
    # The stage's compute checks its fingerprint itself (never overwriting: prepare_stages did).
    return spec.load_compute()(cfg.root, plan, cfg.stage_config(stage), buckets, execution=execution, log=log)


def run_report(
    cfg: CurationConfig, summaries: Iterable[Mapping[str, Any]] = (), *, owner: str | None = None,
    storage: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Count outcomes from storage, write ``<run_root>/_summary.json`` and return it.

    ``summaries`` are the partition summaries of this run (``PartitionSummary.to_dict()``);
    they give how many row groups were computed versus skipped, and the storage requests their
    processes retried (``storage_retries``, ``storage_throttled``), to which ``storage`` (what
    the caller's processes retried besides) and this call's own are added.
    """
    from winnow.data.index import load_index
    from winnow.stages.status import count_outcomes

    before = retry.counts()
    index = load_index(cfg.root)
    plan = index.plan
    counts = count_outcomes(cfg.root, plan)
    computed = skipped = 0
    per_stage: dict[str, dict[str, int]] = {}
    storage = {name: int(storage.get(name, 0)) for name in retry.COUNT_NAMES} if storage else dict.fromkeys(
        retry.COUNT_NAMES, 0)
    for s in summaries:
        for name in retry.COUNT_NAMES:
            storage[name] += int(s.get(name, 0) or 0)
        computed += int(s.get("computed", 0))
        skipped += int(s.get("skipped", 0))
        st = per_stage.setdefault(s["stage"], {"computed": 0, "skipped": 0})
        st["computed"] += int(s.get("computed", 0))
        st["skipped"] += int(s.get("skipped", 0))
    store = CommitStore(cfg.root)
    own = retry.counts_since(before)
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
        **{name: storage[name] + own[name] for name in retry.COUNT_NAMES},
        "run_root": cfg.run_root,
        "write_dir": store.stage_dir("write"),
        "config": cfg.to_dict(),
    }
    write_json(store.fs, store.path(SUMMARY_FILE), summary)
    from winnow.card import write_card

    write_card(cfg.root)  # card.json + CARD.md beside the summary, built from what the run root stores
    if owner:
        lease.release(store, owner)  # the run is complete: the run root is free again
    return summary


def run_all(
    cfg: CurationConfig,
    *,
    ray_address: str | None = None,
    backend: Backend = "ray",
    owner: str | None = None,
    log: Callable[[str], None] | None = None,
    compute: Compute | None = None,
    worker_cpus: float | None = None,
    worker_gpus: float | None = None,
    logical_date: str | None = None,
) -> dict[str, Any]:
    """The whole curation without Airflow, in the DAG's order (the registry's phases; the
    stages of a partition phase run depth-first per partition).

    With a corpus (``cfg.corpus_uri``) the corpus steps run where the DAG runs them: the
    pre-check after the index, the check after the score stages (before thresholds), the
    near-duplicate check between dedup and status, publish last (``logical_date``
    is what the corpus lists the run under). Runs of one corpus called one after another publish
    in that order.

    Where it runs is one :class:`~winnow.execution.Execution`, built (and checked) here from
    ``backend``, ``ray_address``, ``compute``, ``worker_cpus`` and ``worker_gpus``. Model workers
    run as ``compute``: by default ``"tasks"`` when this call starts its own embedded Ray (no
    ``ray_address`` and ``WINNOW_RAY_EMBEDDED`` is not ``shared``), else ``"actors"``
    (:func:`winnow.execution.default_compute`); each of ``worker_cpus`` CPUs and ``worker_gpus``
    GPUs, or the policy of :mod:`winnow.ray.resources` (never more than one alive node holds).

    Where it stores is ``cfg.storage``; when the config names none, the AWS environment
    (:meth:`~winnow.rowgroups.fs.StorageOptions.from_env`), read once here and carried with the
    run to every step and worker.

    Raises :class:`RowGroupsFailedError` after every stage that could run has run, when any
    row group failed. ``owner`` names the run-root lease. By default it is this process: if it
    dies (SIGKILL, power loss of a laptop run), the next run_all on this host takes the run
    root over at once and resumes. An explicit owner (e.g. a DAG run id) is only freed by its
    owner or by expiry; a rerun with the same owner resumes at once.
    """
    log = log or logger.info
    t0 = time.perf_counter()
    execution = Execution(backend=backend, ray_address=ray_address, compute=compute, worker_cpus=worker_cpus,
                          worker_gpus=worker_gpus)
    if cfg.storage is None:
        cfg = replace(cfg, storage=StorageOptions.from_env())
    owner = owner or lease.process_owner()
    step = {"execution": execution, "owner": owner, "log": log}
    partitions: list[int] = []
    summaries: list[dict[str, Any]] = []
    storage_before = retry.counts()
    workers = {name: 0 for name in retry.COUNT_NAMES}  # what bucket units' workers retried
    try:
        for scope, specs in run_phases():
            if scope == "global":
                if specs[0].name == "thresholds":
                    run_corpus_check(cfg, **step)  # the ordered check: before anything counts scores
                result = run_global(cfg, specs[0].name, **step)
                if specs[0].name == "index":
                    partitions = list(result["partitions"])
                    run_corpus_pre(cfg, **step)
                continue
            if scope == "bucket":
                (spec,) = specs
                bs = run_buckets(cfg, spec.name, **step)
                workers = {k: v + getattr(bs, k) for k, v in workers.items()}
                if bs.failed:
                    raise BucketsFailedError(spec.name, bs.failed)
                continue
            names = [s.name for s in specs]
            # With a corpus, its near-duplicate check sits between dedup and status (it reads
            # every partition's dedup flags): the phase runs in two halves around it.
            cut = names.index("status") if cfg.corpus_uri is not None and "status" in names else None
            halves = [specs] if cut is None else [specs[:cut], specs[cut:]]
            for half_no, half in enumerate(halves):
                if half_no == 1:
                    run_corpus_near(cfg, **step)
                failed: list[PartitionSummary] = []
                for p in partitions:
                    for spec in half:
                        s = run_partition(cfg, spec.name, p, **step)
                        summaries.append(s.to_dict())
                        if not s.ok:
                            failed.append(s)
                            break  # the later stages of this partition read what failed
                if failed:
                    raise RowGroupsFailedError(failed)
        mine = retry.counts_since(storage_before)
        summary = run_report(cfg, summaries, owner=owner, storage={k: mine[k] + workers[k] for k in workers})
        if summary["storage_retries"]:
            log(f"storage: {summary['storage_retries']} requests retried, {summary['storage_throttled']} of them "
                "throttled by the store")
        if cfg.corpus_uri is not None:
            summary["corpus"] = run_publish(cfg, logical_date=logical_date, **step)
            from winnow.card import write_card

            write_card(cfg.root)  # again, now that the corpus lists the run (the DAG publishes first)
    finally:
        # A failed run_all leaves no lease behind: rerunning it resumes at once (with the store
        # down, the lease stays, and this host's next run takes it over: its holder is gone).
        lease.release_quietly(CommitStore(cfg.root), owner)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    log(f"curation done: {json.dumps({k: summary[k] for k in ('records', 'kept', 'duplicates')})} -> {summary['write_dir']}")
    return summary
