"""What running a stage did: one row group's :class:`RowGroupResult`, one call's summary
(:class:`PartitionSummary` over row groups, :class:`UnitSummary` over other units), and the one
view of failures that XCom, the task state store and every error message share.

Pure data: no Ray, no pyarrow, no Airflow (the operators import it at DAG parse time).

>>> s = PartitionSummary(stage="embed", partition=3, row_groups=4, computed=2, failed={13: "OSError: x"})
>>> failure_view(s.failed)
{'failed': [13], 'failed_count': 1, 'first_error': 'OSError: x'}
>>> PartitionSummary.from_dict(s.to_dict(errors=True)) == s
True
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

logger = logging.getLogger(__name__)

#: Failed ids listed in a summary, a progress record or an error message; the rest are counted
#: (``failed_count``) and their errors stay in the failure records beside the commits.
MAX_FAILED_SHOWN = 50
#: An error text is cut to this many characters: enough for a traceback's last line and context.
MAX_ERROR_CHARS = 2000


def error_text(exc: BaseException) -> str:
    """``"<ExceptionType>: <message>"``, cut to :data:`MAX_ERROR_CHARS`: how a unit's error is kept."""
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]


def failure_view(failed: Mapping[int, str]) -> dict[str, Any]:
    """The small view of failed units (row groups, buckets): the first :data:`MAX_FAILED_SHOWN`
    ids, how many failed, and the error of the lowest id."""
    ids = sorted(failed)
    return {"failed": ids[:MAX_FAILED_SHOWN], "failed_count": len(ids),
            "first_error": failed[ids[0]] if ids else None}


def failure_line(failed: Mapping[int, str], *, unit: str = "row group", of: int | None = None) -> str:
    """One sentence for an error message, from :func:`failure_view`: ``"2 of 4 row groups
    failed: [13, 14]; first error (row group 13): OSError: ..."``."""
    view = failure_view(failed)
    count = view["failed_count"]
    more = f" and {count - len(view['failed'])} more" if count > len(view["failed"]) else ""
    total = f" of {of}" if of is not None else ""
    head = f"{count}{total} {unit}{'' if count == 1 and of is None else 's'} failed: {view['failed']}{more}"
    if not count:
        return head
    return f"{head}; first error ({unit} {view['failed'][0]}): {view['first_error']}"


@dataclass(frozen=True, kw_only=True)
class RowGroupResult:
    """What happened to one row group: committed (``records_out`` rows), ``skipped`` (found
    committed by an earlier try) or failed (``error``, see :func:`error_text`)."""

    row_group: int
    error: str = ""
    records_in: int = 0
    records_out: int = 0
    seconds: float = 0.0
    skipped: bool = False
    #: Storage requests a worker process retried (and how many of them were throttled) while
    #: it ran this row group's batch (see :mod:`winnow.rowgroups.retry`); 0 in the caller's
    #: own process, whose requests its caller counts.
    storage_retries: int = 0
    storage_throttled: int = 0

    @property
    def ok(self) -> bool:
        return not self.error

    @classmethod
    def from_error(cls, stage: str, row_group: int, records_in: int, exc: BaseException, seconds: float) -> RowGroupResult:
        """A row group (of ``records_in`` records) that raised: logged with its traceback,
        reported with its error (it fails alone)."""
        text = error_text(exc)
        logger.warning("stage %s row group %d failed: %s\n%s", stage, row_group, text,
                       "".join(traceback.format_exception(exc, limit=5)))
        return cls(row_group=row_group, error=text, records_in=records_in, seconds=seconds)

    @staticmethod
    def to_columns(results: Iterable[RowGroupResult]) -> dict[str, list[Any]]:
        """Results as the column batch a Ray Data ``map_batches`` function returns."""
        rows = [asdict(r) for r in results]
        return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RowGroupResult:
        """One row of that batch (Ray Data hands back numpy scalars) as a result."""
        return cls(row_group=int(row["row_group"]), error=str(row["error"] or ""),
                   records_in=int(row["records_in"]), records_out=int(row["records_out"]),
                   seconds=float(row["seconds"]), skipped=bool(row["skipped"]),
                   storage_retries=int(row.get("storage_retries", 0)),
                   storage_throttled=int(row.get("storage_throttled", 0)))


@dataclass(kw_only=True)
class StageSummary:
    """What one call ran of a stage: units computed, skipped (committed before) and failed
    (id -> error). Small enough for XCom as :meth:`to_dict`, where ``failed`` becomes
    :func:`failure_view`'s fields."""

    #: Fields kept out of :meth:`to_dict` (per-unit detail too big for XCom).
    NOT_IN_DICT: ClassVar[frozenset[str]] = frozenset()

    stage: str
    computed: int = 0
    skipped: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    #: Storage requests retried / throttled by the processes that did this call's work.
    storage_retries: int = 0
    storage_throttled: int = 0

    def add_storage(self, counts: Mapping[str, Any]) -> None:
        """Count in storage retries (a result's, a worker's or a process's :func:`counts_since`)."""
        self.storage_retries += int(counts.get("storage_retries", 0) or 0)
        self.storage_throttled += int(counts.get("storage_throttled", 0) or 0)

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self, *, errors: bool = False) -> dict[str, Any]:
        """The summary as JSON-able data; ``errors=True`` adds every failed unit's error
        (``{"<id>": text}``, what a Ray Job leaves in storage) beside the capped view."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.NOT_IN_DICT}
        d.update(failure_view(self.failed), seconds=round(self.seconds, 3))
        if errors:
            d["errors"] = {str(u): msg for u, msg in sorted(self.failed.items())}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StageSummary:
        """The summary back from :meth:`to_dict`'s output (unknown keys are ignored). Failures
        come from ``errors`` when present, else from the listed ids (each with the first error:
        the view keeps no other text)."""
        names = {f.name for f in fields(cls)} - {"failed"} - cls.NOT_IN_DICT
        if d.get("errors"):
            failed = {int(u): str(msg) for u, msg in d["errors"].items()}
        else:
            failed = {int(u): str(d.get("first_error") or "failed") for u in d.get("failed") or ()}
        return cls(**{k: v for k, v in d.items() if k in names}, failed=failed)

    def failure_line(self) -> str:
        """This summary's failures as one sentence (see :func:`failure_line`)."""
        return failure_line(self.failed)


@dataclass(kw_only=True)
class PartitionSummary(StageSummary):
    """What one partition's run of one stage did (:func:`winnow.ray.runner.run_stage_partition`)."""

    partition: int
    row_groups: int = 0
    records_in: int = 0
    records_out: int = 0

    def add(self, result: RowGroupResult) -> None:
        """Count one row group's result in."""
        self.add_storage(asdict(result))
        if result.error:
            self.failed[result.row_group] = result.error
        elif result.skipped:
            self.skipped += 1  # committed by an earlier try of the same Ray task
        else:
            self.computed += 1
            self.records_in += result.records_in
            self.records_out += result.records_out

    def failure_line(self) -> str:
        return f"stage {self.stage!r} partition {self.partition}: " + failure_line(self.failed, of=self.row_groups)


@dataclass(kw_only=True)
class UnitSummary(StageSummary):
    """What one call of :func:`winnow.ray.units.run_units` did over its units (dedup buckets,
    index shard groups)."""

    NOT_IN_DICT: ClassVar[frozenset[str]] = frozenset({"results"})

    units: int = 0
    #: Highest peak RSS (MiB) any worker process reported after one of its units.
    worker_peak_rss_mb: float = 0.0
    #: Each unit's own result dict (not in :meth:`to_dict`).
    results: list[dict[str, Any]] = field(default_factory=list)

    def failure_line(self, unit: str = "unit") -> str:
        return f"stage {self.stage!r}: " + failure_line(self.failed, unit=unit, of=self.units)
