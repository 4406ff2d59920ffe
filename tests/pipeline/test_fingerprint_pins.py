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
#: Today's digests of the config below (index: a fixed listing digest). Each stage's digest chains
#: its upstream digests, so a change of the index's fingerprint moves every digest once, on
#: purpose: the index layout gained the ``width`` and ``height`` columns (key ``image_size``: the
#: image-size filters) and the ``caption_words`` column (keys ``caption_words`` and
#: ``caption_field``: the caption-length filter), and every chained digest was pinned anew then.
#: Any other move is an accident that turns every existing run root into a StageConfigMismatch.
PINNED = {
    "index": "d7a1d92f3d285207",
    "embed": "d7ad7dec58ec2242",
    "aesthetic": "d15d998acab31612",
    "nsfw": "163d0cd5402e7959",
    "clip_score": "7587b5c432d6fa10",
    "thresholds": "3761d37afd71e3dc",
    "centroids": "3a4a7d754d8b0cd8",
    "assign": "9521cfea35c07ec7",
    "pairwise": "3f1145114f3131b6",
    "dedup": "956ae6b0bcf28e6c",
    "status": "1a2c7c62a89f7a2c",
    "write": "1832d5cd1f7f9d53",
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
