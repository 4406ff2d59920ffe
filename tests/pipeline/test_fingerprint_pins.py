"""Stage fingerprints are what a run root resumes by: a digest that moves makes every existing run
root a StageConfigMismatch. These digests were computed before the fingerprint builders were
merged into one (``winnow.rowgroups.store.stage_fingerprint``) and must never change by accident."""

from __future__ import annotations

from winnow.data.index import IndexConfig, _fingerprint
from winnow.data.sample import TINY_MODEL_PARAMS
from winnow.pipeline import CurationConfig, prepare_stages, stage_fingerprints
from winnow.rowgroups import CommitStore, RowGroupPlan, StageFingerprint
from winnow.stages.dedup_steps import ensure_step

PLAN = RowGroupPlan(20, 8, 4)
#: Today's digests of the config below (index: a fixed listing digest).
PINNED = {
    "index": "266bd4c8ae8bdb94",
    "embed": "b5cb2594f02a6acb",
    "aesthetic": "14f753708578f392",
    "nsfw": "57473c7a11f8398e",
    "clip_score": "08060bb4e625962a",
    "thresholds": "5d1e2e8323bf2654",
    "centroids": "206cb8d64cc182cc",
    "assign": "3a9c953908afc3fd",
    "pairwise": "5dfb55a3e2ab521c",
    "dedup": "5b225957d0f23f7c",
    "status": "f77935e32ee866d4",
    "write": "ec19f2791c6d6f21",
}


def _cfg(tmp_path) -> CurationConfig:
    return CurationConfig(input_uri="/data/in", output_root=str(tmp_path), run_key="r", buffer_size=8,
                          max_partitions=4, **TINY_MODEL_PARAMS)


def test_a_fixed_fingerprint_keeps_its_digest():
    f = StageFingerprint(stage="embed", config={"model": "m", "nested": {"b": 2, "a": [1, 2]}},
                         upstream={"index": "0123456789abcdef"}, num_records=10, buffer_size=4)
    assert f.digest == "34fb3afcfbd918f7"


def test_the_index_fingerprint_keeps_its_digest():
    assert _fingerprint(IndexConfig("/data/in", 8, 4), "0123456789abcdef", 20).digest == PINNED["index"]


def test_every_stage_of_a_fixed_run_keeps_its_digest(tmp_path):
    cfg = _cfg(tmp_path)
    store = CommitStore(cfg.run_root)
    store.ensure_stage(_fingerprint(IndexConfig("/data/in", 8, 4), "0123456789abcdef", 20))
    got = {"index": store.fingerprint_digest("index")}
    got.update({name: f.digest for name, f in stage_fingerprints(cfg, PLAN).items()})
    assert got == PINNED


def test_the_dedup_steps_build_the_digests_the_pipeline_records(tmp_path):
    cfg = _cfg(tmp_path)
    store = CommitStore(cfg.run_root)
    store.ensure_stage(_fingerprint(IndexConfig("/data/in", 8, 4), "0123456789abcdef", 20))
    assert prepare_stages(cfg, PLAN) == {}
    for step in ("centroids", "assign", "pairwise", "dedup"):
        # Built from the stored upstream digests: the same fingerprint, so no mismatch.
        assert ensure_step(store, PLAN, cfg.dedup_config(), step).digest == PINNED[step]
        assert store.fingerprint_digest(step) == PINNED[step]
