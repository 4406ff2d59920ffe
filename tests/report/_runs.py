"""Small run roots built directly with CommitStore: the stage files the report reads (index,
embed, aesthetic, nsfw, clip_score, dedup, the thresholds step and gallery files), with scores
the tests choose, so the report's numbers can be checked against them exactly; and a real small
run whose write stage failed on one row group (:func:`failed_write_run`)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import numpy as np
import pyarrow as pa

from winnow.rowgroups import CommitStore, RowGroupPlan
from winnow.rowgroups.store import STAGE_FILE, table_to_parquet_bytes, write_json
from winnow.stages.thresholds import STAGE as THRESHOLDS
from winnow.stages.thresholds import THRESHOLDS_FILE, ThresholdsConfig, resolve

if TYPE_CHECKING:
    from winnow.pipeline import CurationConfig


@dataclass
class Records:
    """Per-record columns of a synthetic run (NaN / None: no score)."""

    aesthetic: np.ndarray
    nsfw: np.ndarray
    clip: np.ndarray
    has_caption: np.ndarray
    exact_of: list[int | None]
    error: list[str | None]
    duplicate: np.ndarray

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
                "nsfw_score": self.nsfw, "clip_score": self.clip, "has_caption": self.has_caption}

    def kept_by(self, limits: dict[str, float | None]) -> int:
        """Brute force: records of the population every filter keeps at ``limits`` ({filter:
        threshold}; None: the filter is off), each score compared in float32 as the engine
        compares a stored score."""
        keep = self.population.copy()
        if limits.get("aesthetic") is not None:
            keep &= self.aesthetic >= np.float32(limits["aesthetic"])
        if limits.get("nsfw") is not None:
            keep &= self.nsfw < np.float32(limits["nsfw"])
        if limits.get("clip_score") is not None:
            keep &= self.has_caption & (self.clip >= np.float32(limits["clip_score"]))
        return int(keep.sum())


def random_records(n: int, *, seed: int = 0, exact_every: int = 9, error_every: int = 11,
                   no_caption_every: int = 7, duplicate_every: int = 5) -> Records:
    """Scores of ``n`` records: some exact duplicates and undecodable ones (no score at all), some
    without a caption (no CLIP score), some near duplicates; aesthetic ties on purpose."""
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    exact = (i % exact_every == exact_every - 1) & (i > 0)
    failed = (i % error_every == 3) & ~exact
    no_score = exact | failed
    aesthetic = np.round(rng.normal(5.0, 1.2, n), 1).astype(np.float32)  # rounded: many ties
    nsfw = rng.uniform(0, 1, n).astype(np.float32)
    has_caption = ~no_score & (i % no_caption_every != 2)
    clip = rng.normal(0.25, 0.06, n).astype(np.float32)
    aesthetic[no_score] = nsfw[no_score] = np.nan
    clip[~has_caption] = np.nan
    duplicate = ~no_score & (i % duplicate_every == 1)
    return Records(aesthetic=aesthetic, nsfw=nsfw, clip=clip, has_caption=has_caption,
                   exact_of=[int(k - 1) if e else None for k, e in enumerate(exact)],
                   error=[f"undecodable: truncated record {k}" if f else None for k, f in enumerate(failed)],
                   duplicate=duplicate)


def _scores(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.float32(), mask=np.isnan(values))


def build_run(run_root: str, records: Records, config: ThresholdsConfig, *, buffer_size: int = 10,
              max_partitions: int = 3, thresholds: bool = True, skip_clip: tuple[int, ...] = ()) -> RowGroupPlan:
    """Commit every row group's index / embed / aesthetic / nsfw / clip_score / dedup file (not
    clip_score for ``skip_clip``), the index metadata, and (``thresholds``) the thresholds step
    resolved by the engine's own code for ``config``."""
    store = CommitStore(run_root)
    plan = RowGroupPlan(records.n, buffer_size, max_partitions)
    r = records
    for rg in range(plan.num_row_groups):
        p = plan.partition_of(rg)
        lo, hi = plan.row_group_range(rg)
        ids = pa.array(np.arange(lo, hi), pa.int64())
        sl = slice(lo, hi)
        store.commit_table("index", p, rg, pa.table({
            "record_id": ids, "key": pa.array([f"k{i:05d}" for i in range(lo, hi)]),
            "exact_duplicate_of": pa.array(r.exact_of[sl], pa.int64())}))
        store.commit_table("embed", p, rg, pa.table({"record_id": ids, "error": pa.array(r.error[sl], pa.string())}))
        store.commit_table("aesthetic", p, rg, pa.table({"record_id": ids, "aesthetic_score": _scores(r.aesthetic[sl])}))
        store.commit_table("nsfw", p, rg, pa.table({"record_id": ids, "nsfw_score": _scores(r.nsfw[sl])}))
        if rg not in skip_clip:
            store.commit_table("clip_score", p, rg, pa.table({
                "record_id": ids, "clip_score": _scores(r.clip[sl]), "has_caption": pa.array(r.has_caption[sl])}))
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
