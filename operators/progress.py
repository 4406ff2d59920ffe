"""A partition's progress in Airflow's task state store, scoped by the stage fingerprint.

``RowGroupStageOperator`` saves it when a try starts and when it ends (row groups committed, the
failed ones and their first error); the next try of the same map index reads it back, compares it
with storage and logs what it resumes. Storage is the source of truth: the record is never used to
skip work, and the Curation view reads storage and the task states, not this record. Job mode keeps
its Ray job ids in a record of its own (``winnow_airflow.jobs.RayJobRunner``). A cleared task keeps
its store (Airflow 3.3.2), so a record made under another stage fingerprint is ignored.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any


class PartitionProgress:
    """Read, reconcile and save one stage's progress for one mapped task instance.

    :param state_store: ``context["task_state_store"]`` (``None`` outside a task: no-op).
    :param stage: the stage's name, its folder under the run root (``embed``, ``write`` ...).
    :param fingerprint: the digest in the stage's ``_stage.json``; the record's scope.
    :param log: where reconciliation notes go.
    """

    def __init__(self, state_store: Any, stage: str, fingerprint: str, log: logging.Logger) -> None:
        self.state_store = state_store
        self.key = f"winnow.progress.{stage}"
        self.fingerprint = fingerprint
        self.log = log

    def previous(self) -> dict[str, Any] | None:
        """The last try's record, or ``None`` when absent or made under another fingerprint."""
        if self.state_store is None:
            return None
        record = self.state_store.get(self.key)
        if not isinstance(record, dict):
            return None
        if record.get("fingerprint") != self.fingerprint:
            self.log.info(
                "ignoring task state %s: it was recorded for stage fingerprint %s, now %s",
                self.key, record.get("fingerprint"), self.fingerprint,
            )
            return None
        return record

    def reconcile(self, committed: int, row_groups: int, *, try_number: int | None = None) -> dict[str, Any] | None:
        """Compare the last record with what storage holds now; storage wins."""
        record = self.previous()
        if record is None:
            self.log.info("storage: %d of %d row groups committed", committed, row_groups)
        elif record.get("committed", 0) > committed:
            self.log.warning(
                "task state says %s row groups were committed, storage has %d (removed or moved "
                "aside since): storage wins, the missing ones are computed again",
                record.get("committed"), committed,
            )
        else:
            self.log.info(
                "resuming: last try (try %s) recorded %s committed and failed row groups %s; "
                "storage has %d of %d committed",
                record.get("try_number"), record.get("committed"), record.get("failed"),
                committed, row_groups,
            )
        self.save(committed=committed, row_groups=row_groups, state="running", try_number=try_number)
        return record

    def save(self, *, committed: int, row_groups: int, state: str, failed: dict[int, str] | None = None,
             try_number: int | None = None) -> None:
        if self.state_store is None:
            return
        from winnow.results import failure_view  # here: the DAG file parses without the engine

        value: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "state": state,
            "row_groups": row_groups,
            "committed": committed,
            **failure_view(failed or {}),  # failed (the first ids), failed_count, first_error
            "updated_at": datetime.now(UTC).isoformat(),
        }
        if try_number is not None:
            value["try_number"] = try_number
        self.state_store.set(self.key, value)
