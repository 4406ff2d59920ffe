"""What a run's corpus checks committed (:mod:`winnow.stages.corpus`), as the outcome rule
(:mod:`winnow.stages.kept`), embed and status read it: the files, their layout, the reasons.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from winnow.rowgroups import CommitStore
from winnow.rowgroups.store import read_json

PRE, PRE_DONE = "corpus/pre.parquet", "corpus/_pre.json"
CHECKED, CHECKED_DONE = "corpus/checked.parquet", "corpus/_checked.json"
NEAR, NEAR_DONE = "corpus/near.parquet", "corpus/_near.json"
_FILES = {"pre": (PRE, PRE_DONE), "checked": (CHECKED, CHECKED_DONE), "near": (NEAR, NEAR_DONE)}
_STEPS = {"pre": "corpus pre-check (task 'corpus_pre')", "checked": "corpus check (task 'corpus_check')",
          "near": "corpus near-duplicate check (task 'corpus_near')"}

#: One row per matched record: ``match`` is ``takedown`` (``duplicate_of_*`` null; ``identifier``
#: says what listed it), ``bytes`` (same uid as the corpus record) or ``near`` (``similarity``).
MATCHES = pa.schema([
    ("record_id", pa.int64()),
    ("outcome", pa.string()),  # "takedown" | "corpus_duplicate"
    ("match", pa.string()),  # "takedown" | "bytes" | "near"
    ("identifier", pa.string()),  # the takedown identifier that listed it
    ("duplicate_of_run", pa.string()),
    ("duplicate_of_key", pa.string()),
    ("duplicate_of_uid", pa.string()),
    ("similarity", pa.float32()),
    ("step", pa.string()),  # the step that found it: "pre" (never decoded), "check" or "near"
])

#: The status rows of a run with a corpus carry these besides :data:`winnow.schemas.STATUS`.
STATUS_FIELDS = (("duplicate_of_run", pa.string()), ("duplicate_of_uid", pa.string()))

_HAS: dict[str, bool] = {}


def has_corpus(store: CommitStore) -> bool:
    """Whether the run was made with a corpus (its ``pre`` check is committed); one request per
    run root and process."""
    path = store.path(PRE_DONE)
    if path not in _HAS:
        _HAS[path] = read_json(store.fs, path) is not None
    return _HAS[path]


def matches(store: CommitStore, which: str, lo: int, hi: int) -> pa.Table:
    """The match rows of ``which`` (``"pre"``, ``"checked"`` or ``"near"``) for record ids in
    ``[lo, hi)`` (row-group statistics skip the rest of the file)."""
    path = store.path(_FILES[which][0])
    try:
        with store.fs.open_input_file(path) as f:
            table = pq.read_table(f, filters=[("record_id", ">=", lo), ("record_id", "<", hi)])
    except FileNotFoundError:
        from winnow.exceptions import StorageError

        raise StorageError(f"{path} is missing: the run has a corpus, so its {_STEPS[which]} must run first") from None
    return table.cast(MATCHES) if table.num_rows else MATCHES.empty_table()


_CHECKED: set[str] = set()


def checked(store: CommitStore) -> bool:
    """Whether the run's corpus check is committed (cached once true: it is never undone)."""
    path = store.path(CHECKED_DONE)
    if path not in _CHECKED and read_json(store.fs, path) is not None:
        _CHECKED.add(path)
    return path in _CHECKED


def pre_outcomes(store: CommitStore, record_ids: np.ndarray, *, which: str | None = None) -> np.ndarray | None:
    """Each record's outcome from the corpus's takedowns and known bytes (``""``: none), or None
    for a run without a corpus: the corpus check's once it is committed (every earlier date
    published by then: what a run one date after another has from its pre-check), before that
    the pre-check's. ``which``: that file only (embed skips what the pre-check found)."""
    if not has_corpus(store) or len(record_ids) == 0:
        return None
    which = which or ("checked" if checked(store) else "pre")
    rows = matches(store, which, int(record_ids.min()), int(record_ids.max()) + 1)
    out = np.full(len(record_ids), "", dtype=object)
    if rows.num_rows:
        where = {int(r): i for i, r in enumerate(record_ids.tolist())}
        for rid, outcome in zip(rows.column("record_id").to_pylist(), rows.column("outcome").to_pylist()):
            if rid in where:
                out[where[rid]] = outcome
    return out


def reason(row: dict[str, Any]) -> str:
    """A corpus match in words, for its status row."""
    unread = "; not decoded" if row.get("step") == "pre" else ""
    if row["match"] == "takedown":
        return f"listed by a takedown ({row['identifier']}){unread}"
    if row["match"] == "bytes":
        return (f"same image bytes as corpus record {row['duplicate_of_key']!r} of run {row['duplicate_of_run']!r}"
                f"{unread}")
    return (f"near duplicate (cosine {row['similarity']:.6f}) of corpus record {row['duplicate_of_key']!r} "
            f"of run {row['duplicate_of_run']!r}")
