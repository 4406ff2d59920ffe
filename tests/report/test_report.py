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
            assert "< threshold 3" in i["reason"], i["reason"]  # the status stage's words
        if i["outcome"] == "duplicate":
            assert i["duplicate_of_key"] in i["reason"] and i["original_thumb_size"], i
        if i["outcome"] == "exact_duplicate":  # never decoded, but its bytes are its twin's: a thumbnail
            assert i["reason"].startswith("same image bytes as record") and i["thumb_size"] and i["duplicate_of_key"], i
        if i["outcome"] != "kept":
            assert i["reason"] and i["reason"] != "kept"
        assert "clip_score" in i
    assert page["thresholds"] == {"aesthetic": 3.0, "nsfw": 0.6, "clip_score": 0.0} and page["clip_filter_on"] is False
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
    assert joint.sum() == h["scored"] == h["records"] - h["exact_duplicates"] - h["undecodable"] - h["duplicates"]
    # The same numbers as the run's status stage (the outcome rule's own counts).
    from winnow.stages.status import count_outcomes

    counts = count_outcomes(run["root"], run["plan"])
    assert (h["records"], h["exact_duplicates"], h["undecodable"], h["duplicates"], h["kept_at_thresholds"]) == \
        (counts["records"], counts["exact_duplicates"], counts["undecodable"], counts["duplicates"], counts["kept"])
    assert sum(h["clip"]["counts"]) == h["clip"]["scored"]
    assert h["thresholds"] == {"aesthetic": 3.0, "nsfw": 0.6, "clip_score": 0.0}
    assert h["clip_filter_on"] is False and h["clip"]["enabled"] is False and h["joint_clip_passed"] == h["joint"]
    assert 3.0 in h["aesthetic_edges"]  # the threshold is a bin edge: the kept share is exact
    ia = h["aesthetic_edges"].index(3.0)
    jn = h["nsfw_edges"].index(0.6)
    assert joint[ia:, :jn].sum() == h["kept_at_thresholds"]
    sampled = score_histograms(run["root"], run["plan"], max_row_groups=2)
    assert sampled["sampled"] and sampled["row_groups"] < h["row_groups"]


# ---- run roots built directly (tests/report/_runs.py): exact numbers, no pipeline ----------------

def _all_scores(values: np.ndarray) -> np.ndarray:
    return np.sort(values[~np.isnan(values)])


def _built(tmp_path, config, records=None, **kw):
    from tests.report._runs import build_run, random_records

    records = records if records is not None else random_records(157, seed=11)
    root = str(tmp_path / "run")
    return root, build_run(root, records, config, **kw), records


def test_quantile_tables_pick_exactly_what_the_thresholds_step_picks(tmp_path):
    from winnow.report.scores import FRACTIONS, score_histograms
    from winnow.stages.thresholds import ThresholdsConfig, keep_count, kth_best

    config = ThresholdsConfig(aesthetic_keep_fraction=0.37, clip_score_keep_fraction=0.6, nsfw_threshold=0.7)
    root, plan, r = _built(tmp_path, config)
    h = score_histograms(root, plan)
    assert h["row_groups"] == plan.num_row_groups and not h["sampled"] and h["scale"] == 1.0
    for name, values in (("aesthetic", r.aesthetic), ("clip_score", r.clip)):
        q = h["keep_fractions"][name]
        scores = _all_scores(values)
        n = len(scores)
        assert q["scored"] == n and q["keep"] == ">=" and [row["fraction"] for row in q["table"]] == list(FRACTIONS)
        chunks = np.array_split(values, 7)  # as the step reads them: a chunk at a time
        for row in q["table"]:
            k = keep_count(row["fraction"], n)
            assert row["threshold"] == kth_best(lambda c=chunks: iter(c), k), row  # the step's own selection
            assert row["keeps"] == int((scores >= row["threshold"]).sum()) >= k
        assert [row["threshold"] for row in q["table"]] == sorted((row["threshold"] for row in q["table"]), reverse=True)
        # The run's own fraction: the table's threshold is the one the run used.
        run_row = next(row for row in q["table"] if row["fraction"] == q["run_fraction"])
        assert run_row["threshold"] == q["run_threshold"] == h["thresholds"][name] == h["filters"][name]["threshold"]
    assert h["thresholds"]["nsfw"] == 0.7 and h["clip_filter_on"] is True
    # Same table from a table-only check: ties make "keeps" exceed k (aesthetic scores are rounded).
    assert any(row["keeps"] > keep_count(row["fraction"], h["keep_fractions"]["aesthetic"]["scored"])
               for row in h["keep_fractions"]["aesthetic"]["table"])


def test_clip_histogram_and_the_kept_count_use_the_thresholds_the_run_used(tmp_path):
    from winnow.report.scores import score_histograms
    from winnow.stages.kept import filter_outcomes
    from winnow.stages.thresholds import ThresholdsConfig, load_thresholds

    config = ThresholdsConfig(aesthetic_keep_fraction=0.5, clip_score_threshold=0.24, nsfw_threshold=0.8)
    root, plan, r = _built(tmp_path, config)
    h = score_histograms(root, plan)
    clip = h["clip"]
    assert clip["enabled"] is True and clip["threshold"] == 0.24 == h["thresholds"]["clip_score"]
    assert sum(clip["counts"]) == clip["scored"] == int((~np.isnan(r.clip)).sum())
    assert clip["threshold"] in clip["edges"] and len(clip["counts"]) == len(clip["edges"]) - 1
    i = clip["edges"].index(clip["threshold"])
    assert sum(clip["counts"][i:]) == clip["kept_at_threshold"] == int((_all_scores(r.clip) >= 0.24).sum())
    exact = np.array([e is not None for e in r.exact_of])
    decoded = ~exact & np.array([e is None for e in r.error])
    assert clip["no_caption"] == int((decoded & ~r.has_caption).sum()) > 0
    assert (h["records"], h["exact_duplicates"], h["undecodable"]) == (r.n, int(exact.sum()), int((~exact & ~decoded).sum()))
    # The run's kept count is the engine's outcome rule with the committed thresholds.
    out = filter_outcomes(load_thresholds(CommitStore(root)), exact_duplicate=exact, decoded=decoded,
                          aesthetic=r.aesthetic, nsfw=r.nsfw, has_caption=r.has_caption, clip=r.clip)
    kept = int(((out == "") & ~r.duplicate).sum())
    assert h["kept_at_thresholds"] == kept > 0
    ia = h["aesthetic_edges"].index(h["thresholds"]["aesthetic"])
    jn = h["nsfw_edges"].index(0.8)
    assert np.array(h["joint_clip_passed"])[ia:, :jn].sum() == kept < np.array(h["joint"])[ia:, :jn].sum()
    assert np.array(h["joint"]).sum() == h["scored"] == int((decoded & ~r.duplicate).sum())


def test_a_run_with_the_clip_filter_off_says_so(tmp_path):
    from winnow.report.scores import score_histograms
    from winnow.stages.thresholds import ThresholdsConfig

    root, plan, r = _built(tmp_path, ThresholdsConfig(aesthetic_threshold=4.5))
    h = score_histograms(root, plan)
    assert h["clip_filter_on"] is False and h["clip"]["enabled"] is False and h["clip"]["kept_at_threshold"] is None
    assert h["filters"]["clip_score"]["enabled"] is False and h["joint_clip_passed"] == h["joint"]
    assert sum(h["clip"]["counts"]) == h["clip"]["scored"] > 0  # scores are shown all the same
    assert h["keep_fractions"]["clip_score"]["run_fraction"] is None and h["keep_fractions"]["clip_score"]["table"]
    ia = h["aesthetic_edges"].index(4.5)
    jn = h["nsfw_edges"].index(0.5)
    assert np.array(h["joint"])[ia:, :jn].sum() == h["kept_at_thresholds"]


def test_a_run_before_its_thresholds_step_has_histograms_but_no_thresholds(tmp_path):
    from winnow.report.gallery import gallery_page
    from winnow.report.scores import score_histograms
    from winnow.stages.thresholds import ThresholdsConfig

    root, plan, _ = _built(tmp_path, ThresholdsConfig(), thresholds=False)
    h = score_histograms(root, plan)
    assert h["thresholds"] == {"aesthetic": None, "nsfw": None, "clip_score": None} and h["filters"] is None
    assert h["clip_filter_on"] is None and h["kept_at_thresholds"] is None and h["clip"]["kept_at_threshold"] is None
    assert np.array(h["joint"]).sum() == h["scored"] > 0 and len(h["keep_fractions"]["aesthetic"]["table"]) == 100
    page = gallery_page(root, plan)
    assert page["thresholds"] == h["thresholds"] and page["clip_filter_on"] is None and page["items"] == []


def test_missing_clip_scores_leave_the_kept_count_unknown_while_the_filter_is_on_and_sampling_says_so(tmp_path):
    from winnow.report.scores import score_histograms
    from winnow.stages.thresholds import ThresholdsConfig

    root, plan, _ = _built(tmp_path, ThresholdsConfig(clip_score_threshold=0.2), skip_clip=(3,))
    h = score_histograms(root, plan)  # row group 3's clip_score not committed (yet)
    assert h["clip"]["row_groups_without_clip_score"] == 1 and h["row_groups"] == plan.num_row_groups
    assert h["clip_filter_on"] is True and h["kept_at_thresholds"] is None and h["clip"]["kept_at_threshold"] >= 0
    sampled = score_histograms(root, plan, max_row_groups=4)
    assert sampled["sampled"] and sampled["row_groups"] < plan.num_row_groups
    assert sampled["scale"] == plan.num_row_groups / sampled["row_groups"]
    assert all(q["sampled"] for q in sampled["keep_fractions"].values())


GALLERY_ROWS = [
    {"record_id": 0, "key": "a", "outcome": "kept", "aesthetic_score": 6.0, "nsfw_score": 0.1, "clip_score": 0.3},
    {"record_id": 1, "key": "b", "outcome": "exact_duplicate", "duplicate_of": 0, "duplicate_of_key": "a"},
    {"record_id": 2, "key": "c", "outcome": "undecodable", "error": "truncated: 10 bytes"},
    {"record_id": 3, "key": "d", "outcome": "aesthetic", "aesthetic_score": 1.5, "nsfw_score": 0.1},
    {"record_id": 4, "key": "e", "outcome": "nsfw", "aesthetic_score": 6.0, "nsfw_score": 0.9},
    {"record_id": 5, "key": "f", "outcome": "no_caption", "aesthetic_score": 6.0, "nsfw_score": 0.1},
    {"record_id": 6, "key": "g", "outcome": "clip_score", "aesthetic_score": 6.0, "nsfw_score": 0.1, "clip_score": 0.11},
    {"record_id": 7, "key": "h", "outcome": "duplicate", "duplicate_of": 0, "duplicate_of_key": "a",
     "aesthetic_score": 6.0, "nsfw_score": 0.1, "clip_score": 0.3},
]


def test_every_outcome_is_in_the_gallery_and_each_has_its_reason(tmp_path):
    from tests.report._runs import commit_gallery
    from winnow.report.gallery import gallery_page
    from winnow.schemas import OUTCOMES as STATUS_OUTCOMES
    from winnow.stages.thresholds import ThresholdsConfig
    from winnow.stages.thumbnails import OUTCOMES

    assert set(OUTCOMES) == set(STATUS_OUTCOMES) and OUTCOMES[0] == "kept"
    root, plan, _ = _built(tmp_path, ThresholdsConfig(aesthetic_threshold=4.0, clip_score_threshold=0.2))
    store = CommitStore(root)
    stored = {"exact_duplicate": "same image bytes as record 0 ('a'); not decoded",
              "aesthetic": "aesthetic_score 1.5000 < threshold 4", "nsfw": "nsfw_score 0.9000 >= threshold 0.5",
              "no_caption": "no caption (.txt, or the json caption field) while the CLIP-score filter is on",
              "clip_score": "clip_score 0.1100 < threshold 0.2", "duplicate": "near duplicate of record 0 ('a')"}
    # Row group 0: written by the status-era write stage (reasons stored); row group 1: older, none stored.
    commit_gallery(store, plan, 0, [{**row, "error": stored.get(row["outcome"], row.get("error"))} for row in GALLERY_ROWS])
    commit_gallery(store, plan, 1, GALLERY_ROWS)
    page = gallery_page(root, plan, limit=100)
    assert page["clip_filter_on"] is True and page["thresholds"] == {"aesthetic": 4.0, "nsfw": 0.5, "clip_score": 0.2}
    by = {(i["row_group"], i["outcome"]): i for i in page["items"]}
    assert len(by) == 2 * len(OUTCOMES) and page["written"] == 2
    for outcome in OUTCOMES:
        new, old = by[(0, outcome)], by[(1, outcome)]
        if outcome in stored:
            assert new["reason"] == stored[outcome]
        assert old["reason"] and (old["reason"] == "kept") == (outcome == "kept")
    assert by[(0, "undecodable")]["reason"] == "undecodable: truncated: 10 bytes"
    assert by[(1, "exact_duplicate")]["reason"] == "same image bytes as a; not decoded"
    assert by[(1, "aesthetic")]["reason"] == "aesthetic 1.500 below threshold 4.0"
    assert by[(1, "no_caption")]["reason"] == "no caption while the CLIP-score filter is on"
    assert by[(1, "clip_score")]["reason"] == "clip score 0.110 below threshold 0.2"
    assert by[(1, "duplicate")]["reason"] == "near duplicate of a"
    assert by[(0, "clip_score")]["clip_score"] == pytest.approx(0.11) and by[(0, "nsfw")]["clip_score"] is None
    for outcome in OUTCOMES:
        only = gallery_page(root, plan, outcome=outcome)["items"]
        assert [i["outcome"] for i in only] == [outcome, outcome]
