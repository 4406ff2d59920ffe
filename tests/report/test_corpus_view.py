"""The corpus in the curation view (winnow.report.corpus_view, the write stage's corpus gallery):
three real runs that build one corpus (tests._corpus_data: later dates copy earlier dates'
records, byte for byte and re-encoded) with a takedown between the second and the third, and one
run of the same input without a corpus.

- the corpus view lists the published runs in generation order with their counts, the totals
  and the takedowns, and a run's place in it;
- a sampled ``corpus_duplicate`` shows the earlier corpus record's picture (read from the
  earlier run's output tar) and names its run and key; one whose original a takedown removed
  shows none; a ``takedown`` shows no picture and the takedown's reason;
- a run without a corpus: no corpus, the gallery and the write fingerprint of before.
"""

from __future__ import annotations

import glob
import io
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests._corpus_data import RUN_PARAMS, make_dates
from tests._tiny import tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DATES = ("2025-03-01", "2025-03-02", "2025-03-03")
REASON = "opt-out request"


def _key(date: str) -> str:
    return date.replace("-", "")


def _cfg(data: dict, date: str, out: Path, corpus: Path | None, run_key: str | None = None):
    extra = {"corpus_uri": str(corpus)} if corpus is not None else {}
    return tiny_config(input_uri=data["dates"][date]["input_uri"], output_root=str(out),
                       run_key=run_key or _key(date), buffer_size=8, max_partitions=2, **extra, **RUN_PARAMS)


def build_corpus_runs(root: Path) -> dict[str, Any]:
    """Runs of three dates into one corpus, a takedown (one uid, one key) after the second, and a
    run of the second date's input without a corpus (run key ``plain``); what each is."""
    from winnow.corpus import takedown
    from winnow.pipeline import run_all

    data = make_dates(root / "shards", dates=DATES)
    out, corpus = root / "out", root / "corpus"
    summaries = {}
    for date in DATES[:2]:
        summaries[date] = run_all(_cfg(data, date, out, corpus), backend="local", logical_date=date)
    # The takedown: the first date's record that the third date copies byte for byte (that copy
    # becomes a ``takedown``), and the original of one of the second date's re-encoded copies
    # (that corpus duplicate's earlier picture is gone).
    third = next(c for c in data["dates"][DATES[2]]["copies"]
                 if c["of_date"] == DATES[0] and c["how"] == "bytes" and c["of_outcome"] == "kept")
    gone = next(c for c in data["dates"][DATES[1]]["copies"]
                if c["how"] == "reencoded" and c["of_outcome"] == "kept" and c["of_uid"] != third["of_uid"])
    listed = root / "takedown.txt"
    listed.write_text(f"{third['of_uid']}\n{gone['of_key']}\n")
    removed = takedown(str(corpus), str(listed), reason=REASON, date="2025-03-02", storage=None)
    summaries[DATES[2]] = run_all(_cfg(data, DATES[2], out, corpus), backend="local", logical_date=DATES[2])
    plain = run_all(_cfg(data, DATES[1], out, None, run_key="plain"), backend="local")
    return {"data": data, "out": out, "corpus": corpus, "summaries": summaries, "takedown": removed,
            "taken_copy": third, "gone_copy": gone, "plain": plain}


@pytest.fixture(scope="module")
def corpus_runs(tmp_path_factory):
    return build_corpus_runs(tmp_path_factory.mktemp("corpus-view"))


def _root(runs: dict, run_key: str):
    from winnow.rowgroups import RunRoot

    return RunRoot(str(runs["out"] / run_key))


def _gallery(runs: dict, run_key: str, outcome: str) -> list[dict]:
    from winnow.data.index import load_index
    from winnow.report.gallery import gallery_page

    root = _root(runs, run_key)
    page = gallery_page(root, load_index(root).plan, outcome=outcome, limit=200)
    assert page["next"] is None
    return page["items"]


def _thumb(runs: dict, run_key: str, item: dict, which: str = "thumb") -> bytes:
    from winnow.data.index import load_index
    from winnow.report.gallery import read_thumbnail

    root = _root(runs, run_key)
    return read_thumbnail(root, load_index(root).plan, item["row_group"], item[f"{which}_offset"], item[f"{which}_size"])


def _tar_member(run_root: Path, key: str) -> bytes:
    """The image bytes of record ``key`` in the run's output tars."""
    for path in glob.glob(f"{run_root}/write/p*/rg*.tar"):
        with tarfile.open(path) as tar:
            for info in tar.getmembers():
                if info.name.startswith(key + ".") and not info.name.endswith((".txt", ".json")):
                    return tar.extractfile(info).read()
    raise AssertionError(f"no image of {key} in {run_root}")


def test_the_view_lists_the_runs_in_generation_order_the_totals_and_the_takedowns(corpus_runs):
    from winnow.report.corpus_view import RUN_COUNTS, corpus_view

    s = corpus_runs["summaries"]
    view = corpus_view(str(corpus_runs["corpus"]), None, _key(DATES[1]))
    assert [r["run_key"] for r in view["runs"]] == [_key(d) for d in DATES]
    assert [r["logical_date"] for r in view["runs"]] == list(DATES)
    # Generations: two publishes, the takedown, the third publish.
    assert [r["generation"] for r in view["runs"]] == [1, 2, 4] and view["generation"] == 4
    assert [r["this"] for r in view["runs"]] == [False, True, False]
    for r, date in zip(view["runs"], DATES):
        assert r["records"] == s[date]["kept"] and r["left_out"] == 0, r
        assert r["counts"] == {k: s[date][k] for k in RUN_COUNTS}, r
        assert r["published_at"]
    assert s[DATES[1]]["corpus_duplicates"] > 0 and s[DATES[2]]["takedowns"] == 1
    assert view["runs"][2]["counts"]["takedowns"] == 1 and view["runs"][1]["counts"]["corpus_duplicates"] == 3
    added = sum(s[d]["kept"] for d in DATES)
    assert view["published_records"] == added and view["taken_down"] == 2 and view["records"] == added - 2
    from winnow.corpus import iter_records

    assert sum(t.num_rows for t in iter_records(str(corpus_runs["corpus"]))) == view["records"]
    (t,) = view["takedowns"]
    assert (t["generation"], t["date"], t["reason"], t["identifiers"], t["removed"], t["run_keys"]) == \
        (3, "2025-03-02", REASON, 2, 2, [_key(DATES[0])])
    assert t["id"] == corpus_runs["takedown"]["takedown"] and t["files_rewritten"] > 0
    assert view["this_run"] == {"run_key": _key(DATES[1]), "published": True, "generation": 2,
                                "logical_date": DATES[1]}
    other = corpus_view(str(corpus_runs["corpus"]), None, "20991231")
    assert other["this_run"] == {"run_key": "20991231", "published": False, "generation": None, "logical_date": None}
    assert not any(r["this"] for r in other["runs"])


def test_which_corpus_a_run_builds_comes_from_its_run_root_then_its_conf(corpus_runs, tmp_path):
    from winnow.report.corpus_view import run_corpus, run_corpus_uri
    from winnow.rowgroups import RunRoot

    corpus = str(corpus_runs["corpus"])
    for date in DATES:
        assert run_corpus_uri(_root(corpus_runs, _key(date))) == corpus
        # What the run used wins over a conf that names something else now.
        assert run_corpus_uri(_root(corpus_runs, _key(date)), {"corpus_uri": "/elsewhere"}) == corpus
    plain = _root(corpus_runs, "plain")
    assert run_corpus_uri(plain) is None and run_corpus(plain) is None
    # A run that has not reached its corpus steps: its conf says which corpus (blank: none).
    fresh = RunRoot(str(tmp_path / "20250304"))
    assert run_corpus_uri(fresh, {"corpus_uri": corpus}) == corpus
    assert run_corpus_uri(fresh, {"corpus_uri": "  "}) is None and run_corpus_uri(fresh, {}) is None
    view = run_corpus(fresh, {"corpus_uri": corpus})
    assert view["this_run"]["published"] is False and len(view["runs"]) == 3


def test_a_corpus_duplicate_shows_the_earlier_records_picture_and_names_its_run_and_key(corpus_runs):
    from PIL import Image

    from winnow.stages.thumbnails import make_thumbnail

    data = corpus_runs["data"]
    run_key = _key(DATES[1])
    items = _gallery(corpus_runs, run_key, "corpus_duplicate")
    copies = {c["key"]: c for c in data["dates"][DATES[1]]["copies"] if c["of_outcome"] == "kept"}
    assert sorted(i["key"] for i in items) == sorted(copies)
    gone = corpus_runs["gone_copy"]["key"]
    pictures = 0
    for item in items:
        copy = copies[item["key"]]
        assert (item["duplicate_of_run"], item["duplicate_of_key"], item["duplicate_of_uid"]) == \
            (_key(copy["of_date"]), copy["of_key"], copy["of_uid"]), item
        assert copy["of_key"] in item["reason"] and _key(copy["of_date"]) in item["reason"]
        if item["key"] == gone:
            # Its original was taken down after this run: no picture of it is left in the gallery.
            assert item["original_thumb_offset"] is None and item["original_thumb_size"] is None, item
            continue
        original = _thumb(corpus_runs, run_key, item, "original_thumb")
        with Image.open(io.BytesIO(original)) as img:
            img.load()
            assert img.format == "JPEG" and max(img.size) <= 256 and min(img.size) > 0
        # The earlier record's own picture: the thumbnail of its image in the earlier run's tar.
        earlier = _tar_member(corpus_runs["out"] / _key(copy["of_date"]), copy["of_key"])
        assert original == make_thumbnail(earlier)
        own = _thumb(corpus_runs, run_key, item)
        if copy["how"] == "bytes":
            # Same bytes, same picture: the original is the row's own thumbnail, nothing read twice.
            assert item["original_thumb_offset"] == item["thumb_offset"] and original == own
        else:
            assert item["original_thumb_offset"] != item["thumb_offset"] and original != own
        pictures += 1
    assert pictures == len(items) - 1 >= 2


def test_a_takedown_shows_no_picture_and_the_takedowns_reason(corpus_runs):
    items = _gallery(corpus_runs, _key(DATES[2]), "takedown")
    assert [i["key"] for i in items] == [corpus_runs["taken_copy"]["key"]]
    (item,) = items
    assert item["thumb_offset"] is None and item["original_thumb_offset"] is None
    assert (item["takedown_reason"], item["takedown_date"]) == (REASON, "2025-03-02")
    assert item["reason"].startswith("listed by a takedown") and corpus_runs["taken_copy"]["of_uid"] in item["reason"]
    # The third date's other corpus duplicates name records of both earlier runs.
    runs = {i["duplicate_of_run"] for i in _gallery(corpus_runs, _key(DATES[2]), "corpus_duplicate")}
    assert runs == {_key(DATES[0]), _key(DATES[1])}


def test_corpus_originals_reads_records_the_corpus_holds_and_skips_taken_down_ones(corpus_runs):
    from winnow.stages.write import corpus_originals

    copies = [c for c in corpus_runs["data"]["dates"][DATES[1]]["copies"] if c["of_outcome"] == "kept"]
    gone = corpus_runs["gone_copy"]["of_uid"]
    kept = [c for c in copies if c["of_uid"] != gone]
    uids = [c["of_uid"] for c in copies]
    found = corpus_originals(str(corpus_runs["corpus"]), None, uids)
    assert sorted(found) == sorted(c["of_uid"] for c in kept) and gone not in found
    for c in kept:
        assert found[c["of_uid"]] == _tar_member(corpus_runs["out"] / _key(c["of_date"]), c["of_key"])
    # Only where asked: the others are known to be there, not read.
    lazy = corpus_originals(str(corpus_runs["corpus"]), None, uids, read=set())
    assert lazy == dict.fromkeys(found)
    assert corpus_originals(str(corpus_runs["corpus"]), None, ["0" * 32]) == {}


def test_a_run_without_a_corpus_keeps_its_gallery_layout_and_write_fingerprint(corpus_runs):
    import pyarrow.parquet as pq

    from winnow.stages.thumbnails import GALLERY_SCHEMA
    from winnow.stages.write import CORPUS_GALLERY_FIELDS, WriteStage, gallery_schema, write_config

    plain = corpus_runs["out"] / "plain"
    galleries = sorted(glob.glob(f"{plain}/write/p*/rg*.gallery"))
    assert galleries and all(pq.read_schema(p).remove_metadata() == GALLERY_SCHEMA for p in galleries)
    with_corpus = sorted(glob.glob(f"{corpus_runs['out']}/{_key(DATES[1])}/write/p*/rg*.gallery"))
    assert with_corpus and all(pq.read_schema(p).remove_metadata() == gallery_schema(True) for p in with_corpus)
    assert gallery_schema(True).names == [*GALLERY_SCHEMA.names, *(n for n, _ in CORPUS_GALLERY_FIELDS)]
    data = corpus_runs["data"]
    assert WriteStage(write_config(_cfg(data, DATES[1], corpus_runs["out"], None))).fingerprint_config() == \
        {"format": "webdataset-v1", "mtime": 946684800}
    assert WriteStage(write_config(_cfg(data, DATES[1], corpus_runs["out"], corpus_runs["corpus"]))).fingerprint_config() == \
        {"format": "webdataset-v1", "mtime": 946684800, "corpus_uri": str(corpus_runs["corpus"])}
    # The same input without a corpus keeps what the corpus run dropped as corpus duplicates.
    assert corpus_runs["plain"]["kept"] == corpus_runs["summaries"][DATES[1]]["kept"] + \
        corpus_runs["summaries"][DATES[1]]["corpus_duplicates"]
    assert "corpus_duplicates" not in corpus_runs["plain"] and "takedowns" not in corpus_runs["plain"]
