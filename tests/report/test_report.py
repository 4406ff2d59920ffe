"""The read side of a run (winnow.report): row-group map with failures, gallery, histograms.

One real run (tiny model, local backend) whose write stage fails on one row group through the
test-only fault hook: the map must show it failed with its error, everything else committed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from winnow.rowgroups import CommitStore

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import os

    from winnow.data.index import load_index
    from winnow.data.sample import TINY_MODEL_PARAMS, generate_sample
    from winnow.exceptions import RowGroupsFailedError
    from winnow.pipeline import CurationConfig, run_all
    from winnow.stages.write import STAGE

    root = tmp_path_factory.mktemp("report")
    generate_sample(str(root / "in"), shards=2, per_shard=12, seed=3, corrupt=True)
    cfg = CurationConfig(input_uri=str(root / "in"), output_root=str(root / "out"), run_key="r", buffer_size=5,
                         max_partitions=3, **{**TINY_MODEL_PARAMS, "aesthetic_threshold": 3.0, "nsfw_threshold": 0.6})
    spec = {"stage": STAGE, "row_groups": [2], "times": 1, "once_dir": str(root / "once")}
    os.environ["WINNOW_TEST_FAULTS"] = json.dumps(spec)
    try:
        with pytest.raises(RowGroupsFailedError):
            run_all(cfg, backend="local")
    finally:
        del os.environ["WINNOW_TEST_FAULTS"]
    return {"root": cfg.run_root, "plan": load_index(cfg.run_root).plan, "stage": STAGE, "cfg": cfg}


@pytest.fixture(scope="module")
def unwritten(run, tmp_path_factory):
    """A copy of the run with its write stage not committed yet (the folder gone): what a run
    that failed, or is still running, before write looks like."""
    import dataclasses
    import shutil

    out = tmp_path_factory.mktemp("unwritten") / "out"
    shutil.copytree(run["root"], out / "r")
    shutil.rmtree(out / "r" / run["stage"])
    return {**run, "root": str(out / "r"), "cfg": dataclasses.replace(run["cfg"], output_root=str(out))}


def test_run_length_round_trips_states():
    from winnow.report.progress import run_length

    assert run_length(b"") == ""
    assert run_length(b"cccf..c") == "3c1f2.1c"


def test_map_marks_the_failed_row_group_with_its_error_and_the_rest_committed(run):
    from winnow.report.progress import row_group_map

    m = row_group_map(run["root"])
    g = run["plan"].num_row_groups
    by = {s["stage"]: s for s in m["stages"]}
    assert m["row_groups"] == g and m["summary"] is None
    for name in ("index", "embed", "aesthetic", "nsfw", "dedup"):
        assert by[name]["map"] == f"{g}c" and by[name]["failed"] == 0, by[name]
    write = by[run["stage"]]
    assert write["map"] == f"2c1f{g - 3}c" and (write["committed"], write["failed"], write["pending"]) == (g - 1, 1, 0)
    assert write["errors"][0]["row_group"] == 2 and "injected test fault" in write["errors"][0]["error"]
    assert write["records_per_s"] is None or write["records_per_s"] > 0


def test_the_dedup_steps_are_shown_by_their_own_units_not_as_pending_row_groups(run):
    from winnow.report.progress import row_group_map
    from winnow.stages.dedup_steps import committed_buckets, load_centroids

    by = {s["stage"]: s for s in row_group_map(run["root"])["stages"]}
    store = CommitStore(run["root"])
    buckets = load_centroids(store)[1]["buckets"]
    assert committed_buckets(store) == set(range(buckets))
    assert {k: by["centroids"][k] for k in ("unit", "units", "committed", "pending", "status", "map")} == \
        {"unit": "output", "units": 1, "committed": 1, "pending": 0, "status": "done", "map": "1c"}
    assert {k: by["pairwise"][k] for k in ("unit", "units", "committed", "pending", "status", "map")} == \
        {"unit": "bucket", "units": buckets, "committed": buckets, "pending": 0, "status": "done", "map": f"{buckets}c"}
    assert by["embed"]["status"] == "done" and by[run["stage"]]["status"] == "failed"


def test_task_states_say_running_failed_or_not_run_where_storage_cannot(run):
    from winnow.report.progress import row_group_map, with_task_states

    def status(tasks, run_state):
        stages = row_group_map(run["root"])["stages"]
        for s in stages:
            if s["stage"] == "pairwise":  # as while its buckets are not committed yet
                s.update(status="pending", committed=0)
        with_task_states(stages, tasks, run_state)
        return {s["stage"]: s["status"] for s in stages}

    assert status({"pairwise": {0: "success", 1: "running"}}, "running")["pairwise"] == "running"
    assert status({"pairwise": {0: "failed", 1: "success"}}, "running")["pairwise"] == "failed"
    assert status({"pairwise": {0: "upstream_failed"}}, "failed")["pairwise"] == "not run"
    assert status({"pairwise": {}}, "running")["pairwise"] == "pending"
    assert status({"embed": {0: "running"}}, "running")["embed"] == "done"  # storage says committed


def test_a_finished_run_has_no_pending_stage_and_its_gallery_fills_as_write_commits(unwritten):
    from winnow.pipeline import run_all
    from winnow.report.gallery import gallery_page
    from winnow.report.progress import row_group_map
    from winnow.stages.registry import stage_order

    plan, g = unwritten["plan"], unwritten["plan"].num_row_groups
    before = gallery_page(unwritten["root"], plan, limit=1000)
    assert before["items"] == [] and before["written"] == 0 and before["row_groups"] == g
    assert "committed none of the" in before["waiting"] and "fills as it commits" in before["waiting"]

    run_all(unwritten["cfg"], backend="local")  # writes every row group
    stages = row_group_map(unwritten["root"])["stages"]
    assert [s["stage"] for s in stages] == list(stage_order())
    for s in stages:
        assert s["status"] == "done" and s["pending"] == 0 and s["failed"] == 0, s
    after = gallery_page(unwritten["root"], plan, limit=1000)
    assert after["waiting"] is None and after["written"] == g and after["next"] is None
    assert {i["row_group"] for i in after["items"]} == set(range(g))


def test_a_later_commit_wins_over_an_old_failure_record(run, tmp_path):
    from winnow.report.progress import row_group_map
    from winnow.rowgroups.failures import record_failure

    store = CommitStore(run["root"])
    plan = run["plan"]
    record_failure(store, "embed", plan.partition_of(0), 0, "old failure")  # row group 0 is committed
    try:
        embed = next(s for s in row_group_map(run["root"])["stages"] if s["stage"] == "embed")
        assert embed["failed"] == 0 and embed["map"].startswith(f"{plan.num_row_groups}c")
    finally:
        store.fs.delete_file(store.row_group_path("embed", plan.partition_of(0), 0, ".failed.json"))


def test_gallery_holds_a_bounded_sample_with_reasons_and_thumbnails_by_offset(run):
    import io

    from PIL import Image

    from winnow.exceptions import GalleryError
    from winnow.report.gallery import gallery_page, read_thumbnail
    from winnow.stages.thumbnails import OUTCOMES

    plan = run["plan"]
    page = gallery_page(run["root"], plan, limit=1000)
    items = page["items"]
    assert page["next"] is None and items
    assert {i["row_group"] for i in items} == set(range(plan.num_row_groups)) - {2}  # not the failed one
    assert {i["outcome"] for i in items} <= set(OUTCOMES)
    per_rg_outcome: dict = {}
    for i in items:
        per_rg_outcome[(i["row_group"], i["outcome"])] = per_rg_outcome.get((i["row_group"], i["outcome"]), 0) + 1
    assert max(per_rg_outcome.values()) <= 4  # thumbnails_per_outcome
    undecodable = [i for i in items if i["outcome"] == "undecodable"]
    assert undecodable and all(i["thumb_offset"] is None and i["reason"].startswith("undecodable") for i in undecodable)
    shown = [i for i in items if i["thumb_size"]]
    for i in shown[:5]:
        data = read_thumbnail(run["root"], plan, i["row_group"], i["thumb_offset"], i["thumb_size"])
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and max(img.size) <= 256
    for i in items:
        if i["outcome"] == "aesthetic":
            assert "below threshold 3.0" in i["reason"]
        if i["outcome"] == "duplicate":
            assert i["reason"] == f"duplicate of {i['duplicate_of_key']}" and i["original_thumb_size"]
    assert page["written"] == plan.num_row_groups - 1 and f"{plan.num_row_groups - 1} of" in page["waiting"]
    kept = gallery_page(run["root"], plan, outcome="kept", limit=2)
    assert kept["items"] and all(i["outcome"] == "kept" for i in kept["items"]) and kept["next"] is not None
    with pytest.raises(GalleryError):
        gallery_page(run["root"], plan, outcome="bogus")
    with pytest.raises(GalleryError):
        read_thumbnail(run["root"], plan, 2, 0, 10)  # the failed row group has no committed gallery
    with pytest.raises(GalleryError):
        read_thumbnail(run["root"], plan, shown[0]["row_group"], shown[0]["thumb_offset"] + 1, 10)


def test_histograms_count_every_scored_record_and_the_kept_share_matches_the_run(run):
    from winnow.report.scores import score_histograms

    h = score_histograms(run["root"], run["plan"])
    joint = np.array(h["joint"])
    assert joint.sum() == h["scored"] == h["records"] - h["undecodable"] - h["duplicates"]
    assert h["thresholds"] == {"aesthetic": 3.0, "nsfw": 0.6}
    assert 3.0 in h["aesthetic_edges"]  # the threshold is a bin edge: the kept share is exact
    ia = h["aesthetic_edges"].index(3.0)
    jn = h["nsfw_edges"].index(0.6)
    assert joint[ia:, :jn].sum() == h["kept_at_thresholds"]
    sampled = score_histograms(run["root"], run["plan"], max_row_groups=2)
    assert sampled["sampled"] and sampled["row_groups"] < h["row_groups"]
