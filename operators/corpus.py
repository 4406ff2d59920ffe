"""The corpus steps of a curation run, and the takedown task: thin operators over the engine's
corpus calls (``winnow.pipeline.run_corpus_pre``, ``run_corpus_check``, ``run_publish`` and
``winnow.corpus.takedown``).

A corpus (the ``corpus_uri`` param) is the one curated dataset that a DAG's runs build over time.
Three tasks of ``image_curation`` touch it (:data:`CORPUS_STEPS`): ``corpus_pre`` after the index
(records a takedown lists or whose bytes the corpus already holds are never decoded),
``corpus_check`` after the run's own dedup (exact and near duplicates against the corpus; the one
step that waits for the previous date to publish) and ``publish`` after ``write`` (the run's kept
records join the corpus in one atomic step; an asset event through the :data:`CORPUS_ALIAS`
alias says so). With ``corpus_uri`` empty each of them succeeds at once doing nothing (a skip
would propagate to ``report``), so a run without a corpus is what it was before.

Where they run: in the task process, without Ray, in every mode (driver, embedded, job). They
are light (storage reads of the run's own match files and of the corpus part its records can
match, one cluster bucket at a time; small numpy arrays), so neither a Ray Job in job mode nor
attaching to the cluster in driver mode would pay for itself. The engine calls get
``Execution(backend="local")``.

Imports nothing of the engine at module level: the DAG file imports this module at parse time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import Asset, AssetAlias, BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from winnow_airflow.base import CurationOperator, engine_errors

if TYPE_CHECKING:
    from airflow.sdk import Context

    from winnow.execution import Execution
    from winnow.pipeline import CurationConfig
    from winnow.rowgroups.fs import StorageOptions

#: The corpus as an Airflow asset alias: its URI (one per corpus) is known only at run time, so
#: ``publish`` and the takedown task name this alias as their outlet and add an event for the
#: corpus's own asset (:func:`corpus_asset`) when they change it.
CORPUS_ALIAS = AssetAlias(name="winnow_corpus", group="winnow")

#: Each corpus task of the curation DAG and the stage task it follows: the DAG file wires them
#: from here (the order is the engine's: ``run_all`` calls them at the same places).
def _last_before(stage: str) -> str:
    """The last stage of the phase before ``stage`` in the registry's run order (before
    ``thresholds``: the last score stage of the partition group)."""
    from winnow.registry import run_phases

    phases = [specs for _, specs in run_phases()]
    (i,) = [i for i, specs in enumerate(phases) if specs[0].name == stage]
    return phases[i - 1][-1].name


CORPUS_STEPS: tuple[tuple[str, str], ...] = (("corpus_pre", "index"), ("corpus_check", _last_before("thresholds")),
                                             ("corpus_near", "dedup"), ("publish", "write"))

#: Seconds between two looks at the corpus head while a date waits for the previous one.
DEFAULT_POLL_S = 10.0
#: Most seconds between two "waiting for run ..." lines in the task log while it waits.
WAIT_LOG_EVERY_S = 60.0

_SCHEMES = ("s3://", "gs://", "gcs://", "file://")


def corpus_uri_of(params: Mapping[str, Any] | None) -> str | None:
    """The run's ``corpus_uri`` param; None when unset (absent, null or blank: today's run)."""
    value = (params or {}).get("corpus_uri")
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def asset_uri(corpus_uri: str) -> str:
    """The corpus as a valid asset URI: ``s3://`` and ``gs://`` as given (no trailing slash), a
    local path as an absolute ``file://`` URI.

    >>> asset_uri("s3://bucket/corpus/"), asset_uri("/data/corpus"), asset_uri("file:///data/corpus/")
    ('s3://bucket/corpus', 'file:///data/corpus', 'file:///data/corpus')
    """
    uri = corpus_uri.strip()
    if uri.startswith(_SCHEMES):
        stripped = uri.rstrip("/")
        return uri if stripped.endswith(":") else stripped
    from pathlib import Path

    return Path(os.path.abspath(os.path.expanduser(uri))).as_uri()


def corpus_asset(corpus_uri: str) -> Asset:
    """The asset of one corpus (what the alias's events land on; the asset appears in Airflow with
    its first event)."""
    uri = asset_uri(corpus_uri)
    return Asset(uri=uri, name=f"winnow_corpus {uri}", group="winnow")


def same_corpus(a: str | None, b: str | None) -> bool:
    """Whether two ``corpus_uri`` values name one corpus (``/data/c/`` and ``file:///data/c`` do).

    >>> same_corpus("s3://b/c/", "s3://b/c"), same_corpus("/data/c", "file:///data/c/"), same_corpus(None, "/c")
    (True, True, False)
    """
    return bool(a and b) and asset_uri(a) == asset_uri(b)


def corpus_published(corpus_uri: str, run_key: str, storage: StorageOptions | None) -> bool:
    """Whether run ``run_key`` has published to the corpus (the corpus head in storage says it)."""
    from winnow.corpus import is_published

    return is_published(corpus_uri, run_key, storage)


@contextmanager
def corpus_errors() -> Iterator[None]:
    """The engine's errors as Airflow's (:func:`~winnow_airflow.base.engine_errors`), and a
    :class:`winnow.corpus.CorpusError` (a damaged corpus, another embedding model, a stale check,
    an unreadable takedown list: the message names the file and the fix) fails at once too: no
    retry of the same task would change it. A corpus whose lease another writer holds is
    ``RunLocked``, which may retry."""
    from winnow.corpus import CorpusError

    with engine_errors():
        try:
            yield
        except CorpusError as exc:
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


# ---- the date order -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PreviousRun:
    """The DAG run before this one (by logical date) that builds the same corpus."""

    run_key: str
    run_id: str
    logical_date: str | None

    def waiting_line(self, corpus_uri: str) -> str:
        """What the task log says while the date waits for it."""
        return (f"waiting for run {self.run_key} (logical date {self.logical_date or 'none'}) to publish to corpus "
                f"{corpus_uri}; this run's corpus check runs after it")


def _declared(dag: Any, name: str) -> Any:
    """The DAG's own default of param ``name`` (None when it has none)."""
    params = getattr(dag, "params", None)
    if params is None:
        return None
    try:
        return params.get_param(name).value
    except Exception:  # noqa: BLE001 - no such param, or a required one without a default
        try:
            return params[name]
        except Exception:  # noqa: BLE001
            return None


def _day(logical_date: Any) -> str | None:
    """``YYYY-MM-DD`` of a logical date (Airflow's ``ds``), as the corpus records it."""
    if logical_date is None:
        return None
    return logical_date.strftime("%Y-%m-%d") if hasattr(logical_date, "strftime") else str(logical_date)[:10]


def previous_run(dag_run: Any, corpus_uri: str, dag: Any = None) -> PreviousRun | None:
    """The run this one waits for: ``dag_run`` (the previous DAG run by logical date, from
    ``ti.get_previous_dagrun()``, any state) when its conf (over the DAG's param defaults) names
    the same corpus; its run key by the DAG's rule (its conf's ``run_key``, else the DAG's
    default, else its logical date as ``YYYYMMDD``, else its run id:
    :func:`winnow.runkey.default_run_key`). None: nothing to wait for."""
    if dag_run is None:
        return None
    from winnow.runkey import default_run_key

    conf = getattr(dag_run, "conf", None) or {}
    theirs = conf["corpus_uri"] if "corpus_uri" in conf else _declared(dag, "corpus_uri")
    if not same_corpus(theirs if isinstance(theirs, str) else None, corpus_uri):
        return None
    logical_date = getattr(dag_run, "logical_date", None)
    run_key = conf.get("run_key") or _declared(dag, "run_key") or default_run_key(logical_date, dag_run.run_id)
    return PreviousRun(run_key=str(run_key), run_id=str(dag_run.run_id), logical_date=_day(logical_date))


def gate(corpus_uri: str, previous: PreviousRun | None, storage: StorageOptions | None, *,
         run_key: str | None = None) -> str | None:
    """The date-order gate of ``corpus_check``: None when this run may check against the corpus
    now (no earlier run of this corpus, or it has published), else the line saying what it waits
    for. One look at the corpus head (the trigger repeats that look until it says published);
    callable on its own."""
    if previous is None or previous.run_key == run_key:
        return None  # a run never waits for itself (a conf that names one run key for every date)
    if corpus_published(corpus_uri, previous.run_key, storage):
        return None
    return previous.waiting_line(corpus_uri)


# ---- the operators ------------------------------------------------------------------------------


class CorpusStepOperator(CurationOperator):
    """Base of the three corpus steps: nothing at all without ``corpus_uri``; else the run's config
    and the engine call :meth:`run_engine`, in this process without Ray (see the module docstring).

    Returns the step's summary (XCom); ``{"corpus": None}`` without a corpus. Takes the
    :class:`~winnow_airflow.base.CurationOperator` params.
    """

    step: ClassVar[str]
    ui_color = "#e8eef8"

    def corpus_uri(self, context: Context) -> str | None:
        """The run's corpus (this task's ``stage_config`` over the run's params), None when unset."""
        return corpus_uri_of({**(context.get("params") or {}), **(self.stage_config or {})})

    def execute(self, context: Context) -> dict[str, Any]:
        if self.corpus_uri(context) is None:
            self.log.info("%s: no corpus_uri: nothing to do", self.step)
            return {"corpus": None}
        cfg = self.curation_config(context)
        return self.run_step_here(context, cfg)

    def run_step_here(self, context: Context, cfg: CurationConfig) -> dict[str, Any]:
        with corpus_errors():
            summary = self.run_engine(context, cfg, execution=self.step_execution(context))
        self.log.info("%s: %s", self.step, summary)
        return summary

    def step_execution(self, context: Context) -> Execution:
        """This process, without Ray, in every mode (see the module docstring)."""
        from winnow.execution import Execution

        return Execution(backend="local")  # no Ray Job: the link stays empty

    def run_engine(self, context: Context, cfg: CurationConfig, *, execution: Execution) -> dict[str, Any]:
        raise NotImplementedError


class CorpusPreOperator(CorpusStepOperator):
    """Before any decode (after the index): marks the records a takedown lists and those whose
    image bytes the corpus already holds, against the corpus as it stands; they are never
    decoded nor embedded. Never waits for another date."""

    step = "corpus_pre"

    def run_engine(self, context: Context, cfg: CurationConfig, *, execution: Execution) -> dict[str, Any]:
        from winnow import pipeline

        return pipeline.run_corpus_pre(cfg, execution=execution, owner=self.lease_owner(context), log=self.log.info)


class CorpusCheckOperator(CorpusStepOperator):
    """The run's records against the corpus once every earlier date published (takedowns and
    image bytes the corpus holds, found again where a date published while this run embedded),
    after the score stages and before ``thresholds``: from here on those records count for
    nothing (keep fractions, the run's own dedup), so the run's result is the one a run after
    that date gives. The one step of a run that waits for the previous date.

    **Date order.** Runs publish in logical-date order, so that a backfill run side by side gives
    the corpus that the dates run one after another give. Only this task (and what follows it)
    waits: the index and the score stages (embed, aesthetic, nsfw, clip_score) of later dates run
    meanwhile. When ``corpus_uri`` is set it
    asks Airflow for the previous DAG run by logical date (``ti.get_previous_dagrun()``, Task SDK,
    any state); when that run names the same corpus and has not published yet (the corpus head in
    storage says so), the task logs what it waits for and defers to
    :class:`~winnow_airflow.triggers.CorpusPublishedTrigger`, which polls the corpus head every
    ``corpus_poll_interval`` seconds (holding no worker slot) and repeats the line at most once a
    minute. A previous run that failed before publishing keeps this date waiting (deferred) until
    it is cleared and publishes; a run without a logical date waits for nothing.

    Why not ``depends_on_past`` / ``wait_for_downstream``: they are static, per task, in the DAG
    file; set on this task they would make every date of every run wait for the previous date's
    success even with no corpus, and would also tie a date to an earlier run of another corpus
    (or none), changing what the DAG does today. The lookup of the previous run is Airflow's
    own (the Task SDK's), the published state is storage's (the corpus head), which is also what
    a rerun or a cleared run reads.

    :param corpus_poll_interval: seconds between looks at the corpus head while waiting.
    :param corpus_wait_timeout: seconds this date may wait before the task fails (None: no limit).
    """

    step = "corpus_check"

    def __init__(self, *, corpus_poll_interval: float = DEFAULT_POLL_S, corpus_wait_timeout: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.corpus_poll_interval = corpus_poll_interval
        self.corpus_wait_timeout = corpus_wait_timeout

    def execute(self, context: Context) -> dict[str, Any]:
        corpus_uri = self.corpus_uri(context)
        if corpus_uri is None:
            self.log.info("%s: no corpus_uri: nothing to do", self.step)
            return {"corpus": None}
        cfg = self.curation_config(context)
        previous = previous_run(context["ti"].get_previous_dagrun(), corpus_uri, context.get("dag"))
        with corpus_errors():
            waiting = gate(corpus_uri, previous, cfg.storage, run_key=cfg.run_key)
        if waiting is not None:
            from winnow_airflow.triggers import CorpusPublishedTrigger

            self.log.info("%s", waiting)
            self.defer(
                trigger=CorpusPublishedTrigger(corpus_uri=corpus_uri, run_key=previous.run_key, waiting=waiting,
                                               poll_interval=self.corpus_poll_interval,
                                               storage_conn_id=self.storage_conn_id(context)),
                method_name="execute_complete",
                timeout=timedelta(seconds=self.corpus_wait_timeout) if self.corpus_wait_timeout else None,
            )
        if previous is not None:
            self.log.info("previous run %s (logical date %s) has published to corpus %s", previous.run_key,
                          previous.logical_date, corpus_uri)
        return self.run_step_here(context, cfg)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """The trigger saw the previous run published: check now."""
        if event.get("status") != "published":
            raise AirflowFailException(f"waiting for corpus {event.get('corpus_uri')}: {event.get('message')}")
        self.log.info("run %s has published to corpus %s (waited %.0f s): checking this run against it",
                      event.get("run_key"), event.get("corpus_uri"), float(event.get("waited_s") or 0))
        return self.run_step_here(context, self.curation_config(context))

    def run_engine(self, context: Context, cfg: CurationConfig, *, execution: Execution) -> dict[str, Any]:
        from winnow import pipeline

        return pipeline.run_corpus_check(cfg, execution=execution, owner=self.lease_owner(context),
                                         log=self.log.info)


class CorpusNearOperator(CorpusStepOperator):
    """Near duplicates of corpus records (within ``dedup_eps``) among the records that passed the
    filters, after the run's own dedup and before ``status``, one corpus cluster bucket in memory
    at a time. No wait of its own: ``corpus_check`` waited, and a later date publishes only after
    this run."""

    step = "corpus_near"

    def run_engine(self, context: Context, cfg: CurationConfig, *, execution: Execution) -> dict[str, Any]:
        from winnow import pipeline

        return pipeline.run_corpus_near(cfg, execution=execution, owner=self.lease_owner(context), log=self.log.info)


class PublishOperator(CorpusStepOperator):
    """Adds the run's kept records to the corpus in one atomic step (after every ``write``
    instance); a rerun of a published run publishes nothing twice. Emits an asset event for the
    corpus through the :data:`CORPUS_ALIAS` outlet, with extra ``run_key``, ``generation``,
    ``records``, ``logical_date`` and ``published`` (False: this run had published already, e.g.
    a cleared run; the event says so again)."""

    step = "publish"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("outlets", [CORPUS_ALIAS])
        super().__init__(**kwargs)

    def run_engine(self, context: Context, cfg: CurationConfig, *, execution: Execution) -> dict[str, Any]:
        from winnow import pipeline

        dag_run = context.get("dag_run")
        logical_date = _day(getattr(dag_run, "logical_date", None) or context.get("logical_date"))
        summary = pipeline.run_publish(cfg, logical_date=logical_date, owner=self.lease_owner(context),
                                       log=self.log.info)
        extra = {"run_key": cfg.run_key, "generation": summary.get("generation"),
                 "records": summary.get("records"), "logical_date": logical_date,
                 "published": bool(summary.get("published"))}
        for outlet in self.outlets:
            if isinstance(outlet, AssetAlias):
                context["outlet_events"][outlet].add(corpus_asset(cfg.corpus_uri), extra=extra)
        return summary


#: The corpus operators of the curation DAG, by task id (:data:`CORPUS_STEPS`).
CORPUS_OPERATORS: dict[str, type[CorpusStepOperator]] = {
    op.step: op for op in (CorpusPreOperator, CorpusCheckOperator, CorpusNearOperator, PublishOperator)
}


# ---- takedowns ----------------------------------------------------------------------------------


class TakedownOperator(BaseOperator):
    """Applies one takedown list to a corpus (``winnow.corpus.takedown``): removes every matching
    record from the corpus's output (only the row groups that hold them are rewritten) and
    manifest, records each identifier with what it removed, logs and returns the summary. Emits
    an asset event for the corpus through :data:`CORPUS_ALIAS` (extra ``takedown``: the
    takedown's id in the corpus, None when there was nothing left to do; ``removed``: how many
    records). Idempotent and resumable: a rerun removes nothing more,
    and finishes what a killed try left.

    Each argument defaults to the DAG run's param of the same name.

    :param corpus_uri: the corpus (local path, ``s3://``, ``gs://``).
    :param list_uri: a text file (one identifier a line) or a Parquet file of identifiers: each a
        32-hex ``uid``, a record ``key`` or a source ``url``.
    :param reason: why (recorded with every identifier); must not be empty.
    :param storage_conn_id: Airflow connection of type ``aws`` for ``s3://``; empty: the AWS_*
        environment variables (:func:`winnow_airflow.storage.run_storage`).
    """

    template_fields = ("corpus_uri", "list_uri", "reason", "storage_conn_id")
    ui_color = "#f8e8e8"

    def __init__(self, *, corpus_uri: str | None = None, list_uri: str | None = None, reason: str | None = None,
                 storage_conn_id: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("outlets", [CORPUS_ALIAS])
        super().__init__(**kwargs)
        self.corpus_uri, self.list_uri, self.reason = corpus_uri, list_uri, reason
        self.storage_conn_id = storage_conn_id

    def _arg(self, context: Context, name: str) -> str | None:
        value = getattr(self, name) or (context.get("params") or {}).get(name)
        return value.strip() if isinstance(value, str) and value.strip() else None

    def execute(self, context: Context) -> dict[str, Any]:
        import winnow.corpus
        from winnow.card import write_corpus_card
        from winnow_airflow.storage import run_storage

        corpus_uri, list_uri, reason = (self._arg(context, n) for n in ("corpus_uri", "list_uri", "reason"))
        missing = [n for n, v in (("corpus_uri", corpus_uri), ("list_uri", list_uri), ("reason", reason)) if not v]
        if missing:
            raise AirflowFailException(f"takedown needs {', '.join(missing)} (params of the run)")
        conn_id = self._arg(context, "storage_conn_id")
        storage = run_storage(conn_id)
        dag_run = context.get("dag_run")
        date = _day(getattr(dag_run, "logical_date", None)) or time.strftime("%Y-%m-%d", time.gmtime())
        self.log.info("takedown of the identifiers in %s from corpus %s (reason: %s)", list_uri, corpus_uri, reason)
        with corpus_errors():
            summary = winnow.corpus.takedown(corpus_uri, list_uri, reason=reason, storage=storage,
                                             owner=f"{context['dag'].dag_id}/{context['run_id']}", date=date,
                                             log=self.log.info)
            # Also when nothing was left to do: a try that committed and died before its card.
            write_corpus_card(corpus_uri, storage)
        self.log.info("takedown summary: %s", summary)
        self._summary = summary  # for the lineage of this try
        # Also when nothing was left to do (``takedown``: None, ``removed``: 0): a retry after a
        # try that committed and died before it succeeded still says the corpus changed.
        extra = {"takedown": summary.get("takedown"), "removed": removed_count(summary)}
        for outlet in self.outlets:
            if isinstance(outlet, AssetAlias):
                context["outlet_events"][outlet].add(corpus_asset(corpus_uri), extra=extra)
        return summary

    # ---- OpenLineage (winnow_airflow.lineage) ----------------------------------------------------
    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """Inputs the list and the corpus, output the corpus, and a ``winnowTakedown`` run facet
        (:func:`winnow_airflow.lineage.takedown_lineage`); None without the provider or on any error."""
        return self._openlineage(task_instance)

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        """The same datasets for a failed try (a rerun finishes what it left); the provider adds the error."""
        return self._openlineage(task_instance)

    def _openlineage(self, task_instance: Any) -> Any:
        from winnow_airflow import lineage

        def build() -> Any:
            context = task_instance.get_template_context()
            corpus_uri, list_uri, reason = (self._arg(context, n) for n in ("corpus_uri", "list_uri", "reason"))
            if not (corpus_uri and list_uri):
                return None
            summary = getattr(self, "_summary", None)  # this try's, once its takedown ran
            return lineage.takedown_lineage(corpus_uri, list_uri, reason or "", takedown=(summary or {}).get("takedown"),
                                            removed=removed_count(summary) if summary else None)

        return lineage.guarded(build, self.task_id, self.log)


def removed_count(summary: Mapping[str, Any]) -> int:
    """How many records a takedown summary says it removed.

    >>> removed_count({"removed": 3}), removed_count({"removed": [{"key": "a"}]}), removed_count({})
    (3, 1, 0)
    """
    removed = summary.get("removed")
    if isinstance(removed, (list, tuple)):
        return len(removed)
    return int(removed or 0)
