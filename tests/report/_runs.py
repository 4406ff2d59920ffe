"""Small run roots built directly with CommitStore: the stage files the report reads (index,
embed, aesthetic, nsfw, clip_score, dedup, the thresholds step and gallery files), with scores
the tests choose, so the report's numbers can be checked against them exactly; and a real small
run whose write stage failed on one row group (:func:`failed_write_run`)."""

from __future__ import annotations

import hashlib
import json
import operator
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import numpy as np
import pyarrow as pa

from winnow.filters import FILTERS, OUTCOMES, VALUE_COLUMNS
from winnow.rowgroups import CommitStore, RowGroupPlan
from winnow.rowgroups.store import STAGE_FILE, table_to_parquet_bytes, write_json
from winnow.stages.thresholds import STAGE as THRESHOLDS
from winnow.stages.thresholds import THRESHOLDS_FILE, ThresholdsConfig, resolve

if TYPE_CHECKING:
    from winnow.pipeline import CurationConfig


#: The columns :class:`Records` holds as fields of their own (the score stages').
_SCORE_FIELDS = {"aesthetic_score": "aesthetic", "nsfw_score": "nsfw", "clip_score": "clip", "has_caption": "has_caption"}
_KEEP = {">=": operator.ge, "<": operator.lt, "<=": operator.le}


@dataclass
class Records:
    """Per-record columns of a synthetic run (NaN / None: no score). ``other``: every other
    column a filter reads (:data:`winnow.filters.VALUE_COLUMNS`: the index's ``width``,
    ``height``, ``caption_words`` ... as floats, NaN for null; a missing-value rule's column as
    booleans)."""

    aesthetic: np.ndarray
    nsfw: np.ndarray
    clip: np.ndarray
    has_caption: np.ndarray
    exact_of: list[int | None]
    error: list[str | None]
    duplicate: np.ndarray
    other: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.aesthetic)

    @property
    def exact(self) -> np.ndarray:
        return np.array([e is not None for e in self.exact_of])

    @property
    def decoded(self) -> np.ndarray:
        return ~self.exact & np.array([e is None for e in self.error])

    @property
    def population(self) -> np.ndarray:
        """The records the score histograms show: decoded, not near duplicates."""
        return self.decoded & ~self.duplicate

    def columns(self) -> dict[str, np.ndarray]:
        """The filter inputs by column name, as :func:`winnow.stages.kept.filter_outcomes` takes them."""
        return {"exact_duplicate": self.exact, "decoded": self.decoded, "aesthetic_score": self.aesthetic,
                "nsfw_score": self.nsfw, "clip_score": self.clip, "has_caption": self.has_caption, **self.other}

    def kept_by(self, limits: Mapping[str, float | None]) -> int:
        """Brute force: records of the population every filter keeps at ``limits`` ({filter:
        threshold}; None or absent: the filter is off), by each filter's declaration (its value,
        which side it keeps, a missing-value rule, whether an unknown value passes); a stored
        score compared in float32 as the engine compares it, an integer column's value in float64."""
        columns = self.columns()
        keep = self.population.copy()
        for spec in FILTERS:
            t = limits.get(spec.name)
            if t is None:
                continue
            values = spec.values_of(columns)
            limit = np.float32(t) if values.dtype == np.float32 else float(t)
            with np.errstate(invalid="ignore"):
                kept = _KEEP[spec.keep](values, limit)  # NaN: never kept ...
            if spec.unknown_passes:
                kept |= np.isnan(values)  # ... unless an unknown value passes this filter
            if spec.missing is not None:
                kept &= np.asarray(columns[spec.missing.column], bool)
            keep &= kept
        return int(keep.sum())


def _other_columns(rng: np.random.Generator, i: np.ndarray, no_score: np.ndarray, failed: np.ndarray,
                   captioned: np.ndarray) -> dict[str, np.ndarray]:
    """Values of every filter column :class:`Records` has no field for: the index's image size
    (unknown for some undecodable records: a header no one could read) and caption words (none
    without a caption); any other column (a filter added later) a value for every scored record
    (every indexed one for an index column), and its missing-value column all true."""
    n = len(i)
    out: dict[str, np.ndarray] = {}
    stage_of = {name: spec.stage for spec in FILTERS for name in spec.column_names}
    for name, arrow_type in VALUE_COLUMNS:
        if name in _SCORE_FIELDS:
            continue
        if name in ("width", "height"):
            values = rng.integers(40, 1600, n).astype(np.float64)
            values[failed & (i % 2 == 0)] = np.nan
        elif name == "caption_words":
            values = np.where(captioned, rng.integers(1, 16, n), np.nan)
        elif arrow_type.startswith("int"):
            values = rng.integers(0, 100, n).astype(np.float64)
        else:
            values = rng.uniform(0, 1, n).astype(np.float32)
        if name not in ("width", "height", "caption_words") and stage_of[name] != "index":
            values[no_score] = np.nan
        out[name] = values
    for spec in FILTERS:
        if spec.missing is not None and spec.missing.column not in _SCORE_FIELDS:
            out[spec.missing.column] = ~no_score
    return out


def random_records(n: int, *, seed: int = 0, exact_every: int = 9, error_every: int = 11,
                   no_caption_every: int = 7, duplicate_every: int = 5) -> Records:
    """Scores of ``n`` records: some exact duplicates and undecodable ones (no score at all), some
    without a caption (no CLIP score, no caption words), some near duplicates; aesthetic ties on
    purpose; every other filter column too (:func:`_other_columns`)."""
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    exact = (i % exact_every == exact_every - 1) & (i > 0)
    failed = (i % error_every == 3) & ~exact
    no_score = exact | failed
    aesthetic = np.round(rng.normal(5.0, 1.2, n), 1).astype(np.float32)  # rounded: many ties
    nsfw = rng.uniform(0, 1, n).astype(np.float32)
    captioned = i % no_caption_every != 2
    has_caption = ~no_score & captioned
    clip = rng.normal(0.25, 0.06, n).astype(np.float32)
    aesthetic[no_score] = nsfw[no_score] = np.nan
    clip[~has_caption] = np.nan
    duplicate = ~no_score & (i % duplicate_every == 1)
    return Records(aesthetic=aesthetic, nsfw=nsfw, clip=clip, has_caption=has_caption,
                   exact_of=[int(k - 1) if e else None for k, e in enumerate(exact)],
                   error=[f"undecodable: truncated record {k}" if f else None for k, f in enumerate(failed)],
                   duplicate=duplicate, other=_other_columns(rng, i, no_score, failed, captioned))


def _scores(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.float32(), mask=np.isnan(values))


def _column(values: np.ndarray, arrow_type: str) -> pa.Array:
    """A filter column in its declared Arrow type (NaN: null; booleans as they are)."""
    if values.dtype == bool:
        return pa.array(values)
    missing = np.isnan(values)
    if arrow_type.startswith("int"):
        return pa.array(np.where(missing, 0, values).astype(np.int64), mask=missing).cast(arrow_type)
    return pa.array(values, pa.type_for_alias(arrow_type), mask=missing)


def _stage_columns() -> dict[str, list[tuple[str, str]]]:
    """Stage -> the (column, Arrow type) its row-group files hold for the filters (a missing-value
    rule's column ``bool``), in list order."""
    types = dict(VALUE_COLUMNS)
    out: dict[str, list[tuple[str, str]]] = {}
    for spec in FILTERS:
        cols = out.setdefault(spec.stage, [])
        for name in (*spec.column_names, *((spec.missing.column,) if spec.missing else ())):
            if name not in (c for c, _ in cols):
                cols.append((name, types.get(name, "bool")))
    return out


def build_run(run_root: str, records: Records, config: ThresholdsConfig, *, buffer_size: int = 10,
              max_partitions: int = 3, thresholds: bool = True, skip_clip: tuple[int, ...] = ()) -> RowGroupPlan:
    """Commit every row group's index / embed / dedup file and each filter stage's (aesthetic,
    nsfw, clip_score ...: every stage of :data:`winnow.filters.FILTERS`, the index and embed files
    holding the columns the filters read from them; not clip_score for ``skip_clip``), the index
    metadata, and
    (``thresholds``) the thresholds step resolved by the engine's own code for ``config``."""
    store = CommitStore(run_root)
    plan = RowGroupPlan(records.n, buffer_size, max_partitions)
    r = records
    columns = r.columns()
    stages = _stage_columns()
    for rg in range(plan.num_row_groups):
        p = plan.partition_of(rg)
        lo, hi = plan.row_group_range(rg)
        ids = pa.array(np.arange(lo, hi), pa.int64())
        sl = slice(lo, hi)

        def filter_table(stage: str, sl: slice = sl, ids: pa.Array = ids) -> dict[str, pa.Array]:
            return {"record_id": ids, **{name: _column(columns[name][sl], t) for name, t in stages.get(stage, [])}}

        store.commit_table("index", p, rg, pa.table({
            "record_id": ids, "key": pa.array([f"k{i:05d}" for i in range(lo, hi)]),
            "exact_duplicate_of": pa.array(r.exact_of[sl], pa.int64()),
            **{k: v for k, v in filter_table("index").items() if k != "record_id"}}))
        store.commit_table("embed", p, rg, pa.table({**filter_table("embed"), "error": pa.array(r.error[sl], pa.string())}))
        for stage in stages:
            if stage not in ("index", "embed") and not (stage == "clip_score" and rg in skip_clip):
                store.commit_table(stage, p, rg, pa.table(filter_table(stage)))
        store.commit_table("dedup", p, rg, pa.table({
            "record_id": ids, "duplicate": pa.array(r.duplicate[sl]),
            "duplicate_of": pa.array([int(i - 1) if d else None for i, d in zip(range(lo, hi), r.duplicate[sl])],
                                     pa.int64())}))
    write_json(store.fs, store.path("index", "_index.json"), {
        "num_records": records.n, "buffer_size": buffer_size, "max_partitions": max_partitions,
        "shards": ["in/shard-000000.tar"], "counts": {"records": records.n}})
    if thresholds:
        commit_thresholds(store, plan, config)
    return plan


def commit_thresholds(store: CommitStore, plan: RowGroupPlan, config: ThresholdsConfig) -> dict[str, Any]:
    """What the thresholds step commits for ``config`` (its resolve, a fingerprint digest)."""
    digest = hashlib.sha256(json.dumps(config.fingerprint_config(), sort_keys=True).encode()).hexdigest()
    write_json(store.fs, f"{store.stage_dir(THRESHOLDS)}/{STAGE_FILE}", {"stage": THRESHOLDS, "digest": digest})
    result = resolve(store, plan, config)
    write_json(store.fs, store.path(THRESHOLDS, THRESHOLDS_FILE), {"digest": digest, "filters": result})
    return result


def commit_gallery(store: CommitStore, plan: RowGroupPlan, rg: int, rows: list[dict[str, Any]]) -> None:
    """A committed write row group whose gallery holds ``rows`` (no thumbnails)."""
    from winnow.stages.thumbnails import GALLERY_SCHEMA, GALLERY_SUFFIX, THUMBS_SUFFIX

    p = plan.partition_of(rg)
    full = [{name: row.get(name) for name in GALLERY_SCHEMA.names} for row in rows]
    store.commit_bytes("write", p, rg, b"", suffix=THUMBS_SUFFIX)
    store.commit_bytes("write", p, rg, table_to_parquet_bytes(pa.Table.from_pylist(full, schema=GALLERY_SCHEMA)),
                       suffix=GALLERY_SUFFIX)
    store.commit_table("write", p, rg, pa.table({"record_id": pa.array([], pa.int64())}))


def gallery_rows(named: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gallery rows of every outcome of :data:`winnow.filters.OUTCOMES`: the ``named`` rows, then
    one row for each outcome they do not name (record ids and keys after theirs), holding a value
    in each column of the filter(s) that decide that outcome (1 in each; nothing for an outcome
    no filter decides)."""
    rows = [dict(row) for row in named]
    have = {row["outcome"] for row in rows}
    next_id = max((row["record_id"] for row in rows), default=-1) + 1
    for outcome in OUTCOMES:
        if outcome in have:
            continue
        values = {name: 1 if t.startswith("int") else 1.0 for spec in FILTERS if spec.outcome == outcome
                  for name, t in spec.columns}
        rows.append({"record_id": next_id, "key": f"z{next_id}", "outcome": outcome, **values})
        next_id += 1
    return rows


def failed_write_run(root: Path, *, run_key: str, shards: int, per_shard: int, seed: int, max_partitions: int,
                     failed_row_group: int) -> CurationConfig:
    """A real run (tiny model, local backend) of a generated sample with corrupt records, under
    ``root`` (``in/`` and ``out/``), whose write stage failed on ``failed_row_group`` through the
    test-only fault hook; everything else committed. Row groups of 5 records."""
    from winnow.data.sample import TINY_MODEL_PARAMS, generate_sample
    from winnow.exceptions import RowGroupsFailedError
    from winnow.faults import ENV_VAR
    from winnow.pipeline import CurationConfig, run_all
    from winnow.stages.write import STAGE

    generate_sample(str(root / "in"), shards=shards, per_shard=per_shard, seed=seed, corrupt=True)
    cfg = CurationConfig(input_uri=str(root / "in"), output_root=str(root / "out"), run_key=run_key, buffer_size=5,
                         max_partitions=max_partitions,
                         **{**TINY_MODEL_PARAMS, "aesthetic_threshold": 3.0, "nsfw_threshold": 0.6})
    with mock.patch.dict(os.environ, {ENV_VAR: json.dumps({"stage": STAGE, "row_groups": [failed_row_group]})}):
        try:
            run_all(cfg, backend="local")
        except RowGroupsFailedError:
            return cfg
    raise AssertionError(f"the write stage of {cfg.run_root} did not fail on row group {failed_row_group}")
