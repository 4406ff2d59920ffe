"""OpenLineage for the curation operators: what each task read and wrote, named as OpenLineage
names datasets, and which model, weights and thresholds the run used.

Every byte of a run is read and written inside Ray workers, where Airflow's automatic hook
lineage sees nothing, so each operator says it itself: :class:`~winnow_airflow.base.CurationOperator`
implements ``get_openlineage_facets_on_complete`` and ``get_openlineage_facets_on_failure``,
which the OpenLineage provider (``apache-airflow-providers-openlineage``, the ``openlineage``
extra) calls after the task ends. Without the provider nothing here is imported and the methods
return None; the DAG parses and runs the same.

**Datasets.** Named after the `OpenLineage naming spec`_ for object stores and local files:

==========================  ====================  ==========================
URI                         namespace             name
==========================  ====================  ==========================
``s3://bucket/a/b/``        ``s3://bucket``       ``a/b``
``gs://bucket/a/b``         ``gs://bucket``       ``a/b``
``/data/a/b`` (local path)  ``file``              ``/data/a/b`` (absolute)
==========================  ====================  ==========================

The shard dataset is the ``input_uri`` (rendered), down to the folder above its first glob
character; a brace list (``shards/{a,b}/``) is one dataset per item, and the items of a list of
tar files are their folder. The run's datasets are the folders of the run root
(``<output_root>/<run_key>``, :attr:`winnow.pipeline.CurationConfig.run_root`).

**Which task emits what.** The stage graph is the engine's registry (``winnow.registry``): a
stage reads the folders of its ``upstream`` stages and writes its own folder, so

- ``index``: input the shards, output ``<run_root>/index``;
- each other stage (``embed``, ``aesthetic``, ..., ``status``, ``write``): inputs its upstream
  stages' folders, where ``index`` stands for the shards and ``<run_root>/index`` (a stage that
  reads the index reads records out of the shards: embed decodes them, write copies their
  bytes), output its own folder: ``status`` gives ``<run_root>/status``, ``write``
  ``<run_root>/write``;
- ``report``, the run as a whole: input the shards, outputs ``<run_root>/write`` (the curated
  dataset) and ``<run_root>/status`` (one outcome row per input record), with their record
  counts (``outputStatistics``) and the shards' (``inputStatistics``);
- the corpus steps, with ``corpus_uri`` set: ``corpus_pre``, ``corpus_check`` and
  ``corpus_near`` read the corpus and write ``<run_root>/corpus``; ``publish`` reads
  ``<run_root>/write`` and writes the corpus. Without a corpus they did nothing: no datasets,
  no facet;
- ``takedown`` (the ``image_takedown`` DAG, :func:`takedown_lineage`): inputs the list and the
  corpus, output the corpus, with a ``winnowTakedown`` run facet (reason, the takedown's id in
  the corpus, how many records it removed).

**Run facet** ``winnow`` (:func:`run_facet`) on every event: the step, run key and run root,
winnow's version, the embedding model (``model``, ``pretrained``), the weights digest of each
model whose output decides an outcome (``weights``: embed, the score heads, the watermark
detector where it is on) and the step's fingerprint digest, as the stage fingerprints in the
run root record them (``<stage>/_stage.json``: no model is loaded), the thresholds the run
uses once the ``thresholds`` step has fixed them, and on the report task the counts of
``_summary.json``. Building it costs a few small JSON reads; it never reads row-group data, and an
error while building it is logged and the event goes without winnow's lineage: the task's own
outcome never depends on it.

.. _OpenLineage naming spec: https://openlineage.io/docs/spec/naming
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from winnow.pipeline import CurationConfig

log = logging.getLogger(__name__)

#: The run facet's key in an event's ``run.facets``.
FACET_KEY = "winnow"
#: The takedown task's run facet's key.
TAKEDOWN_FACET_KEY = "winnowTakedown"

#: URI schemes that name the same store as OpenLineage's (``gcs://`` is ``gs://``).
_SCHEMES = {"gcs": "gs", "s3a": "s3", "s3n": "s3"}
_MAGIC = "*?["
#: Corpus steps that read the corpus and write ``<run_root>/corpus``.
_CORPUS_CHECKS = ("corpus_pre", "corpus_check", "corpus_near")


def provider_available() -> bool:
    """Whether the OpenLineage provider (and its client) can be imported."""
    try:
        import airflow.providers.openlineage.extractors  # noqa: F401
        import openlineage.client.event_v2  # noqa: F401
    except ImportError:
        return False
    return True


# ---- dataset names -----------------------------------------------------------------------------


def dataset_name(uri: str) -> tuple[str, str]:
    """``(namespace, name)`` of a folder or file, after OpenLineage's naming spec.

    >>> dataset_name("s3://bucket/shards/2025-01-01/")
    ('s3://bucket', 'shards/2025-01-01')
    >>> dataset_name("gs://bucket/a/b"), dataset_name("gcs://bucket/a")
    (('gs://bucket', 'a/b'), ('gs://bucket', 'a'))
    >>> dataset_name("/data/curated/20250101/write"), dataset_name("file:///data/x/")
    (('file', '/data/curated/20250101/write'), ('file', '/data/x'))
    >>> dataset_name("s3://bucket"), dataset_name("s3://bucket/x?endpoint_override=host:9000")
    (('s3://bucket', '/'), ('s3://bucket', 'x'))
    """
    if "://" not in uri:
        path = os.path.abspath(uri)
        return "file", path.rstrip("/") or "/"
    parts = urlsplit(uri)
    scheme = _SCHEMES.get(parts.scheme, parts.scheme)
    if scheme == "file":
        path = parts.path.rstrip("/") or "/"
        return (f"file://{parts.netloc}" if parts.netloc else "file"), path
    return f"{scheme}://{parts.netloc}", parts.path.strip("/") or "/"


def shard_uris(input_uri: str) -> list[str]:
    """The folders (or single tar files) an ``input_uri`` reads: each item of its brace list, cut
    to the folder above its first glob character; the items of a list of tar files are their folder.

    >>> shard_uris("s3://b/shards/2025-01-01/")
    ['s3://b/shards/2025-01-01/']
    >>> shard_uris("s3://b/shards/*/part-*.tar"), shard_uris("/d/shard-{000..002}.tar")
    (['s3://b/shards'], ['/d'])
    >>> shard_uris("/d/{a,b}/"), shard_uris("/d/one.tar")
    (['/d/a/', '/d/b/'], ['/d/one.tar'])
    """
    from winnow.data.shards import expand_input

    items = expand_input(input_uri)
    out: list[str] = []
    for item in items:
        cut = min((item.find(c) for c in _MAGIC if c in item), default=-1)
        if cut >= 0:
            item = item[:cut].rsplit("/", 1)[0]
        elif len(items) > 1 and item.endswith(".tar"):
            item = item.rsplit("/", 1)[0]
        if item not in out:
            out.append(item)
    return out


def task_datasets(step: str, cfg: CurationConfig) -> tuple[list[str], list[str]]:
    """``(inputs, outputs)`` of one step of a run, as URIs (see the module docstring).

    >>> from winnow.pipeline import CurationConfig
    >>> cfg = CurationConfig(input_uri="s3://in/shards/", output_root="s3://out/curated", run_key="20250101")
    >>> task_datasets("index", cfg)
    (['s3://in/shards/'], ['s3://out/curated/20250101/index'])
    >>> task_datasets("write", cfg)[0]
    ['s3://in/shards/', 's3://out/curated/20250101/index', 's3://out/curated/20250101/embed', 's3://out/curated/20250101/status']
    >>> task_datasets("report", cfg)[1]
    ['s3://out/curated/20250101/write', 's3://out/curated/20250101/status']
    >>> task_datasets("publish", cfg)
    ([], [])
    """
    from winnow.registry import stage_spec

    root = cfg.run_root
    shards = shard_uris(cfg.input_uri)
    if step == "report":
        return shards, [f"{root}/write", f"{root}/status"]
    if step in (*_CORPUS_CHECKS, "publish"):
        if not cfg.corpus_uri:
            return [], []
        if step == "publish":
            return [f"{root}/write"], [cfg.corpus_uri]
        return [cfg.corpus_uri], [f"{root}/corpus"]
    spec = stage_spec(step)
    inputs = list(shards) if step == "index" else []
    for upstream in spec.upstream:
        inputs += [*shards, f"{root}/index"] if upstream == "index" else [f"{root}/{upstream}"]
    return list(dict.fromkeys(inputs)), [f"{root}/{step}"]


# ---- what the run root records -----------------------------------------------------------------


def weights_digests(fingerprints: Mapping[str, Mapping[str, Any] | None]) -> dict[str, str]:
    """Every ``weights_digest`` the stage fingerprints record, by stage (a model nested in a
    stage's config, such as embed's watermark detector, as ``<stage>.<key>``).

    >>> weights_digests({"embed": {"config": {"weights_digest": "sha256:a", "detector": {"weights_digest": "b"}}},
    ...                  "head": {"config": {"weights_digest": "random-seed1"}}, "dedup": None})
    {'embed': 'sha256:a', 'embed.detector': 'b', 'head': 'random-seed1'}
    """
    from winnow.card import recorded_weights

    return {".".join((stage, *keys)): node["weights_digest"] for stage, keys, node in recorded_weights(fingerprints)
            if isinstance(node["weights_digest"], str)}


def _model_stages() -> tuple[str, ...]:
    """The stages whose models decide an outcome: embed and the score stages the filters read."""
    from winnow.registry import FILTER_STAGES, stage_spec

    return tuple(name for name in ("embed", *FILTER_STAGES) if stage_spec(name).uses_model)


def _after_thresholds(step: str) -> bool:
    """Whether the thresholds are fixed when ``step`` ends (the ``thresholds`` step and those
    after it; the report and corpus steps read them too)."""
    from winnow.registry import STAGES

    order = [spec.name for spec in STAGES]
    return step not in order or order.index(step) >= order.index("thresholds")


def run_facts(step: str, cfg: CurationConfig, *, read_storage: bool = True) -> dict[str, Any]:
    """The content of the ``winnow`` run facet of ``step`` (see the module docstring); with
    ``read_storage`` False (the store cannot be reached from here) only what the config says."""
    import winnow

    facts: dict[str, Any] = {
        "step": step, "runKey": cfg.run_key, "runRoot": cfg.run_root, "version": winnow.__version__,
        "model": {"name": cfg.model, "pretrained": cfg.pretrained},
        "weights": {}, "fingerprint": None, "thresholds": None, "counts": None,
    }
    if not read_storage:
        return facts
    from winnow.pipeline import SUMMARY_FILE
    from winnow.registry import STAGES
    from winnow.rowgroups import CommitStore
    from winnow.rowgroups.store import read_json

    store = CommitStore(cfg.root)
    stages = {spec.name for spec in STAGES}
    fingerprints = {name: store.read_fingerprint(name) for name in _model_stages()}
    if step in stages:
        stored = fingerprints[step] if step in fingerprints else store.read_fingerprint(step)
        facts["fingerprint"] = (stored or {}).get("digest")
    facts["weights"] = weights_digests(fingerprints)
    if step == "report":
        summary = read_json(store.fs, store.path(SUMMARY_FILE)) or {}
        facts["thresholds"] = summary.get("thresholds")
        facts["counts"] = summary_counts(summary, corpus=cfg.corpus_uri is not None)
    elif _after_thresholds(step):
        facts["thresholds"] = committed_thresholds(store)
    return facts


def committed_thresholds(store: Any) -> dict[str, Any] | None:
    """``{filter: threshold}`` the thresholds step fixed; None before it ran."""
    from winnow.exceptions import WinnowError
    from winnow.stages.thresholds import load_thresholds

    try:
        entries = load_thresholds(store)
    except (WinnowError, OSError, ValueError, KeyError, TypeError):
        return None
    return {name: (entry or {}).get("threshold") for name, entry in entries.items()}


def summary_counts(summary: Mapping[str, Any], *, corpus: bool) -> dict[str, int] | None:
    """The record counts of a run summary: ``records``, one per outcome, ``written``.

    >>> summary_counts({"records": 3, "kept": 2, "duplicates": 1, "written": 2, "shards": 1}, corpus=False)["kept"]
    2
    """
    from winnow.filters import count_names

    if not summary:
        return None
    names = ("records", *count_names(corpus).values(), "written")
    return {name: summary[name] for name in names if isinstance(summary.get(name), int)}


# ---- OpenLineage objects -----------------------------------------------------------------------


@functools.cache
def facet_class() -> type:
    """The ``winnow`` run facet's class (an OpenLineage ``RunFacet``), built on first use so that
    this module imports without the OpenLineage client."""
    import attr
    from openlineage.client.facet_v2 import RunFacet

    @attr.define
    class WinnowRunFacet(RunFacet):
        """What a winnow task ran with: model, weights digests, thresholds, counts."""

        step: str
        runKey: str  # OpenLineage facets use camelCase
        runRoot: str
        version: str
        model: dict[str, Any]
        weights: dict[str, str]
        fingerprint: str | None = None
        thresholds: dict[str, Any] | None = None
        counts: dict[str, int] | None = None

    return WinnowRunFacet


def _datasets(uris: Iterable[str], kind: str, stats: Mapping[str, Mapping[str, int]] | None = None) -> list[Any]:
    from openlineage.client.event_v2 import InputDataset, OutputDataset
    from openlineage.client.facet_v2 import input_statistics_input_dataset, output_statistics_output_dataset

    out = []
    for uri in uris:
        namespace, name = dataset_name(uri)
        numbers = (stats or {}).get(uri)
        if kind == "input":
            facets = {"inputStatistics": input_statistics_input_dataset.InputStatisticsInputDatasetFacet(
                **numbers)} if numbers else {}
            out.append(InputDataset(namespace=namespace, name=name, inputFacets=facets))
        else:
            facets = {"outputStatistics": output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
                **numbers)} if numbers else {}
            out.append(OutputDataset(namespace=namespace, name=name, outputFacets=facets))
    return out


def operator_lineage(step: str, cfg: CurationConfig, *, read_storage: bool = True) -> Any:
    """The provider's ``OperatorLineage`` of one step of a run; an empty one when the step has
    no datasets (a corpus step without a corpus: it did nothing)."""
    from airflow.providers.openlineage.extractors import OperatorLineage

    inputs, outputs = task_datasets(step, cfg)
    if not inputs and not outputs:
        return OperatorLineage()
    try:
        facts = run_facts(step, cfg, read_storage=read_storage)
    except Exception as exc:  # the store is out of reach: the datasets still say what the step touched
        log.warning("OpenLineage: %s: cannot read the run root %s (%s); the event has no digests nor counts",
                    step, cfg.run_root, exc)
        facts = run_facts(step, cfg, read_storage=False)
    input_stats: dict[str, dict[str, int]] = {}
    output_stats: dict[str, dict[str, int]] = {}
    counts = facts.get("counts") or {}
    if step == "report" and counts:
        root = cfg.run_root
        if "written" in counts:
            output_stats[f"{root}/write"] = {"rowCount": counts["written"]}
        if "records" in counts:
            output_stats[f"{root}/status"] = {"rowCount": counts["records"]}
            if len(inputs) == 1:
                input_stats[inputs[0]] = {"rowCount": counts["records"]}
    return OperatorLineage(inputs=_datasets(inputs, "input", input_stats),
                           outputs=_datasets(outputs, "output", output_stats),
                           run_facets={FACET_KEY: facet_class()(**facts)})


@functools.cache
def takedown_facet_class() -> type:
    """The ``winnowTakedown`` run facet's class, built on first use like :func:`facet_class`."""
    import attr
    from openlineage.client.facet_v2 import RunFacet

    @attr.define
    class WinnowTakedownFacet(RunFacet):
        """What a takedown task applied: the reason, its id in the corpus, the records removed."""

        reason: str
        version: str
        takedown: Any = None
        removed: int | None = None

    return WinnowTakedownFacet


def takedown_lineage(corpus_uri: str, list_uri: str, reason: str, *, takedown: Any = None,
                     removed: int | None = None) -> Any:
    """The provider's ``OperatorLineage`` of one takedown: inputs the list and the corpus, output
    the corpus; ``takedown`` (its id in the corpus) and ``removed`` (records) as the takedown's
    summary says them (None for a try that ended before it: the datasets alone)."""
    from airflow.providers.openlineage.extractors import OperatorLineage

    from winnow import __version__

    facet = takedown_facet_class()(reason=reason, version=__version__, takedown=takedown, removed=removed)
    return OperatorLineage(inputs=_datasets([list_uri, corpus_uri], "input"), outputs=_datasets([corpus_uri], "output"),
                           run_facets={TAKEDOWN_FACET_KEY: facet})


def guarded(build: Callable[[], Any], task_id: str, logger: Any) -> Any:
    """An operator's ``OperatorLineage`` from ``build()``: None without the provider, and None
    (logged on ``logger``) on any error: lineage never fails a task."""
    if not provider_available():
        return None
    try:
        return build()
    except Exception as exc:  # lineage must never fail a task
        logger.warning("OpenLineage: no lineage for %s: %s: %s", task_id, type(exc).__name__, exc)
        return None
