"""The whole engine without Airflow: index -> embed -> aesthetic -> nsfw -> clip_score ->
thresholds -> dedup -> status -> write.

Real tar shards with corrupt members, planted near and exact duplicates and captions that match
or not (or are missing), the tiny open_clip config with random weights, a real local Ray. Counts
must add up, planted duplicates must be found, every input has one status row, keep fractions
keep their share, and a second run of the same thing computes nothing.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests._tiny import tiny_config
from winnow.data.sample import generate_sample
from winnow.exceptions import ConfigError
from winnow.pipeline import CurationConfig, run_all
from winnow.rowgroups import CommitStore
from winnow.stages.status import COUNT_NAMES, iter_status

pytestmark = pytest.mark.timeout(600)

CORRUPT_IMAGE_KINDS = {"truncated_jpeg", "zero_byte_image", "not_an_image", "decompression_bomb"}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    manifest = generate_sample(str(root / "input"), shards=3, per_shard=30, seed=3, corrupt=True)
    return root, manifest


@pytest.fixture(scope="module")
def ray_local():
    from winnow.ray.cluster import connect

    connect(None)
    yield


def config(root, run_key, **overrides):
    # The tiny model where only dedup drops records: phase one looks at dedup alone.
    return tiny_config(**{"input_uri": str(root / "input"), "output_root": str(root / "out"), "run_key": run_key,
                          "buffer_size": 16, "max_partitions": 3, "batch_size": 16, **overrides})


def column(run_root, stage, name):
    store = CommitStore(run_root)
    values = []
    for dirpath, _, files in sorted(os.walk(store.stage_dir(stage))):
        for f in sorted(files):
            if f.startswith("rg") and f.endswith(".parquet"):
                values.extend(pq.read_table(os.path.join(dirpath, f), columns=[name]).column(name).to_pylist())
    return values


def keys_by_record(run_root):
    return dict(zip(column(run_root, "index", "record_id"), column(run_root, "index", "key")))


def test_planted_near_duplicates_are_found_and_counts_add_up(sample, ray_local):
    root, manifest = sample
    cfg = config(root, "permissive")
    summary = run_all(cfg)
    assert summary["records"] == manifest["expected"]["records"]
    assert summary["undecodable"] == len([c for c in manifest["corrupt"] if c["kind"] in CORRUPT_IMAGE_KINDS])
    assert summary["members_without_image"] == manifest["expected"]["members_without_image"]
    assert summary["exact_duplicates"] == manifest["expected"]["exact_duplicates"] == 2
    assert summary["records"] == sum(summary[name] for name in COUNT_NAMES.values())
    keys = keys_by_record(cfg.run_root)
    dup_flags = dict(zip(column(cfg.run_root, "dedup", "record_id"), column(cfg.run_root, "dedup", "duplicate_of")))
    duplicate_pairs = {frozenset((keys[r], keys[o])) for r, o in dup_flags.items() if o is not None}
    for pair in manifest["near_duplicates"]:
        assert frozenset(pair["keys"]) in duplicate_pairs, f"planted near-duplicate {pair} not found"
    assert summary["duplicates"] < summary["records"] - summary["undecodable"]  # not everything


def test_thresholds_drop_records_and_output_matches_summary(sample, ray_local):
    root, _ = sample
    first = config(root, "probe")
    run_all(first)
    aesthetic = [s for s in column(first.run_root, "aesthetic", "aesthetic_score") if s is not None]
    nsfw = [s for s in column(first.run_root, "nsfw", "nsfw_score") if s is not None]
    # Thresholds at the data's own quantiles, so each filter surely drops some and keeps some.
    cfg = config(
        root, "filtered",
        aesthetic_threshold=float(np.quantile(aesthetic, 0.25)),
        nsfw_threshold=float(np.quantile(nsfw, 0.75)),
    )
    summary = run_all(cfg)
    assert summary["aesthetic_dropped"] > 0 and summary["nsfw_dropped"] > 0 and summary["kept"] > 0
    assert summary["records"] == sum(summary[name] for name in COUNT_NAMES.values())
    with open(os.path.join(cfg.run_root, "_summary.json")) as f:
        assert json.load(f)["kept"] == summary["kept"]
    out_keys = column(cfg.run_root, "write", "key")
    assert len(out_keys) == summary["kept"]
    import webdataset as wds

    tars = sorted(
        os.path.join(d, f) for d, _, fs in os.walk(os.path.join(cfg.run_root, "write")) for f in fs if f.endswith(".tar")
    )
    samples = [s for t in tars for s in wds.WebDataset(t, shardshuffle=False)]
    assert len(samples) == summary["kept"]
    # Nothing was written outside the run roots.
    assert sorted(os.listdir(root)) == ["input", "out"]

    again = run_all(cfg)
    assert again["row_groups_computed"] == 0
    assert again["row_groups_skipped"] == summary["row_groups_computed"] + summary["row_groups_skipped"]
    assert {k: again[k] for k in ("records", "kept", "duplicates")} == {k: summary[k] for k in ("records", "kept", "duplicates")}


def test_status_rows_cover_every_input_once_and_add_up_to_the_summary(sample, ray_local):
    root, manifest = sample
    cfg = config(root, "permissive")
    summary = run_all(cfg)  # resumes the first test's run root, or computes it
    rows = [r for t in iter_status(cfg.run_root) for r in t.to_pylist()]
    indexed = [r for r in rows if r["record_id"] is not None]
    skipped = [r for r in rows if r["record_id"] is None]
    # One row per indexed record (exact duplicates included), one per skipped member.
    assert sorted(r["record_id"] for r in indexed) == list(range(summary["records"]))
    assert len({(r["shard"], r["key"]) for r in indexed}) == len(indexed)
    assert len(skipped) == manifest["expected"]["members_without_image"] + manifest["expected"]["duplicate_keys"]
    assert {r["outcome"] for r in skipped} == {"no_image", "duplicate_key"}
    for outcome, name in COUNT_NAMES.items():
        assert sum(r["outcome"] == outcome for r in indexed) == summary[name], outcome
    # Exact duplicates: same uid as their kept twin, never embedded, no score.
    by_id = {r["record_id"]: r for r in indexed}
    exact = [r for r in indexed if r["outcome"] == "exact_duplicate"]
    assert len(exact) == 2
    for r in exact:
        twin = by_id[r["duplicate_of"]]
        assert r["uid"] == twin["uid"] and twin["outcome"] != "exact_duplicate"
        assert r["duplicate_of_key"] == twin["key"] and r["aesthetic_score"] is None
    assert all(len(r["uid"]) == 32 and int(r["uid"], 16) >= 0 for r in indexed)
    assert len({r["uid"] for r in indexed}) == len(indexed) - len(exact)
    # The output Parquet carries uid and clip_score beside the other scores.
    written = [
        row for d, _, fs in sorted(os.walk(os.path.join(cfg.run_root, "write"))) for f in sorted(fs)
        if f.startswith("rg") and f.endswith(".parquet")
        for row in pq.read_table(os.path.join(d, f), columns=["record_id", "uid", "clip_score"]).to_pylist()]
    assert len(written) == summary["kept"]
    for row in written:
        assert row["uid"] == by_id[row["record_id"]]["uid"]
        assert row["clip_score"] == by_id[row["record_id"]]["clip_score"]


def test_keep_fractions_keep_their_share_and_a_changed_fraction_recomputes_only_after_the_scores(sample, ray_local):
    from winnow.stages.thresholds import keep_count

    root, manifest = sample
    cfg = config(root, "fractions", aesthetic_keep_fraction=0.5, clip_score_keep_fraction=0.5)
    summary = run_all(cfg)
    rows = [r for t in iter_status(cfg.run_root, skipped=False) for r in t.to_pylist()]
    scored = [r["aesthetic_score"] for r in rows if r["aesthetic_score"] is not None]
    t_a = summary["thresholds"]["aesthetic"]
    k = keep_count(0.5, len(scored))
    ties = sum(s == t_a for s in scored)
    assert k <= sum(s >= t_a for s in scored) <= k + ties - 1
    passed_aesthetic = [r for r in rows if r["outcome"] not in ("exact_duplicate", "undecodable", "aesthetic")]
    assert k <= len(passed_aesthetic) <= k + ties - 1
    # The CLIP-score fraction is over every record that has a score (a caption and an image).
    clip = [r["clip_score"] for r in rows if r["clip_score"] is not None]
    t_c = summary["thresholds"]["clip_score"]
    assert keep_count(0.5, len(clip)) <= sum(c >= t_c for c in clip) < keep_count(0.5, len(clip)) + sum(c == t_c for c in clip)
    # Filter on: records without a caption are dropped as no_caption (those that got that far).
    assert summary["no_caption"] == sum(r["outcome"] == "no_caption" for r in rows) > 0
    assert all(r["clip_score"] is None for r in rows if r["outcome"] == "no_caption")
    assert summary["records"] == sum(summary[name] for name in COUNT_NAMES.values())

    changed = config(root, "fractions", aesthetic_keep_fraction=0.3, clip_score_keep_fraction=0.5, overwrite=True)
    again = run_all(changed)
    by_stage = again["row_groups_by_stage"]
    for stage in ("embed", "aesthetic", "nsfw", "clip_score"):
        assert by_stage[stage]["computed"] == 0, stage  # scores are kept
    for stage in ("assign", "dedup", "status", "write"):
        assert by_stage[stage]["computed"] > 0 and by_stage[stage]["skipped"] == 0, stage
    assert again["thresholds"]["aesthetic"] >= t_a and again["kept"] <= summary["kept"]


def test_bad_params_fail_fast_with_named_parameters(sample):
    root, _ = sample
    with pytest.raises(ConfigError) as err:
        config(root, "bad", buffer_size=0, input_uri=str(root / "nope"), model="no-such-model").validate()
    msg = str(err.value)
    assert "buffer_size" in msg and "input_uri" in msg and "no-such-model" in msg
    with pytest.raises(ConfigError, match="aesthetic_weights"):
        config(root, "bad", allow_random_weights=False, pretrained=str(root / "missing.pt")).validate()


def test_a_run_root_from_before_the_write_rename_resumes_in_place(tmp_path):
    """Run roots written when the write stage's folder was ``output/`` are read and resumed
    where they are: nothing is recomputed and the summary points at ``output/``."""
    from winnow.data.sample import TINY_MODEL_PARAMS, generate_sample

    generate_sample(str(tmp_path / "in"), shards=1, per_shard=8, seed=3)
    cfg = CurationConfig(input_uri=str(tmp_path / "in"), output_root=str(tmp_path / "out"), run_key="old",
                         buffer_size=4, max_partitions=2, **TINY_MODEL_PARAMS)
    first = run_all(cfg, backend="local")
    root = tmp_path / "out" / "old"
    os.rename(root / "write", root / "output")  # the layout of earlier versions
    stage_file = root / "output" / "_stage.json"
    stage_file.write_text(stage_file.read_text().replace('"stage": "write"', '"stage": "output"'))
    assert '"stage": "output"' in stage_file.read_text()
    again = run_all(cfg, backend="local")
    assert again["row_groups_computed"] == 0
    assert again["write_dir"] == str(root / "output")
    assert {k: again[k] for k in ("records", "kept", "duplicates")} == {k: first[k] for k in ("records", "kept", "duplicates")}
    assert not (root / "write").exists()
