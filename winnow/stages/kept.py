"""The one outcome rule: what happens to each indexed record, first match wins.

``exact_duplicate`` (its image bytes equal an earlier record's: never decoded), ``undecodable``
(the embed stage's error), ``aesthetic`` (score below the threshold), ``nsfw`` (probability at
or above it), ``no_caption`` and ``clip_score`` (only while the CLIP-score filter is on), then
``duplicate`` (a near duplicate of a kept record, from dedup) or ``kept``. The thresholds are
the ones the ``thresholds`` step committed for the run (:mod:`winnow.stages.thresholds`).

Dedup's candidates are the records that pass the filters (:func:`row_group_filters`); the
``status`` stage writes every record's outcome (:func:`outcomes`); write and the counts read
``status``. Nothing else decides.

>>> import numpy as np
>>> t = {"aesthetic": {"threshold": 5.0, "keep": ">="}, "nsfw": {"threshold": 0.5, "keep": "<"},
...      "clip_score": {"threshold": 0.2, "keep": ">=", "enabled": True}}
>>> filter_outcomes(t, exact_duplicate=np.array([False, True, False, False, False, False]),
...                 decoded=np.array([True, False, False, True, True, True]),
...                 aesthetic=np.array([6, np.nan, np.nan, 4, 6, 6], np.float32),
...                 nsfw=np.array([0.1, np.nan, np.nan, 0.1, 0.1, 0.1], np.float32),
...                 has_caption=np.array([True, True, True, True, False, True]),
...                 clip=np.array([0.3, np.nan, np.nan, 0.3, np.nan, 0.1], np.float32)).tolist()
['', 'exact_duplicate', 'undecodable', 'aesthetic', 'no_caption', 'clip_score']
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from winnow.exceptions import StorageError
from winnow.rowgroups import CommitStore
from winnow.stages.thresholds import RULES, as_scores, load_thresholds

#: Columns of one row group's filter inputs, as :func:`read_filter_inputs` returns them.
FilterInputs = dict[str, np.ndarray]


def filter_outcomes(thresholds: dict[str, Any], *, exact_duplicate: np.ndarray, decoded: np.ndarray,
                    aesthetic: np.ndarray, nsfw: np.ndarray, has_caption: np.ndarray, clip: np.ndarray) -> np.ndarray:
    """Each record's outcome before dedup: ``""`` when it passes every filter, else the first
    filter that drops it (an object array of str)."""
    out = np.full(len(decoded), "", dtype=object)

    def mark(mask: np.ndarray, outcome: str) -> None:
        out[(out == "") & mask] = outcome

    mark(exact_duplicate, "exact_duplicate")
    mark(~decoded, "undecodable")
    for name, scores in (("aesthetic", aesthetic), ("nsfw", nsfw)):
        mark(~RULES[name].passes(scores, thresholds[name]["threshold"]), name)
    clip_rule = thresholds["clip_score"]
    if clip_rule.get("enabled", True):
        mark(~has_caption, "no_caption")
        mark(~RULES["clip_score"].passes(clip, clip_rule["threshold"]), "clip_score")
    return out


def _aligned_column(table: pa.Table, column: str, ids: np.ndarray, stage: str, rg: int) -> pa.ChunkedArray:
    if not np.array_equal(table.column("record_id").to_numpy(), ids):
        raise StorageError(
            f"row group {rg}: stage {stage!r} holds other records than the index; it was computed from "
            f"another index. Recompute stage {stage!r} with overwrite=true."
        )
    return table.column(column)


def read_filter_inputs(store: CommitStore, p: int, rg: int) -> FilterInputs:
    """One row group's filter inputs in record order: record_id, exact_duplicate, decoded,
    the three scores (NaN: none), has_caption, and the decode error (None: decoded or never
    decoded) and twin of each exact duplicate."""
    index = store.read_table("index", p, rg, columns=["record_id", "exact_duplicate_of"])
    ids = index.column("record_id").to_numpy()
    twin = index.column("exact_duplicate_of")
    embed = store.read_table("embed", p, rg, columns=["record_id", "error"])
    error = _aligned_column(embed, "error", ids, "embed", rg)
    exact = twin.is_valid().to_numpy(zero_copy_only=False)
    scores = {}
    for name in ("aesthetic", "nsfw"):
        column = RULES[name].column
        scores[name] = as_scores(_aligned_column(store.read_table(name, p, rg, columns=["record_id", column]),
                                                 column, ids, name, rg))
    clip = store.read_table("clip_score", p, rg, columns=["record_id", "clip_score", "has_caption"])  # one read
    scores["clip_score"] = as_scores(_aligned_column(clip, "clip_score", ids, "clip_score", rg))
    has_caption = clip.column("has_caption").fill_null(False).to_numpy(zero_copy_only=False)
    return {
        "record_id": ids,
        "exact_duplicate": exact,
        "exact_duplicate_of": twin.to_numpy(zero_copy_only=False),
        "decoded": error.is_null().to_numpy(zero_copy_only=False) & ~exact,
        "error": np.array(error.to_pylist(), dtype=object),
        "aesthetic": scores["aesthetic"],
        "nsfw": scores["nsfw"],
        "clip": scores["clip_score"],
        "has_caption": np.asarray(has_caption, dtype=bool),
    }


def row_group_filters(store: CommitStore, p: int, rg: int) -> tuple[FilterInputs, np.ndarray]:
    """A row group's filter inputs and each record's outcome before dedup (``""``: passed)."""
    x = read_filter_inputs(store, p, rg)
    out = filter_outcomes(load_thresholds(store), exact_duplicate=x["exact_duplicate"], decoded=x["decoded"],
                          aesthetic=x["aesthetic"], nsfw=x["nsfw"], has_caption=x["has_caption"], clip=x["clip"])
    return x, out


def passed_filters(store: CommitStore, p: int, rg: int) -> tuple[np.ndarray, np.ndarray]:
    """``(record_ids, passed)``: the records of a row group that go on to dedup."""
    x, out = row_group_filters(store, p, rg)
    return x["record_id"], out == ""
