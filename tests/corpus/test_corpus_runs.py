"""Runs that build one corpus (``corpus_uri``): three dates whose inputs copy earlier dates'
records (``tests._corpus_data``), with the real pipeline (``run_all``, the tiny model), real tars
and Parquet.

- one date after another: every copy of an earlier kept image is a ``corpus_duplicate`` naming
  it (byte copies never decoded), copies of dropped ones get their original's outcome again;
- the same dates interleaved as a parallel backfill interleaves them (a later date indexes and
  pre-checks before the earlier one publishes): the same corpus, tars and counts;
- a takedown between two dates: the later run drops the listed records as ``takedown``, never
  decoded.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests._corpus_data import RUN_PARAMS, make_dates
from tests._tiny import tiny_config

pytestmark = pytest.mark.slow

DATES = ("2025-03-01", "2025-03-02", "2025-03-03")


def _cfg(data: dict, date: str, out: Path, corpus: Path):
    return tiny_config(input_uri=data["dates"][date]["input_uri"], output_root=str(out), run_key=date.replace("-", ""),
                       buffer_size=8, max_partitions=2, corpus_uri=str(corpus), **RUN_PARAMS)


def _run(data: dict, date: str, out: Path, corpus: Path) -> dict:
    from winnow.pipeline import run_all

    return run_all(_cfg(data, date, out, corpus), backend="local", logical_date=date)


def _status(run_root: Path) -> dict[str, dict]:
    from winnow.stages.status import iter_status

    rows = pa.concat_tables(list(iter_status(str(run_root)))).to_pylist()
    return {r["key"]: r for r in rows if r["record_id"] is not None}


def _corpus_state(corpus: Path, out: Path) -> dict:
    """What a corpus delivers: its runs, its manifest (without where the files live) and the
    bytes of every curated tar of its runs."""
    from winnow.corpus import iter_records, open_corpus

    head = open_corpus(str(corpus)).head()
    rows = [r for t in iter_records(str(corpus)) for r in t.drop_columns(["run_root"]).to_pylist()]
    tars = {str(Path(p).relative_to(out)): Path(p).read_bytes() for p in sorted(glob.glob(f"{out}/*/write/p*/rg*.tar"))}
    runs = [{k: r[k] for k in ("run_key", "logical_date", "generation", "records", "counts")} for r in head.runs]
    return {"runs": runs, "records": sorted(rows, key=lambda r: (r["run_key"], r["key"])), "tars": tars,
            "generation": head.generation}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dates(tmp_path_factory.mktemp("dates"), dates=DATES)


@pytest.fixture(scope="module")
def sequential(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sequential")
    out, corpus = root / "out", root / "corpus"
    summaries = {d: _run(data, d, out, corpus) for d in DATES}
    return {"out": out, "corpus": corpus, "summaries": summaries}


def test_runs_publish_in_date_order_and_the_corpus_lists_their_kept_records(data, sequential):
    from winnow.corpus import open_corpus

    head = open_corpus(str(sequential["corpus"])).head()
    assert [r["run_key"] for r in head.runs] == [d.replace("-", "") for d in DATES]
    assert [r["logical_date"] for r in head.runs] == list(DATES)
    assert [r["generation"] for r in head.runs] == [1, 2, 3] and head.generation == 3
    state = _corpus_state(sequential["corpus"], sequential["out"])
    for date in DATES:
        s = sequential["summaries"][date]
        kept = [r for r in state["records"] if r["run_key"] == date.replace("-", "")]
        assert len(kept) == s["kept"] == s["written"] > 0, date
        assert s["corpus"]["published"] is True and s["corpus"]["records"] == s["kept"]
        records = data["dates"][date]["records"]
        for r in kept:  # the manifest's url is the sidecar's, its uid the image bytes'
            want = records.get(r["key"]) or next(c for c in data["dates"][date]["copies"] if c["key"] == r["key"])
            assert r["uid"] == want["uid"] and r["url"] == want["url"], r["key"]
    assert sum(s["corpus_duplicates"] for s in sequential["summaries"].values()) > 0
    for s in sequential["summaries"].values():
        assert s["records"] == sum(s[k] for k in _count_keys()), s


def _count_keys() -> list[str]:
    from winnow.filters import ALL_COUNT_NAMES

    return list(ALL_COUNT_NAMES.values())


def test_every_copy_of_an_earlier_kept_image_is_a_corpus_duplicate_naming_it(data, sequential):
    for date in DATES[1:]:
        run_root = sequential["out"] / date.replace("-", "")
        status = _status(run_root)
        embedded = {k: e for t in (pq.read_table(p, columns=["key", "embedding"]) for p in
                                   glob.glob(f"{run_root}/embed/p*/rg*.parquet"))
                    for k, e in zip(t.column("key").to_pylist(), t.column("embedding").to_pylist())}
        for copy in data["dates"][date]["copies"]:
            row = status[copy["key"]]
            if copy["of_outcome"] != "kept":
                # A copy of a dropped image is not in the corpus: the same filter drops it again.
                assert row["outcome"] == copy["of_outcome"], (copy, row)
                continue
            assert row["outcome"] == "corpus_duplicate", (copy, row)
            assert (row["duplicate_of_run"], row["duplicate_of_key"], row["duplicate_of_uid"]) == \
                (copy["of_date"].replace("-", ""), copy["of_key"], copy["of_uid"]), (copy, row)
            if copy["how"] == "bytes":
                # Found before the model: never decoded nor embedded.
                assert "not decoded" in row["reason"] and embedded[copy["key"]] is None, (copy, row)
            else:
                assert "near duplicate" in row["reason"] and embedded[copy["key"]] is not None, (copy, row)


def test_a_later_run_cannot_evict_corpus_records_and_copies_are_not_written(data, sequential):
    state = _corpus_state(sequential["corpus"], sequential["out"])
    copies = {c["key"] for d in DATES for c in data["dates"][d]["copies"]}
    by_run: dict[str, set[str]] = {}
    for r in state["records"]:
        by_run.setdefault(r["run_key"], set()).add(r["key"])
    # The first date's kept records are all still there, and no copy of a kept image joined.
    first = sequential["summaries"][DATES[0]]
    assert len(by_run[DATES[0].replace("-", "")]) == first["kept"]
    kept_copies = {c["key"] for d in DATES for c in data["dates"][d]["copies"] if c["of_outcome"] == "kept"}
    assert not (kept_copies & set().union(*by_run.values()))
    assert copies  # the data has copies at all


def test_interleaved_dates_as_a_parallel_backfill_runs_them_give_the_same_corpus(data, sequential, tmp_path_factory):
    """Date 2 indexes and pre-checks (and embeds) while date 1 has not published; its corpus
    check runs after date 1 published (what the DAG's corpus_check waits for). Date 3 likewise
    before date 2. The corpus, tars and counts equal the one-after-another runs'."""
    from winnow.execution import LOCAL
    from winnow.pipeline import run_corpus_pre, run_global

    root = tmp_path_factory.mktemp("interleaved")
    out, corpus = root / "out", root / "corpus"
    for date in DATES[1:]:  # the later dates start first: index and pre-check see an empty corpus
        cfg = _cfg(data, date, out, corpus)
        run_global(cfg, "index", execution=LOCAL)
        assert run_corpus_pre(cfg, execution=LOCAL)["corpus_exact"] == 0
    summaries = {d: _run(data, d, out, corpus) for d in DATES}
    got, want = _corpus_state(corpus, out), _corpus_state(sequential["corpus"], sequential["out"])
    assert got["runs"] == want["runs"]
    assert got["records"] == want["records"]
    assert got["tars"] == want["tars"] and got["tars"]
    for d in DATES:
        a, b = summaries[d], sequential["summaries"][d]
        assert {k: a[k] for k in _count_keys()} == {k: b[k] for k in _count_keys()}, d
    # What the run's own thresholds and dedup saw is the same too: the records the check found
    # late count for nothing there (the same k-means centroids, the same outcome per record).
    for d in DATES:
        run_key = d.replace("-", "")
        a = out / run_key / "centroids" / "centroids.parquet"
        b = sequential["out"] / run_key / "centroids" / "centroids.parquet"
        assert pq.read_table(a).equals(pq.read_table(b)), d
        assert {k: r["outcome"] for k, r in _status(out / run_key).items()} == \
            {k: r["outcome"] for k, r in _status(sequential["out"] / run_key).items()}, d
    # The byte copies of date 2 were embedded this time (the pre-check could not know them) and
    # still dropped as corpus duplicates of date 1 by the check.
    status = _status(out / DATES[1].replace("-", ""))
    byte_copies = [c for c in data["dates"][DATES[1]]["copies"] if c["how"] == "bytes" and c["of_outcome"] == "kept"]
    assert byte_copies and all(status[c["key"]]["outcome"] == "corpus_duplicate" for c in byte_copies)


def test_a_rerun_of_a_published_run_publishes_nothing_twice(data, sequential):
    from winnow.corpus import open_corpus

    before = _corpus_state(sequential["corpus"], sequential["out"])
    summary = _run(data, DATES[1], sequential["out"], sequential["corpus"])
    assert summary["corpus"]["published"] is False and summary["corpus"].get("already") is True
    assert _corpus_state(sequential["corpus"], sequential["out"]) == before
    assert open_corpus(str(sequential["corpus"])).head().generation == before["generation"]


def test_records_a_takedown_lists_before_a_run_are_dropped_unread_and_never_enter(data, tmp_path_factory):
    from winnow.corpus import iter_records, takedown

    root = tmp_path_factory.mktemp("takedown-first")
    out, corpus = root / "out", root / "corpus"
    _run(data, DATES[0], out, corpus)
    d2 = data["dates"][DATES[1]]
    byte_copy = next(c for c in d2["copies"] if c["how"] == "bytes" and c["of_outcome"] == "kept")
    fresh = [k for k, r in d2["records"].items() if r.get("expect") == "kept"]
    by_url, by_key = fresh[0], fresh[1]
    listing = root / "list.txt"
    listing.write_text(f"# takedown request 42\n{byte_copy['of_uid']}\n\n{d2['records'][by_url]['url']}\n{by_key}\n")
    summary = takedown(str(corpus), str(listing), reason="opt-out")
    # The first date's original of the byte copy is removed from the corpus.
    assert summary["removed"] == 1
    assert byte_copy["of_key"] not in {r["key"] for t in iter_records(str(corpus)) for r in t.to_pylist()}
    s2 = _run(data, DATES[1], out, corpus)
    status = _status(out / DATES[1].replace("-", ""))
    for key, ident in ((byte_copy["key"], f"uid:{byte_copy['of_uid']}"), (by_url, f"url:{d2['records'][by_url]['url']}"),
                       (by_key, f"key:{by_key}")):
        assert status[key]["outcome"] == "takedown" and ident in status[key]["reason"], status[key]
    assert s2["takedowns"] == 3
    keys = {r["key"] for t in iter_records(str(corpus)) for r in t.to_pylist()}
    assert not {byte_copy["key"], by_url, by_key} & keys
    embedded = {k: e for p in glob.glob(f"{out}/{DATES[1].replace('-', '')}/embed/p*/rg*.parquet")
                for k, e in zip(*(pq.read_table(p).column(c).to_pylist() for c in ("key", "embedding")))}
    assert all(embedded[k] is None for k in (byte_copy["key"], by_url, by_key))


def test_a_run_without_a_corpus_has_no_corpus_counts_nor_columns(data, tmp_path_factory):
    from winnow.pipeline import run_all
    from winnow.schemas import STATUS

    out = tmp_path_factory.mktemp("plain")
    cfg = tiny_config(input_uri=data["dates"][DATES[1]]["input_uri"], output_root=str(out), run_key="plain",
                      buffer_size=8, max_partitions=2, **RUN_PARAMS)
    summary = run_all(cfg, backend="local")
    assert "corpus_duplicates" not in summary and "takedowns" not in summary and "corpus" not in summary
    assert "corpus_uri" not in summary["config"] and "url_field" not in summary["config"]
    assert pq.read_schema(glob.glob(f"{out}/plain/status/p*/rg*.parquet")[0]) == STATUS
    assert not (out / "plain" / "corpus").exists()
    # Every copy is curated on its own: a copy of a kept image is kept again.
    status = _status(out / "plain")
    assert any(status[c["key"]]["outcome"] == "kept" for c in data["dates"][DATES[1]]["copies"])
    assert json.loads((out / "plain" / "_summary.json").read_text())["records"] == summary["records"]


def test_job_mode_chains_no_stage_past_the_corpus_near_check():
    """A Ray Job of the dedup flags chains status and write for its partition, except with a
    corpus: status reads the near-duplicate check, which needs every partition's dedup first."""
    from winnow.job import chained_stages

    assert chained_stages("dedup") == ["status", "write"]
    assert chained_stages("dedup", corpus=True) == []
    assert chained_stages("status", corpus=True) == ["write"]
    assert chained_stages("embed", corpus=True) == chained_stages("embed") == ["aesthetic", "nsfw", "clip_score"]
