"""The trigger a job-mode task defers to: polls its Ray Job and streams the job's log into the task log.

Async end to end (aiohttp, a timeout on every call; storage writes in a thread), no default
timeout (the operator's ``job_timeout`` sets one), and it carries only plain values: the token
is read from the connection inside the triggerer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from winnow_airflow.exceptions import RayAuthError, RayJobsApiError
from winnow_airflow.hooks import ENDED_STATES, HTTP_TIMEOUT_S, RayHook

#: Prefix of every job log line in the task log (tests and readers find them by it).
LOG_PREFIX = "[ray job] "
#: Seconds to the next status poll once the job's log shows its last line.
FINISHING_POLL_S = 0.5
#: A young job is looked at sooner than ``poll_interval``: the first look this many seconds after
#: the trigger's first, each later wait :data:`POLL_GROWTH` times the previous, up to
#: ``poll_interval``. A job of seconds (a small partition) is seen ending within about half its
#: age instead of up to a whole interval late; a long job costs ~6 more looks in all.
FIRST_POLL_S = 0.5
POLL_GROWTH = 1.5
#: Most seconds between tries while the Jobs API is unreachable (the cluster restarting).
MAX_BACKOFF_S = 60.0


class RayJobTrigger(BaseTrigger):
    """Wait for one Ray Job to end, copying its new log lines into the task log as they come.

    Log lines are counted: ``log_offset`` lines were shown before this trigger started. When
    ``checkpoint_uri`` is given the count is saved there (in the run root's storage) around
    every batch of lines, so a restarted triggerer (this or another host) goes on from the last
    line shown; a batch that may have been half shown when the triggerer died is shown again
    under a ``replaying`` marker, never silently twice.

    :param conn_id: the ``ray`` connection (job mode); its password is the cluster's token.
    :param submission_id: the job's submission id.
    :param poll_interval: most seconds between status polls (the first few come sooner:
        :data:`FIRST_POLL_S`, growing by :data:`POLL_GROWTH`).
    :param log_offset: job log lines already in this task try's log.
    :param checkpoint_uri: where the shown-lines count is kept (``None``: not kept).
    :param cancel_on_kill: stop the job when a person marks or clears the deferred task.
    :param storage_conn_id: the run's storage connection; its settings are read inside the
        triggerer for the checkpoint's reads and writes (never carried in these kwargs).
    """

    def __init__(self, *, conn_id: str, submission_id: str, poll_interval: float = 5.0, log_offset: int = 0,
                 checkpoint_uri: str | None = None, cancel_on_kill: bool = False,
                 storage_conn_id: str | None = None) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.submission_id = submission_id
        self.poll_interval = float(poll_interval)
        self.log_offset = int(log_offset)
        self.checkpoint_uri = checkpoint_uri
        self.cancel_on_kill = bool(cancel_on_kill)
        self.storage_conn_id = storage_conn_id or None
        self._storage = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("winnow_airflow.triggers.RayJobTrigger", {
            "conn_id": self.conn_id, "submission_id": self.submission_id,
            "poll_interval": self.poll_interval, "log_offset": self.log_offset,
            "checkpoint_uri": self.checkpoint_uri, "cancel_on_kill": self.cancel_on_kill,
            "storage_conn_id": self.storage_conn_id,
        })

    def _session(self):
        import aiohttp

        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S))

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import aiohttp

        hook = RayHook(self.conn_id)
        if self.checkpoint_uri:
            from winnow_airflow.storage import arun_storage

            try:  # this trigger's run only: the triggerer serves many runs, each with its own value
                self._storage = await arun_storage(self.storage_conn_id)
            except Exception as exc:  # noqa: BLE001 - the checkpoint is a nicety; the job goes on
                self.log.warning("log checkpoints off: %s", exc)
                self.checkpoint_uri = None
        shown = await self._resume_offset()
        delay = self.poll_interval  # the backoff while the Jobs API is unreachable
        wait = min(FIRST_POLL_S, self.poll_interval)  # between looks at a job that runs
        async with self._session() as session:
            while True:
                try:
                    job = await hook.aget_job(session, self.submission_id)
                    if job is None:
                        yield self._event("LOST", shown, f"Ray has no job {self.submission_id} (cluster "
                                          "restarted or job deleted)")
                        return
                    ended = job.get("status") in ENDED_STATES
                    # The log read after an ended status holds every line the job wrote.
                    logs = await hook.aget_job_logs(session, self.submission_id)
                except (RayAuthError, ValueError) as exc:
                    yield self._event("ERROR", shown, str(exc))
                    return
                except (TimeoutError, aiohttp.ClientError, RayJobsApiError) as exc:
                    # No give-up time of our own: a cluster restart is survivable, and a
                    # timeout, when wanted, is the deferral's (job_timeout).
                    self.log.warning("Ray Jobs API unreachable for job %s (%s); retrying in %.0f s",
                                     self.submission_id, exc or type(exc).__name__, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_BACKOFF_S)
                    continue
                delay = self.poll_interval
                shown = await self._show(logs, shown, final=ended)
                if ended:
                    yield self._event(job["status"], shown, job.get("message") or "")
                    return
                # The job printed its last line (summary or error): it ends within moments, so
                # the next look comes soon instead of a whole poll interval later.
                await asyncio.sleep(min(wait, FINISHING_POLL_S) if _finishing(logs) else wait)
                wait = min(wait * POLL_GROWTH, self.poll_interval)

    def _event(self, status: str, shown: int, message: str) -> TriggerEvent:
        return TriggerEvent({"status": status, "submission_id": self.submission_id,
                             "message": message[-4000:], "log_offset": shown})

    async def _show(self, logs: str, shown: int, *, final: bool) -> int:
        lines = logs.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        elif not final:
            lines.pop()  # a line still being written: shown once it ends
        new = lines[shown:]
        if not new:
            return shown
        await self._checkpoint(shown, shown + len(new))
        for line in new:
            self.log.info("%s%s", LOG_PREFIX, line)
        await self._checkpoint(shown + len(new), shown + len(new))
        return shown + len(new)

    async def _resume_offset(self) -> int:
        saved = await asyncio.to_thread(_read_checkpoint, self.checkpoint_uri, self._storage) if self.checkpoint_uri else None
        if not saved or int(saved.get("shown", 0)) < self.log_offset:
            return self.log_offset
        shown, through = int(saved["shown"]), int(saved.get("through", saved["shown"]))
        if through > shown:
            self.log.info("%sreplaying job log lines %d-%d: a previous triggerer stopped while showing "
                          "them, so they may appear twice", LOG_PREFIX, shown + 1, through)
        else:
            self.log.info("resuming job %s's log after line %d (shown by a previous triggerer)",
                          self.submission_id, shown)
        return shown

    async def _checkpoint(self, shown: int, through: int) -> None:
        if self.checkpoint_uri:
            await asyncio.to_thread(_write_checkpoint, self.checkpoint_uri, {"shown": shown, "through": through},
                                    self._storage)

    async def on_kill(self) -> None:
        """A person marked or cleared the deferred task: stop the job only when asked to."""
        if not self.cancel_on_kill:
            self.log.info("keeping Ray job %s running (cancel_on_kill is off): the next try reattaches",
                          self.submission_id)
            return
        hook = RayHook(self.conn_id)
        async with self._session() as session:
            await hook.astop_job(session, self.submission_id)
        self.log.info("asked Ray to stop job %s (cancel_on_kill)", self.submission_id)


def _finishing(logs: str) -> bool:
    from winnow.job import ERROR_MARKER, SUMMARY_MARKER

    tail = logs[-20000:]
    return SUMMARY_MARKER in tail or ERROR_MARKER in tail


def _read_checkpoint(uri: str, storage) -> dict[str, Any] | None:
    from winnow.rowgroups.store import read_json, resolve_filesystem

    fs, path = resolve_filesystem(uri, storage)
    try:
        return read_json(fs, path)
    except (OSError, ValueError):
        return None


def _write_checkpoint(uri: str, value: dict[str, Any], storage) -> None:
    from winnow.rowgroups.store import resolve_filesystem, write_atomic

    fs, path = resolve_filesystem(uri, storage)
    write_atomic(fs, path, json.dumps(value).encode())


class CorpusPublishedTrigger(BaseTrigger):
    """Wait until run ``run_key`` has published to the corpus ``corpus_uri`` (the date-order gate of
    the curation DAG's ``corpus_check``: see :class:`winnow_airflow.corpus.CorpusCheckOperator`).

    Looks at the corpus head every ``poll_interval`` seconds, in a thread (a storage read), through
    the run's storage settings, read inside the triggerer from ``storage_conn_id`` (never carried in
    these kwargs). Writes ``waiting`` (what the task waits for) to the task log at most once every
    ``log_every`` seconds. A storage error is logged and the next poll tries again: the previous
    date may take hours, and an unreachable store is no reason to fail this one; a damaged corpus
    head (``CorpusError``) ends the wait with an error event. No timeout of its own (the
    operator's ``corpus_wait_timeout`` is the deferral's).

    :param corpus_uri: the corpus (local path, ``s3://``, ``gs://``).
    :param run_key: the run this date waits for.
    :param waiting: the line the task log shows while it waits.
    :param poll_interval: seconds between looks at the corpus head.
    :param log_every: most seconds between two ``waiting`` lines.
    :param storage_conn_id: the run's storage connection (``aws``), or None for the AWS_* environment.
    """

    def __init__(self, *, corpus_uri: str, run_key: str, waiting: str, poll_interval: float = 10.0,
                 log_every: float = 60.0, storage_conn_id: str | None = None) -> None:
        super().__init__()
        self.corpus_uri = corpus_uri
        self.run_key = run_key
        self.waiting = waiting
        self.poll_interval = float(poll_interval)
        self.log_every = float(log_every)
        self.storage_conn_id = storage_conn_id or None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("winnow_airflow.triggers.CorpusPublishedTrigger", {
            "corpus_uri": self.corpus_uri, "run_key": self.run_key, "waiting": self.waiting,
            "poll_interval": self.poll_interval, "log_every": self.log_every,
            "storage_conn_id": self.storage_conn_id,
        })

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import time

        from winnow.corpus import CorpusError
        from winnow.corpus import is_published as corpus_published
        from winnow_airflow.storage import arun_storage

        t0 = time.monotonic()
        try:
            storage = await arun_storage(self.storage_conn_id)
        except Exception as exc:  # noqa: BLE001 - a missing connection: no poll can succeed
            yield TriggerEvent({"status": "error", "corpus_uri": self.corpus_uri, "run_key": self.run_key,
                                "message": str(exc)})
            return
        logged_at = t0  # the task logged the line as it deferred
        while True:
            try:
                done = await asyncio.to_thread(corpus_published, self.corpus_uri, self.run_key, storage)
            except CorpusError as exc:  # a damaged head: no later look changes it
                yield TriggerEvent({"status": "error", "corpus_uri": self.corpus_uri, "run_key": self.run_key,
                                    "message": f"{type(exc).__name__}: {exc}"})
                return
            except Exception as exc:  # noqa: BLE001 - storage unreachable for now: look again later
                self.log.warning("could not read corpus %s (%s); looking again in %.0f s", self.corpus_uri,
                                 exc or type(exc).__name__, self.poll_interval)
                done = False
            if done:
                yield TriggerEvent({"status": "published", "corpus_uri": self.corpus_uri, "run_key": self.run_key,
                                    "waited_s": round(time.monotonic() - t0, 1)})
                return
            now = time.monotonic()
            if now - logged_at >= self.log_every:
                self.log.info("%s", self.waiting)
                logged_at = now
            await asyncio.sleep(self.poll_interval)
