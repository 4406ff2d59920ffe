"""The gallery sample of a run: kept and dropped records with scores and the reason, paged.

Reads the ``rg<id>.gallery`` (Parquet) files the write stage committed (see
winnow.stages.thumbnails) in row-group order; a page is a cursor (the next row group to read)
plus a bounded number of files read per call, so a page of a run with 10^5 row groups costs
the same as one of ten. Thumbnail bytes are read by offset from the committed ``rg<id>.thumbs``.
Every page says how many row groups the write stage has committed: the gallery of a run whose
write stage has not committed (all) yet says so, and fills as write commits.

The gallery of a run with a corpus has the corpus columns too
(:data:`winnow.stages.write.CORPUS_GALLERY_FIELDS`): a ``corpus_duplicate`` names the corpus
record it duplicates (``duplicate_of_run``, ``duplicate_of_key``, ``duplicate_of_uid``) and its
``original_thumb_*`` is that record's picture; a ``takedown`` has no thumbnail and the takedown's
``takedown_reason`` and ``takedown_date``. Items of other runs have them as None.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from winnow.exceptions import GalleryError, WinnowError
from winnow.filters import FILTERS, VALUE_COLUMNS
from winnow.rowgroups import CommitStore, RowGroupPlan, RunRoot
from winnow.stages.thumbnails import GALLERY_SUFFIX, OUTCOMES, THUMBS_SUFFIX
from winnow.stages.write import CORPUS_GALLERY_FIELDS

#: Most gallery files one page request opens (a rare reason may need many pages).
MAX_FILES_PER_PAGE = 64
#: No thumbnail is larger than this; a bigger request is refused.
MAX_THUMB_BYTES = 2_000_000


def filters(store: CommitStore) -> dict[str, Any] | None:
    """The run's committed thresholds step (``{filter: {"threshold", "keep", "keep_fraction",
    "source", ...}}``, see :func:`winnow.stages.thresholds.load_thresholds`); None while the run
    has not reached it (or it was made for another configuration)."""
    from winnow.stages.thresholds import load_thresholds

    try:
        return load_thresholds(store)
    except (WinnowError, OSError, ValueError, KeyError, TypeError):
        return None


def thresholds(store: CommitStore, entries: dict[str, Any] | None = None) -> dict[str, float | None]:
    """The threshold each filter actually uses (the absolute one, or the one its keep fraction
    picked), from the thresholds step; None values before the run has reached it."""
    entries = filters(store) if entries is None else entries
    out: dict[str, float | None] = {}
    for spec in FILTERS:
        value = ((entries or {}).get(spec.name) or {}).get("threshold")
        out[spec.name] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return out


def enabled(entries: dict[str, Any] | None) -> dict[str, bool | None]:
    """Whether each filter drops records in this run (None: not known yet)."""
    if entries is None:
        return {spec.name: None for spec in FILTERS}
    # A filter the run's thresholds do not list came after the run: it was off.
    return {spec.name: bool(entries[spec.name].get("enabled", True)) if spec.name in entries else False
            for spec in FILTERS}


def reason(row: dict[str, Any], limits: dict[str, float | None]) -> str:
    """Why a record was dropped (or "kept"): the reason the status stage recorded (the gallery's
    ``error`` column), else one in the words of the run's thresholds (galleries written before
    the status stage)."""
    outcome = row["outcome"]
    if outcome == "kept":
        return "kept"
    stored = row.get("error")
    if outcome == "undecodable":
        error = stored or "no reason recorded"
        return error if error.startswith("undecodable") else f"undecodable: {error}"
    if stored:
        return stored
    twin = row.get("duplicate_of_key") or row.get("duplicate_of")
    if outcome == "exact_duplicate":
        return f"same image bytes as {twin}; not decoded"
    if outcome == "duplicate":
        return f"near duplicate of {twin}"
    if outcome == "corpus_duplicate":
        run = row.get("duplicate_of_run")
        return "already in the corpus" + (f": record {twin}" if twin else "") + (f" of run {run}" if run else "")
    if outcome == "takedown":
        return "listed by a takedown; not decoded"
    for spec in FILTERS:
        if spec.missing is not None and spec.missing.outcome == outcome:
            return spec.missing.reason
        if spec.outcome == outcome:
            columns = {c: np.array([np.nan if row.get(c) is None else row[c]], np.float64) for c in spec.column_names}
            value = float(spec.values_of(columns)[0])
            shown = "none" if np.isnan(value) else f"{value:.3f}"
            return f"{spec.label} {shown}: dropped at threshold {limits.get(spec.name)}"
    return outcome


def _write_stage() -> str:
    from winnow.stages.write import STAGE

    return STAGE


def written(store: CommitStore, plan: RowGroupPlan) -> tuple[int, str | None]:
    """Row groups the write stage has committed, and what a gallery page should say while that is
    not all of them (None once it is)."""
    from winnow.report.progress import committed_row_groups

    stage = _write_stage()
    done = committed_row_groups(store, stage, plan)
    g = plan.num_row_groups
    if done >= g:
        return done, None
    if done == 0:
        return done, (f"the {stage} stage has committed none of the {g} row groups yet: the gallery "
                      "shows written records and fills as it commits")
    return done, f"{done} of {g} row groups written so far: the gallery shows those and fills as {stage} commits"


def gallery_page(run_root: RunRoot | str, plan: RowGroupPlan, *, outcome: str | None = None, cursor: int = 0,
                 limit: int = 24) -> dict[str, Any]:
    """Up to ``limit`` gallery items from row group ``cursor`` on, and the cursor of the next page
    (None at the end). ``outcome`` filters: one of :data:`~winnow.stages.thumbnails.OUTCOMES`.
    ``written``: row groups the write stage has committed (of ``row_groups``); ``waiting``: what
    to say while that is not all of them, else None."""
    if outcome is not None and outcome not in OUTCOMES:
        raise GalleryError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
    if not 0 <= cursor <= plan.num_row_groups:
        raise GalleryError(f"cursor {cursor} is outside the run's {plan.num_row_groups} row groups")
    store = CommitStore(run_root)
    stage = _write_stage()
    entries = filters(store)
    limits = thresholds(store, entries)
    items: list[dict[str, Any]] = []
    rg, opened = cursor, 0
    while rg < plan.num_row_groups and len(items) < limit and opened < MAX_FILES_PER_PAGE:
        p = plan.partition_of(rg)
        # Only committed row groups: the .parquet marker is written after the gallery files.
        if store.fs.get_file_info(store.row_group_path(stage, p, rg)).type == pafs.FileType.File:
            opened += 1
            try:
                with store.fs.open_input_file(store.row_group_path(stage, p, rg, GALLERY_SUFFIX)) as f:
                    table = pq.read_table(f)
            except FileNotFoundError:
                table = None  # written before galleries existed
            if table is not None:
                for row in table.to_pylist():
                    if outcome is None or row["outcome"] == outcome:
                        row["row_group"] = rg
                        for name, _ in VALUE_COLUMNS:  # galleries written before a filter existed
                            row.setdefault(name, None)
                        for name, _ in CORPUS_GALLERY_FIELDS:  # a run without a corpus
                            row.setdefault(name, None)
                        row["reason"] = reason(row, limits)
                        items.append(row)
        rg += 1
    # Pages end at row-group boundaries (a page may hold up to one gallery file more than
    # ``limit``), so the cursor is just a row-group id.
    done, waiting = written(store, plan)
    return {"items": items, "next": rg if rg < plan.num_row_groups else None, "thresholds": limits,
            "enabled": enabled(entries), "outcomes": list(OUTCOMES), "written": done,
            "row_groups": plan.num_row_groups, "waiting": waiting}


def read_thumbnail(run_root: RunRoot | str, plan: RowGroupPlan, row_group: int, offset: int, size: int) -> bytes:
    """The JPEG at ``offset`` in a committed row group's thumbnails file."""
    if not 0 <= row_group < plan.num_row_groups:
        raise GalleryError(f"row group {row_group} is not in this run (it has {plan.num_row_groups})")
    if offset < 0 or not 0 < size <= MAX_THUMB_BYTES:
        raise GalleryError(f"offset {offset} / size {size} is not a thumbnail range")
    store = CommitStore(run_root)
    stage = _write_stage()
    p = plan.partition_of(row_group)
    if store.fs.get_file_info(store.row_group_path(stage, p, row_group)).type != pafs.FileType.File:
        raise GalleryError(f"row group {row_group} of stage {stage!r} is not committed")
    try:
        with store.fs.open_input_file(store.row_group_path(stage, p, row_group, THUMBS_SUFFIX)) as f:
            data = f.read_at(size, offset)
    except FileNotFoundError as exc:
        raise GalleryError(f"row group {row_group} has no thumbnails file") from exc
    if len(data) != size or not data.startswith(b"\xff\xd8"):
        raise GalleryError(f"row group {row_group}: no thumbnail at offset {offset} (size {size})")
    return data
