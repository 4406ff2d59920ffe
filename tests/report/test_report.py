"""The read side of a run (winnow.report): row-group map with failures, gallery, histograms.

One real run (tiny model, local backend) whose write stage fails on one row group through the
test-only fault hook: the map must show it failed with its error, everything else committed.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests._tiny import all_filters, off_threshold
from tests.report._runs import gallery_rows
from winnow.rowgroups import CommitStore

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.report._runs import failed_write_run
    from winnow.data.index import load_index
    from winnow.stages.write import STAGE

    root = tmp_path_factory.mktemp("report")
    cfg = failed_write_run(root, run_key="r", shards=2, per_shard=12, seed=3, max_partitions=3, failed_row_group=2)
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
    from winnow.registry import stage_order
    from winnow.report.gallery import gallery_page
    from winnow.report.progress import row_group_map

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
    from winnow.filters import VALUE_COLUMNS
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
        assert all(name in i for name, _ in VALUE_COLUMNS)  # every filter's value, None where it has none
    assert page["thresholds"] == all_filters({"aesthetic": 3.0, "nsfw": 0.6}, off_threshold)
    assert page["enabled"] == all_filters({"aesthetic": True, "nsfw": True}, False)
    assert page["written"] == plan.num_row_groups - 1 and f"{plan.num_row_groups - 1} of" in page["waiting"]
    kept = gallery_page(run["root"], plan, outcome="kept", limit=2)
    assert kept["items"] and all(i["outcome"] == "kept" for i in kept["items"]) and kept["next"] is not None
    with pytest.raises(GalleryError):
        gallery_page(run["root"], plan, outcome="bogus")
    with pytest.raises(GalleryError):
        read_thumbnail(run["root"], plan, 2, 0, 10)  # the failed row group has no committed gallery
    with pytest.raises(GalleryError):
        read_thumbnail(run["root"], plan, shown[0]["row_group"], shown[0]["thumb_offset"] + 1, 10)


# ---- score histograms and the what-if --------------------------------------------------------

def whatif_kept(h, limits):
    """What the run view counts for a what-if (a Python twin of winnow.js): the records of the
    what-if cells that every filter on keeps. ``limits``: {filter: threshold, on an edge of that
    filter's histogram; None or absent: the filter is off}. A threshold on an edge keeps whole
    bins: for keep ">=" the bins whose lower edge is at least it, for "<" and "<=" the bins whose
    upper edge is at most it; bin -1 (no value) fails a filter that is on, bin -2 (a value no one
    knows, which the filter lets pass) passes it."""
    keeps = []
    for f in h["filters"]:
        t = limits.get(f["name"])
        if t is None:
            keeps.append(lambda b: True)
            continue
        edges = f["edges"]
        assert t in edges, (f["name"], t, edges)
        if f["keep"] == ">=":
            keeps.append(lambda b, e=edges, t=t: b == -2 or (b >= 0 and e[b] >= t))
        else:
            keeps.append(lambda b, e=edges, t=t: b == -2 or (b >= 0 and e[b + 1] <= t))
    return sum(cell[-1] for cell in h["whatif"]["cells"] if all(k(b) for k, b in zip(keeps, cell[:-1])))


def run_limits(h):
    """The run's own thresholds as what-if limits: each filter's threshold while it is on."""
    return {f["name"]: f["threshold"] if h["enabled"][f["name"]] else None for f in h["filters"]}


def _by_name(h):
    return {f["name"]: f for f in h["filters"]}


def _consistent(h):
    """What holds for every payload: one histogram per filter in FILTERS order adding up to its
    scored records, the run's threshold on an edge, the what-if cells made of the same records
    (each filter's bins adding up to its histogram), and each filter's own kept count the cells'."""
    from winnow.filters import FILTERS

    assert [f["name"] for f in h["filters"]] == [spec.name for spec in FILTERS] == list(h["enabled"])
    assert h["population"] == h["records"] - h["exact_duplicates"] - h["undecodable"] - h["duplicates"]
    cells = h["whatif"]["cells"]
    assert not h["whatif"]["sampled"] and h["whatif"]["scale"] == 1.0
    assert sum(c[-1] for c in cells) == h["whatif"]["records"] == h["population"]
    assert all(len(c) == len(FILTERS) + 1 for c in cells) and len({tuple(c[:-1]) for c in cells}) == len(cells)
    for i, (f, spec) in enumerate(zip(h["filters"], FILTERS)):
        assert (f["keep"], f["outcome"], f["enabled"]) == (spec.keep, spec.outcome, h["enabled"][spec.name])
        assert f["threshold"] == h["thresholds"][spec.name]
        assert len(f["counts"]) == len(f["edges"]) - 1 and f["edges"] == sorted(f["edges"])
        assert sum(f["counts"]) == f["scored"]
        per_bin = [0] * len(f["counts"])
        for c in cells:
            if c[i] >= 0:
                per_bin[c[i]] += c[-1]
        assert per_bin == f["counts"], spec.name  # the cells hold the histogram's records, bin for bin
        if f["enabled"] and f["threshold"] is not None:
            assert f["threshold"] in f["edges"], spec.name  # on an edge: the kept share is exact
            assert f["kept_at_threshold"] == whatif_kept(h, {spec.name: f["threshold"]})
        else:
            assert f["kept_at_threshold"] is None
        assert (f["fraction_table"] is None) == (spec.fraction is None) == (f["fraction_scored"] is None)


def test_histograms_count_every_scored_record_and_the_kept_share_matches_the_run(run):
    from winnow.report.scores import score_histograms
    from winnow.stages.status import count_outcomes

    h = score_histograms(run["root"], run["plan"])
    _consistent(h)
    # The same numbers as the run's status stage (the outcome rule's own counts).
    counts = count_outcomes(run["root"], run["plan"])
    assert (h["records"], h["exact_duplicates"], h["undecodable"], h["duplicates"], h["kept_at_thresholds"]) == \
        (counts["records"], counts["exact_duplicates"], counts["undecodable"], counts["duplicates"], counts["kept"])
    assert h["population"] > 0 and h["row_groups"] == h["row_groups_total"] == run["plan"].num_row_groups
    assert h["thresholds"] == all_filters({"aesthetic": 3.0, "nsfw": 0.6}, off_threshold)
    assert h["enabled"] == all_filters({"aesthetic": True, "nsfw": True}, False)
    by = _by_name(h)
    assert by["clip_score"]["enabled"] is False and by["clip_score"]["kept_at_threshold"] is None
    assert 3.0 in by["aesthetic"]["edges"] and 0.6 in by["nsfw"]["edges"]
    assert whatif_kept(h, run_limits(h)) == h["kept_at_thresholds"] == counts["kept"]
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


def _status_kept(root, r):
    """The run's kept count by the engine's outcome rule with the committed thresholds."""
    from winnow.stages.kept import filter_outcomes
    from winnow.stages.thresholds import load_thresholds

    out = filter_outcomes(load_thresholds(CommitStore(root)), r.columns())
    return int(((out == "") & ~r.duplicate).sum())


def test_quantile_tables_pick_exactly_what_the_thresholds_step_picks(tmp_path):
    from winnow.report.scores import FRACTIONS, score_histograms
    from winnow.stages.thresholds import ThresholdsConfig, keep_count, kth_best

    config = ThresholdsConfig(aesthetic_keep_fraction=0.37, clip_score_keep_fraction=0.6, nsfw_threshold=0.7)
    root, plan, r = _built(tmp_path, config)
    h = score_histograms(root, plan)
    _consistent(h)
    assert h["row_groups"] == plan.num_row_groups and not h["sampled"] and h["scale"] == 1.0
    by = _by_name(h)
    for name, values in (("aesthetic", r.aesthetic), ("clip_score", r.clip)):
        f = by[name]
        q = f["fraction_table"]
        scores = _all_scores(values)
        n = len(scores)
        assert f["fraction_scored"] == n and f["keep"] == ">=" and [row["fraction"] for row in q] == list(FRACTIONS)
        chunks = np.array_split(values, 7)  # as the step reads them: a chunk at a time
        for row in q:
            k = keep_count(row["fraction"], n)
            assert row["threshold"] == kth_best(lambda c=chunks: iter(c), k), row  # the step's own selection
            assert row["keeps"] == int((scores >= row["threshold"]).sum()) >= k
        assert [row["threshold"] for row in q] == sorted((row["threshold"] for row in q), reverse=True)
        # The run's own fraction: the table's threshold is the one the run used.
        run_row = next(row for row in q if row["fraction"] == f["run_fraction"])
        assert run_row["threshold"] == f["threshold"] == h["thresholds"][name] == h["entries"][name]["threshold"]
        assert h["entries"][name]["keep_fraction"] == f["run_fraction"]
    assert (by["aesthetic"]["run_fraction"], by["clip_score"]["run_fraction"], by["nsfw"]["run_fraction"]) == (0.37, 0.6, None)
    assert by["nsfw"]["fraction_table"] is None and by["nsfw"]["fraction_scored"] is None
    assert h["thresholds"]["nsfw"] == 0.7
    assert h["enabled"] == all_filters({"aesthetic": True, "nsfw": True, "clip_score": True}, False)
    # Same table from a table-only check: ties make "keeps" exceed k (aesthetic scores are rounded).
    assert any(row["keeps"] > keep_count(row["fraction"], by["aesthetic"]["fraction_scored"])
               for row in by["aesthetic"]["fraction_table"])
    assert whatif_kept(h, run_limits(h)) == h["kept_at_thresholds"] == _status_kept(root, r) == r.kept_by(run_limits(h))


def test_clip_histogram_and_the_kept_count_use_the_thresholds_the_run_used(tmp_path):
    from winnow.report.scores import score_histograms
    from winnow.stages.thresholds import ThresholdsConfig

    config = ThresholdsConfig(aesthetic_keep_fraction=0.5, clip_score_threshold=0.24, nsfw_threshold=0.8)
    root, plan, r = _built(tmp_path, config)
    h = score_histograms(root, plan)
    _consistent(h)
    clip = _by_name(h)["clip_score"]
    population = r.population
    assert clip["enabled"] is True and clip["threshold"] == 0.24 == h["thresholds"]["clip_score"]
    assert sum(clip["counts"]) == clip["scored"] == int((~np.isnan(r.clip) & population).sum())
    assert clip["threshold"] in clip["edges"] and len(clip["counts"]) == len(clip["edges"]) - 1
    i = clip["edges"].index(clip["threshold"])
    assert sum(clip["counts"][i:]) == clip["kept_at_threshold"] == int((r.clip[population] >= np.float32(0.24)).sum())
    # Records shown without a caption: dropped as no_caption while the filter is on.
    assert clip["missing"] == {"outcome": "no_caption", "records": int((population & ~r.has_caption).sum())}
    assert clip["missing"]["records"] > 0 and clip["row_groups_without"] == 0
    assert (h["records"], h["exact_duplicates"], h["undecodable"], h["duplicates"], h["population"]) == \
        (r.n, int(r.exact.sum()), int((~r.exact & ~r.decoded).sum()), int((r.decoded & r.duplicate).sum()),
         int(population.sum()))
    # The run's kept count is the engine's outcome rule with the committed thresholds.
    kept = _status_kept(root, r)
    assert h["kept_at_thresholds"] == kept == whatif_kept(h, run_limits(h)) == r.kept_by(run_limits(h)) > 0
    # The clip filter drops records: without it the same thresholds keep more.
    assert whatif_kept(h, {**run_limits(h), "clip_score": None}) == r.kept_by({**run_limits(h), "clip_score": None}) > kept
    # Other thresholds (each on an edge of its histogram, as the view's sliders): the same count
    # as the records themselves give.
    by = _by_name(h)
    other = {name: by[name]["edges"][len(by[name]["edges"]) // k] for name, k in
             (("aesthetic", 3), ("nsfw", 2), ("clip_score", 4))}
    assert other != h["thresholds"]
    assert whatif_kept(h, other) == r.kept_by(other) > 0
    for name in other:  # one filter at a time too
        alone = {name: other[name]}
        assert whatif_kept(h, alone) == r.kept_by(alone)


def test_a_run_with_the_clip_filter_off_says_so(tmp_path):
    from winnow.report.scores import score_histograms
    from winnow.stages.thresholds import ThresholdsConfig

    root, plan, r = _built(tmp_path, ThresholdsConfig(aesthetic_threshold=4.5))
    h = score_histograms(root, plan)
    _consistent(h)
    clip = _by_name(h)["clip_score"]
    assert h["enabled"] == all_filters({"aesthetic": True, "nsfw": True}, False)
    assert h["entries"]["clip_score"]["enabled"] is False
    assert clip["enabled"] is False and clip["kept_at_threshold"] is None
    assert sum(clip["counts"]) == clip["scored"] > 0  # scores are shown all the same
    assert clip["run_fraction"] is None and len(clip["fraction_table"]) == 100
    assert 4.5 in _by_name(h)["aesthetic"]["edges"] and 0.5 in _by_name(h)["nsfw"]["edges"]
    kept = _status_kept(root, r)
    assert whatif_kept(h, run_limits(h)) == h["kept_at_thresholds"] == kept == r.kept_by(run_limits(h))
    # Records without a caption are kept while the filter is off: the what-if that turns it on
    # (at an edge of its histogram) drops them.
    on = {**run_limits(h), "clip_score": clip["edges"][1]}
    assert whatif_kept(h, on) == r.kept_by(on) < kept


def test_a_run_before_its_thresholds_step_has_histograms_but_no_thresholds(tmp_path):
    from winnow.report.gallery import gallery_page
    from winnow.report.scores import score_histograms
    from winnow.stages.thresholds import ThresholdsConfig

    root, plan, r = _built(tmp_path, ThresholdsConfig(), thresholds=False)
    h = score_histograms(root, plan)
    _consistent(h)
    assert h["thresholds"] == all_filters({}, None) and h["entries"] is None
    assert h["enabled"] == all_filters({}, None) and h["kept_at_thresholds"] is None
    for f in h["filters"]:
        assert f["threshold"] is None and f["kept_at_threshold"] is None and f["run_fraction"] is None
        assert sum(f["counts"]) == f["scored"] > 0
    assert h["population"] == int(r.population.sum()) > 0
    assert len(_by_name(h)["aesthetic"]["fraction_table"]) == 100
    page = gallery_page(root, plan)
    assert page["thresholds"] == h["thresholds"] and page["enabled"] == h["enabled"] and page["items"] == []


def test_missing_clip_scores_leave_the_kept_count_unknown_while_the_filter_is_on_and_sampling_says_so(tmp_path):
    from winnow.report.scores import score_histograms
    from winnow.stages.thresholds import ThresholdsConfig

    root, plan, r = _built(tmp_path, ThresholdsConfig(clip_score_threshold=0.2), skip_clip=(3,))
    h = score_histograms(root, plan)  # row group 3's clip_score not committed (yet)
    _consistent(h)
    by = _by_name(h)
    assert by["clip_score"]["row_groups_without"] == 1 and h["row_groups"] == plan.num_row_groups
    assert by["aesthetic"]["row_groups_without"] == by["nsfw"]["row_groups_without"] == 0
    assert h["enabled"]["clip_score"] is True and h["kept_at_thresholds"] is None
    lo, hi = plan.row_group_range(3)
    read = np.ones(r.n, bool)
    read[lo:hi] = False
    assert by["clip_score"]["scored"] == int((r.population & read & ~np.isnan(r.clip)).sum())
    assert by["clip_score"]["kept_at_threshold"] == int((r.population & read & (r.clip >= np.float32(0.2))).sum()) > 0
    sampled = score_histograms(root, plan, max_row_groups=4)
    step = -(-plan.num_row_groups // 4)
    read = np.zeros(r.n, bool)
    for rg in range(0, plan.num_row_groups, step):
        lo, hi = plan.row_group_range(rg)
        read[lo:hi] = True
    assert sampled["sampled"] and sampled["row_groups"] == len(range(0, plan.num_row_groups, step)) < plan.num_row_groups
    assert sampled["scale"] == plan.num_row_groups / sampled["row_groups"]
    # The quantile tables of a sample: of the scores of the row groups read.
    s_by = _by_name(sampled)
    assert s_by["aesthetic"]["fraction_scored"] == int((read & ~np.isnan(r.aesthetic)).sum()) < \
        by["aesthetic"]["fraction_scored"]
    assert sampled["records"] == int(read.sum()) and sampled["population"] == int((read & r.population).sum())


#: One gallery row of every outcome: these, and one more of each outcome they do not name (an
#: outcome a filter added later).
NAMED_GALLERY_ROWS = [
    {"record_id": 0, "key": "a", "outcome": "kept", "aesthetic_score": 6.0, "nsfw_score": 0.1, "clip_score": 0.3},
    {"record_id": 1, "key": "b", "outcome": "exact_duplicate", "duplicate_of": 0, "duplicate_of_key": "a"},
    {"record_id": 2, "key": "c", "outcome": "undecodable", "error": "truncated: 10 bytes"},
    {"record_id": 3, "key": "d", "outcome": "aesthetic", "aesthetic_score": 1.5, "nsfw_score": 0.1},
    {"record_id": 4, "key": "e", "outcome": "nsfw", "aesthetic_score": 6.0, "nsfw_score": 0.9},
    {"record_id": 5, "key": "f", "outcome": "no_caption", "aesthetic_score": 6.0, "nsfw_score": 0.1},
    {"record_id": 6, "key": "g", "outcome": "clip_score", "aesthetic_score": 6.0, "nsfw_score": 0.1, "clip_score": 0.11},
    {"record_id": 7, "key": "h", "outcome": "duplicate", "duplicate_of": 0, "duplicate_of_key": "a",
     "aesthetic_score": 6.0, "nsfw_score": 0.1, "clip_score": 0.3},
    # A run with a corpus: dropped before decode (no scores), the corpus record named by its key.
    {"record_id": 8, "key": "i", "outcome": "takedown"},
    {"record_id": 9, "key": "j", "outcome": "corpus_duplicate", "duplicate_of_key": "k"},
]
GALLERY_ROWS = gallery_rows(NAMED_GALLERY_ROWS)


def test_every_outcome_is_in_the_gallery_and_each_has_its_reason(tmp_path):
    from tests.report._runs import commit_gallery
    from winnow.filters import BY_NAME, FILTERS, VALUE_COLUMNS
    from winnow.report.gallery import gallery_page
    from winnow.schemas import OUTCOMES as STATUS_OUTCOMES
    from winnow.stages.thresholds import ThresholdsConfig
    from winnow.stages.thumbnails import OUTCOMES

    assert set(OUTCOMES) == set(STATUS_OUTCOMES) and OUTCOMES[0] == "kept"
    assert {row["outcome"] for row in GALLERY_ROWS} == set(OUTCOMES) and len(GALLERY_ROWS) == len(OUTCOMES)
    root, plan, _ = _built(tmp_path, ThresholdsConfig(aesthetic_threshold=4.0, clip_score_threshold=0.2))
    store = CommitStore(root)
    named = {row["outcome"] for row in NAMED_GALLERY_ROWS}
    stored = {"exact_duplicate": "same image bytes as record 0 ('a'); not decoded",
              "aesthetic": "aesthetic_score 1.5000 < threshold 4", "nsfw": "nsfw_score 0.9000 >= threshold 0.5",
              "no_caption": "no caption (.txt, or the json caption field) while the CLIP-score filter is on",
              "clip_score": "clip_score 0.1100 < threshold 0.2", "duplicate": "near duplicate of record 0 ('a')",
              **{o: f"the reason the status stage gave for {o}" for o in OUTCOMES if o not in named}}
    # Row group 0: written by the status-era write stage (reasons stored); row group 1: older, none stored.
    commit_gallery(store, plan, 0, [{**row, "error": stored.get(row["outcome"], row.get("error"))} for row in GALLERY_ROWS])
    commit_gallery(store, plan, 1, GALLERY_ROWS)
    page = gallery_page(root, plan, limit=100)
    assert page["enabled"] == all_filters({"aesthetic": True, "nsfw": True, "clip_score": True}, False)
    assert page["thresholds"] == all_filters({"aesthetic": 4.0, "nsfw": 0.5, "clip_score": 0.2}, off_threshold)
    by = {(i["row_group"], i["outcome"]): i for i in page["items"]}
    assert len(by) == 2 * len(OUTCOMES) and page["written"] == 2
    for outcome in OUTCOMES:
        new, old = by[(0, outcome)], by[(1, outcome)]
        if outcome in stored:
            assert new["reason"] == stored[outcome]
        assert old["reason"] and (old["reason"] == "kept") == (outcome == "kept")
        assert all(name in new and name in old for name, _ in VALUE_COLUMNS)
    assert by[(0, "kept")]["reason"] == "kept"
    assert by[(0, "undecodable")]["reason"] == by[(1, "undecodable")]["reason"] == "undecodable: truncated: 10 bytes"
    # Old galleries: the reason in the words of the run's thresholds.
    assert by[(1, "exact_duplicate")]["reason"] == "same image bytes as a; not decoded"
    assert by[(1, "aesthetic")]["reason"] == f"{BY_NAME['aesthetic'].label} 1.500: dropped at threshold 4.0"
    assert by[(1, "nsfw")]["reason"] == f"{BY_NAME['nsfw'].label} 0.900: dropped at threshold 0.5"
    assert by[(1, "no_caption")]["reason"] == BY_NAME["clip_score"].missing.reason
    assert by[(1, "clip_score")]["reason"] == f"{BY_NAME['clip_score'].label} 0.110: dropped at threshold 0.2"
    assert by[(1, "duplicate")]["reason"] == "near duplicate of a"
    assert by[(1, "takedown")]["reason"] == "listed by a takedown; not decoded"
    assert by[(1, "corpus_duplicate")]["reason"] == "already in the corpus: record k"
    for outcome in set(OUTCOMES) - named:  # the rows gallery_rows added: each a filter's, its value 1
        spec = next(f for f in FILTERS if outcome in (f.outcome, f.missing and f.missing.outcome))
        assert by[(1, outcome)]["reason"] == (
            spec.missing.reason if spec.missing is not None and spec.missing.outcome == outcome
            else f"{spec.label} 1.000: dropped at threshold {page['thresholds'][spec.name]}"), outcome
    assert by[(0, "clip_score")]["clip_score"] == pytest.approx(0.11) and by[(0, "nsfw")]["clip_score"] is None
    for outcome in OUTCOMES:
        only = gallery_page(root, plan, outcome=outcome)["items"]
        assert [i["outcome"] for i in only] == [outcome, outcome]



@pytest.mark.parametrize("case", ["score_equal_to_an_absolute_threshold", "fraction_keeping_the_top_score",
                                  "nsfw_scores_of_1_at_threshold_1", "aspect_ratio_equal_to_a_max_aspect_ratio",
                                  "image_size_unknown_while_the_size_filters_are_on"])
def test_scores_at_the_threshold_are_on_the_side_the_run_put_them(tmp_path, case):
    from tests.report._runs import random_records
    from winnow.report.scores import score_histograms
    from winnow.stages.thresholds import ThresholdsConfig

    r = random_records(157, seed=11)
    every = np.arange(r.n) % 3 == 0
    if case == "score_equal_to_an_absolute_threshold":
        # A CLIP score stored as float32(0.24): 0.24 >= 0.24 in float32, as status compares it.
        config = ThresholdsConfig(clip_score_threshold=0.24)
        r.clip[r.has_caption & every] = np.float32(0.24)
    elif case == "fraction_keeping_the_top_score":
        config = ThresholdsConfig(clip_score_keep_fraction=0.001)  # k = 1: the threshold is the best score
    elif case == "aspect_ratio_equal_to_a_max_aspect_ratio":
        # 3:1 images at DataComp's max_aspect_ratio = 3: kept ("<="), their ratio on the threshold's edge.
        config = ThresholdsConfig(max_aspect_ratio=3.0)
        r.other["width"][every], r.other["height"][every] = 600, 200
    elif case == "image_size_unknown_while_the_size_filters_are_on":
        # Decoded images whose header the index could not read: the size filters pass them (unknown_passes).
        config = ThresholdsConfig(min_image_side=200, max_aspect_ratio=3.0)
        r.other["width"][r.decoded & every] = r.other["height"][r.decoded & every] = np.nan
    else:
        # A saturated nsfw probability (1.0 in float32) is dropped by nsfw_threshold = 1.0.
        config = ThresholdsConfig(nsfw_threshold=1.0)
        r.nsfw[r.decoded & every] = np.float32(1.0)
    root, plan, r = _built(tmp_path, config, records=r)
    h = score_histograms(root, plan)
    assert h["kept_at_thresholds"] == _status_kept(root, r) == r.kept_by(run_limits(h))
    assert whatif_kept(h, run_limits(h)) == h["kept_at_thresholds"]
    _consistent(h)


@pytest.mark.parametrize("config", [{"aesthetic_threshold": 4.5},
                                    {"aesthetic_keep_fraction": 0.37, "clip_score_threshold": 0.2}])
def test_a_what_if_at_any_edge_keeps_what_that_threshold_keeps(tmp_path, config):
    """The view's sliders stop on the edges: at each, the cells it sums are the records a run with
    that threshold would keep."""
    from tests.report._runs import random_records
    from winnow.report.scores import score_histograms
    from winnow.stages.thresholds import ThresholdsConfig

    root, plan, r = _built(tmp_path, ThresholdsConfig(**config), records=random_records(157, seed=3))
    h = score_histograms(root, plan)
    wrong = [(f["name"], e, whatif_kept(h, {f["name"]: e}), r.kept_by({f["name"]: e}))
             for f in h["filters"] for e in f["edges"]]
    assert [w for w in wrong if w[2] != w[3]] == []


def test_a_keep_fraction_of_a_filter_keeping_low_values_picks_the_lowest_as_the_thresholds_step_does():
    from winnow.filters import BY_NAME
    from winnow.report.scores import quantile_table

    low = next(f for f in BY_NAME.values() if f.fraction is not None and f.keep != ">=")
    values = np.array([1, 3, 3, 2, np.nan], np.float32)
    table = {round(r["fraction"], 2): r for r in quantile_table(values, low)}
    for f, k_lowest, keeps in ((0.26, 1.0, 1), (0.51, 2.0, 2), (0.76, 3.0, 4)):
        row = table[f]
        assert row["keeps"] == keeps and int(low.passes(values, row["threshold"]).sum()) == keeps
        assert low.passes(np.array([k_lowest], np.float32), row["threshold"])[0]
