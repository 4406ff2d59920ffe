"""Row-group failure records: ``<stage>/p<partition>/rg<id>.failed.json`` beside the commits.

A failed row group leaves no output, so without a record the only trace of its error would be a
task log. The runner writes one small JSON per failed row group; a later commit of the same row
group wins over it (readers check the ``.parquet`` first), so nothing has to delete it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from winnow.results import MAX_ERROR_CHARS
from winnow.rowgroups.store import CommitStore, write_atomic

FAILED_SUFFIX = ".failed.json"


def record_failure(store: CommitStore, stage: str, partition: int, row_group: int, error: str) -> None:
    """Write (or replace) the failure record of one row group; never raises into the caller's
    error path: losing a record only loses the hover text in the UI, not the failure itself."""
    payload = {
        "stage": stage,
        "partition": partition,
        "row_group": row_group,
        "error": str(error)[:MAX_ERROR_CHARS],
        "failed_at": datetime.now(UTC).isoformat(),
    }
    try:
        write_atomic(store.fs, store.row_group_path(stage, partition, row_group, FAILED_SUFFIX),
                     json.dumps(payload).encode("utf-8"))
    except Exception:  # noqa: BLE001 - see docstring
        pass


def read_failure(store: CommitStore, stage: str, partition: int, row_group: int) -> dict | None:
    try:
        with store.fs.open_input_stream(store.row_group_path(stage, partition, row_group, FAILED_SUFFIX)) as f:
            return json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, ValueError):
        return None
