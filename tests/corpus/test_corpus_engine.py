"""The corpus's storage layer and Python API (:mod:`winnow.corpus`) on real run roots.

Three dates of overlapping input (``tests._corpus_data``: byte-identical and re-encoded copies of
earlier dates' records) are curated once per module by ``run_all`` (local backend, tiny model,
no ``corpus_uri``: the engine of the corpus is tested here, not the pipeline's corpus steps), and
published into corpora: publish's files and head round-trip, a rerun publishes nothing, a stale
check or another embedding model is refused, a SIGKILL mid-publish leaves the head as it was and
the rerun writes the same bytes as a fault-free publish. Takedowns of a uid, a key and a URL list
remove exactly those records from every output tar, Parquet and gallery, rewrite only the row
groups that held (or showed) them, are no-ops when rerun and finish after a SIGKILL with the same
files as a fault-free takedown. One test does it all on the S3 test server.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests._corpus_data import RUN_PARAMS, make_dates
from tests._tiny import tiny_config
from tests.storage.conftest import s3  # noqa: F401 - the module's S3 server fixture
from winnow.corpus import (
    KILL_ENV,
    CorpusChanged,
    CorpusError,
    iter_records,
    open_corpus,
    publish,
    read_identifiers,
    takedown,
)
from winnow.corpus.layout import HEAD_FILE, PUBLISH_JOURNAL, TAKEDOWN_JOURNAL
from winnow.rowgroups import CommitStore, RunRoot, StorageOptions
from winnow.stages.dedup_steps import load_centroids
from winnow.stages.write import member_key

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
DATES = ("2025-03-01", "2025-03-02", "2025-03-03")
FP = "tiny-embed"
TAKEDOWN_DATE = "2025-04-01"


# ---- data: three curated dates, shared by the module ------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"manifest": make_dates' manifest, "roots": {date: pristine run root}}. Tests that change a
    run root (takedowns) work on copies."""
    from winnow.pipeline import run_all

    base = tmp_path_factory.mktemp("corpus_runs")
    manifest = make_dates(base / "in")
    roots = {}
    for date in DATES:
        cfg = tiny_config(input_uri=manifest["dates"][date]["input_uri"], output_root=str(base / "runs"), run_key=date,
                          buffer_size=8, max_partitions=2, **RUN_PARAMS)
        run_all(cfg, backend="local")
        roots[date] = base / "runs" / date
    return {"manifest": manifest, "roots": roots}


def kept_rows(run_root: Path) -> list[dict]:
    """Every row of the run's curated Parquet, with its tar (relative to the run root)."""
    out = []
    for path in sorted((run_root / "write").glob("p*/rg*.parquet")):
        t = pq.read_table(path, columns=["record_id", "uid", "key", "json"])
        tar = str(path.relative_to(run_root))[: -len(".parquet")] + ".tar"
        out += [{**r, "tar": tar} for r in t.to_pylist()]
    return out


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {i.name: tar.extractfile(i).read() for i in tar.getmembers() if i.isfile()}


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """rel path -> (sha256, mtime_ns, inode) of every file under ``root``."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            p = Path(folder) / name
            st = p.stat()
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_ino)
    return out


def file_bytes(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            rel = str((Path(folder) / name).relative_to(root))
            if rel not in skip:
                out[rel] = (Path(folder) / name).read_bytes()
    return out


def head_json(corpus_dir: Path) -> dict:
    head = json.loads((corpus_dir / HEAD_FILE).read_text())
    for run in head["runs"]:
        run.pop("published_at")
    return head


def setup_corpus(base: Path, runs: dict, dates=DATES) -> tuple[str, dict[str, Path]]:
    """Copies of the run roots under ``base/runs``, published in date order into ``base/corpus``."""
    roots = {}
    for date in dates:
        roots[date] = base / "runs" / date
        shutil.copytree(runs["roots"][date], roots[date])
    corpus = open_corpus(str(base / "corpus"))
    for i, date in enumerate(dates):
        got = publish(corpus, RunRoot(str(roots[date])), run_key=date, logical_date=date, checked_generation=i,
                      embed_fingerprint=FP)
        assert got["published"] and got["generation"] == i + 1, got
    return str(base / "corpus"), roots


def all_records(corpus_uri: str, storage=None) -> pa.Table:
    tables = list(iter_records(corpus_uri, storage=storage))
    return pa.concat_tables(tables) if tables else pa.table({})


def run_in_child(code: str, kill: str) -> subprocess.CompletedProcess:
    env = {**os.environ, KILL_ENV: kill, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=300)


# ---- the data itself --------------------------------------------------------------------------

def test_dates_data_is_deterministic_and_its_predictions_hold(runs, tmp_path):
    again = make_dates(tmp_path / "in")

    def without_uris(m):
        return {**m, "dates": {d: {k: v for k, v in e.items() if k != "input_uri"} for d, e in m["dates"].items()}}

    assert without_uris(again) == without_uris(runs["manifest"])
    for date in DATES:
        for tar in sorted(Path(runs["manifest"]["dates"][date]["input_uri"]).glob("*.tar")):
            assert (tmp_path / "in" / date / tar.name).read_bytes() == tar.read_bytes(), tar
    # What the copies claim about their originals is what the runs did.
    kept = {d: {r["key"] for r in kept_rows(runs["roots"][d])} for d in DATES}
    copies = [c for d in DATES for c in runs["manifest"]["dates"][d]["copies"]]
    assert {c["how"] for c in copies} == {"bytes", "reencoded"}
    assert {c["of_outcome"] for c in copies} == {"kept", "image_size", "caption_length"}
    for c in copies:
        assert (c["of_key"] in kept[c["of_date"]]) == (c["of_outcome"] == "kept"), c
    for date in DATES:
        for key, rec in runs["manifest"]["dates"][date]["records"].items():
            if "expect" in rec:
                assert (key in kept[date]) == (rec["expect"] == "kept"), (date, key, rec)
        assert (c["uid"] == c["of_uid"]) == (c["how"] == "bytes"), c


# ---- publish ----------------------------------------------------------------------------------

def test_publish_round_trips_and_a_rerun_writes_nothing(runs, tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus = open_corpus(str(corpus_dir))
    assert corpus.head().generation == 0 and corpus.head().runs == () and corpus.buckets() == []
    assert list(iter_records(str(corpus_dir))) == []
    results = []
    for i, date in enumerate(DATES[:2]):
        results.append(publish(corpus, RunRoot(str(runs["roots"][date])), run_key=date, logical_date=date,
                               checked_generation=i, embed_fingerprint=FP, counts={"kept": 1}))
    kept = {d: kept_rows(runs["roots"][d]) for d in DATES[:2]}
    assert [r["generation"] for r in results] == [1, 2]
    assert [r["records"] for r in results] == [len(kept[d]) for d in DATES[:2]]
    head = corpus.head()
    dim = pq.read_schema(next((runs["roots"][DATES[0]] / "write").glob("p*/rg*.parquet"))).field("embedding").type.list_size
    assert head.generation == 2 and head.embed_fingerprint == FP and head.dim == dim
    assert [(r["run_key"], r["logical_date"], r["generation"], r["records"], r["counts"]) for r in head.runs] == [
        (d, d, i + 1, len(kept[d]), {"kept": 1}) for i, d in enumerate(DATES[:2])]
    assert corpus.published(DATES[0]) and not corpus.published(DATES[2])

    # Centroids: the first run's, frozen; every record's bucket is its nearest centroid.
    run_centroids, _ = load_centroids(CommitStore(str(runs["roots"][DATES[0]])))
    assert np.array_equal(corpus.centroids(), run_centroids)
    assert head.centroids_generation == 1

    table = all_records(str(corpus_dir))
    got = sorted(zip(*(table.column(c).to_pylist() for c in ("run_key", "key", "uid", "url"))))
    want = sorted((d, r["key"], r["uid"], json.loads(r["json"])["url"]) for d in DATES[:2] for r in kept[d])
    assert got == want
    emb = table.column("embedding").combine_chunks()
    emb = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(emb), -1).astype(np.float32)
    for bucket in corpus.buckets():
        part = corpus.read_bucket(bucket, ["uid"]).column("uid").to_pylist()
        rows = [i for i, u in enumerate(table.column("uid").to_pylist()) if u in part]
        assert (np.argmax(emb[rows] @ run_centroids.T, axis=1) == bucket).all()
    # Members name the record's bytes in its tar: the image first, its uid its bytes' hash.
    from winnow.data.tarscan import image_uid

    for row in table.select(["run_root", "tar", "members", "uid", "key"]).to_pylist()[:12]:
        members = tar_members(Path(row["run_root"]) / row["tar"])
        assert set(row["members"]) <= set(members) and row["members"][0].startswith(member_key(row["key"]))
        assert image_uid(members[row["members"][0]]) == row["uid"]

    # Every kept uid is found with its run and key (the first publisher of a uid wins).
    first: dict[str, tuple[str, str]] = {}
    for d in DATES[:2]:
        for r in kept[d]:
            first.setdefault(r["uid"], (d, r["key"]))
    assert corpus.lookup_uids(sorted(first)) == first
    assert corpus.lookup_uids(sorted(first), generation=1) == {u: v for u, v in first.items() if v[0] == DATES[0]}
    assert corpus.lookup_uids(["f" * 32]) == {}
    with pytest.raises(CorpusError, match="not a uid"):
        corpus.lookup_uids(["nope"])
    # A byte copy of a kept date-1 record is in date 2 (no corpus check ran): the earlier wins.
    copy = next(c for c in runs["manifest"]["dates"][DATES[1]]["copies"] if c["how"] == "bytes" and c["of_outcome"] == "kept")
    assert corpus.lookup_uids([copy["uid"]]) == {copy["uid"]: (DATES[0], copy["of_key"])}
    # The uid files are sorted by uid and hold the same buckets as the manifest.
    for path in sorted(corpus_dir.glob("uids/u*/g*.parquet")):
        uids = pq.read_table(path).column("uid").to_pylist()
        assert uids == sorted(uids) and {u[:2] for u in uids} == {path.parent.name[1:]}

    # A rerun of a published run writes nothing and returns the same head.
    before, head_bytes = snapshot(corpus_dir), (corpus_dir / HEAD_FILE).read_bytes()
    again = publish(corpus, RunRoot(str(runs["roots"][DATES[0]])), run_key=DATES[0], logical_date=DATES[0],
                    checked_generation=0, embed_fingerprint=FP)
    assert again == {"published": False, "already": True, "generation": 2, "run_generation": 1}
    assert snapshot(corpus_dir) == before and (corpus_dir / HEAD_FILE).read_bytes() == head_bytes


def test_publish_refuses_a_stale_check_another_model_and_an_unwritten_run(runs, tmp_path):
    corpus = open_corpus(str(tmp_path / "corpus"))
    publish(corpus, RunRoot(str(runs["roots"][DATES[0]])), run_key=DATES[0], logical_date=DATES[0],
            checked_generation=0, embed_fingerprint=FP)
    before = snapshot(tmp_path / "corpus")
    with pytest.raises(CorpusChanged, match=rf"saw generation 0; run '{DATES[0]}' published since.*rerun the check"):
        publish(corpus, RunRoot(str(runs["roots"][DATES[1]])), run_key=DATES[1], logical_date=DATES[1],
                checked_generation=0, embed_fingerprint=FP)
    with pytest.raises(CorpusError, match=rf"another embedding model.*'{FP}'.*'other-model'"):
        publish(corpus, RunRoot(str(runs["roots"][DATES[1]])), run_key=DATES[1], logical_date=DATES[1],
                checked_generation=1, embed_fingerprint="other-model")
    with pytest.raises(CorpusError, match="generation 5"):
        publish(corpus, RunRoot(str(runs["roots"][DATES[1]])), run_key=DATES[1], logical_date=DATES[1],
                checked_generation=5, embed_fingerprint=FP)
    # A run whose write stage lacks a row group is not published.
    broken = tmp_path / "broken"
    shutil.copytree(runs["roots"][DATES[1]], broken)
    next((broken / "write").glob("p*/rg*.parquet")).unlink()
    with pytest.raises(CorpusError, match="committed .* of .* row groups"):
        publish(corpus, RunRoot(str(broken)), run_key="broken", logical_date=None, checked_generation=1,
                embed_fingerprint=FP)
    after = snapshot(tmp_path / "corpus")
    assert after == before, set(after) ^ set(before)
    assert corpus.head().generation == 1


def test_one_corpus_writer_at_a_time(runs, tmp_path, monkeypatch):
    from winnow.corpus import layout
    from winnow.exceptions import RunLocked
    from winnow.rowgroups import lease

    corpus = open_corpus(str(tmp_path / "corpus"))
    lease.acquire(corpus.store, "dag-run-other")  # a live writer (a DAG run's owner: freed by expiry)
    monkeypatch.setattr(layout, "LEASE_WAIT_S", 0.3)
    with pytest.raises(RunLocked, match="another writer holds its lease"):
        publish(corpus, RunRoot(str(runs["roots"][DATES[0]])), run_key=DATES[0], logical_date=None,
                checked_generation=0, embed_fingerprint=FP)
    (tmp_path / "list.txt").write_text("somekey\n")
    with pytest.raises(RunLocked):
        takedown(str(tmp_path / "corpus"), str(tmp_path / "list.txt"), reason="x")
    assert corpus.head().generation == 0
    lease.release(corpus.store, "dag-run-other")
    assert publish(corpus, RunRoot(str(runs["roots"][DATES[0]])), run_key=DATES[0], logical_date=None,
                   checked_generation=0, embed_fingerprint=FP)["published"]
    assert not (tmp_path / "corpus" / "_lease.json").exists()


PUBLISH_CHILD = """
from winnow.corpus import open_corpus, publish
from winnow.rowgroups import RunRoot
publish(open_corpus({corpus!r}), RunRoot({run_root!r}), run_key={run_key!r}, logical_date={run_key!r},
        checked_generation={checked}, embed_fingerprint={fp!r})
"""


def test_sigkill_mid_publish_leaves_the_head_and_the_rerun_writes_the_fault_free_bytes(runs, tmp_path):
    roots = {d: str(runs["roots"][d]) for d in DATES}
    # Fault-free: dates 1 and 2 into one corpus.
    clean = open_corpus(str(tmp_path / "clean"))
    for i, d in enumerate(DATES[:2]):
        publish(clean, RunRoot(roots[d]), run_key=d, logical_date=d, checked_generation=i, embed_fingerprint=FP)
    # Crashed: date 1, then date 2 killed after its delta files, before its head.
    crashed_dir = tmp_path / "crashed"
    crashed = open_corpus(str(crashed_dir))
    publish(crashed, RunRoot(roots[DATES[0]]), run_key=DATES[0], logical_date=DATES[0], checked_generation=0,
            embed_fingerprint=FP)
    head_before = (crashed_dir / HEAD_FILE).read_bytes()
    records_before = all_records(str(crashed_dir)).num_rows
    child = run_in_child(PUBLISH_CHILD.format(corpus=str(crashed_dir), run_root=roots[DATES[1]], run_key=DATES[1],
                                              checked=1, fp=FP), "publish:after_files")
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert (crashed_dir / HEAD_FILE).read_bytes() == head_before
    assert list(crashed_dir.glob("records/c*/g000000002.parquet")), "the kill came before the delta files"
    assert (crashed_dir / PUBLISH_JOURNAL).exists()
    assert all_records(str(crashed_dir)).num_rows == records_before  # generation-2 files are invisible
    assert not crashed.published(DATES[1])
    assert crashed.lookup_uids([r["uid"] for r in kept_rows(runs["roots"][DATES[1]])
                                if r["uid"] not in {x["uid"] for x in kept_rows(runs["roots"][DATES[0]])}]) == {}

    got = publish(crashed, RunRoot(roots[DATES[1]]), run_key=DATES[1], logical_date=DATES[1], checked_generation=1,
                  embed_fingerprint=FP)
    assert got["published"] and got["generation"] == 2
    assert file_bytes(crashed_dir, (HEAD_FILE,)) == file_bytes(tmp_path / "clean", (HEAD_FILE,))
    assert head_json(crashed_dir) == head_json(tmp_path / "clean")


def test_a_crashed_publishs_files_never_join_another_runs_generation(runs, tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus = open_corpus(str(corpus_dir))
    roots = {d: str(runs["roots"][d]) for d in DATES}
    publish(corpus, RunRoot(roots[DATES[0]]), run_key=DATES[0], logical_date=DATES[0], checked_generation=0,
            embed_fingerprint=FP)
    child = run_in_child(PUBLISH_CHILD.format(corpus=str(corpus_dir), run_root=roots[DATES[1]], run_key=DATES[1],
                                              checked=1, fp=FP), "publish:after_files")
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    # Date 3 publishes generation 2 instead: date 2's crashed files must not come with it.
    publish(corpus, RunRoot(roots[DATES[2]]), run_key=DATES[2], logical_date=DATES[2], checked_generation=1,
            embed_fingerprint=FP)
    assert {r["run_key"] for r in corpus.head().runs} == {DATES[0], DATES[2]}
    table = all_records(str(corpus_dir))
    assert set(table.column("run_key").to_pylist()) == {DATES[0], DATES[2]}
    assert table.num_rows == len(kept_rows(runs["roots"][DATES[0]])) + len(kept_rows(runs["roots"][DATES[2]]))
    assert not (corpus_dir / PUBLISH_JOURNAL).exists()
    # Nor its uid files (date 2's own uids touch partitions date 3's do not).
    only2 = {r["uid"] for r in kept_rows(runs["roots"][DATES[1]])} - {
        r["uid"] for d in (DATES[0], DATES[2]) for r in kept_rows(runs["roots"][d])}
    assert only2 and corpus.lookup_uids(sorted(only2)) == {}

    # The same when the crashed publish was the corpus's first (it wrote the centroids too).
    first = open_corpus(str(tmp_path / "first"))
    child = run_in_child(PUBLISH_CHILD.format(corpus=str(tmp_path / "first"), run_root=roots[DATES[1]],
                                              run_key=DATES[1], checked=0, fp=FP), "publish:after_files")
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert (tmp_path / "first" / "centroids" / "centroids.parquet").exists() and first.centroids() is None
    publish(first, RunRoot(roots[DATES[0]]), run_key=DATES[0], logical_date=DATES[0], checked_generation=0,
            embed_fingerprint=FP)
    assert np.array_equal(first.centroids(), load_centroids(CommitStore(roots[DATES[0]]))[0])
    assert first.lookup_uids(sorted(only2)) == {}
    assert set(all_records(str(tmp_path / "first")).column("run_key").to_pylist()) == {DATES[0]}


# ---- takedowns --------------------------------------------------------------------------------

def _targets(runs) -> dict[str, list[str]]:
    """A uid list, a key list and a URL list over the published dates."""
    m = runs["manifest"]["dates"]
    copy = next(c for c in m[DATES[1]]["copies"] if c["how"] == "bytes" and c["of_outcome"] == "kept")
    kept3 = kept_rows(runs["roots"][DATES[2]])
    # A kept record that a sampled near duplicate shows as its twin (its gallery's original_thumb).
    twin_key = None
    for date in DATES:
        root = runs["roots"][date]
        keys = {r["record_id"]: r["key"] for r in kept_rows(root)}
        for g in sorted((root / "write").glob("p*/rg*.gallery")):
            for row in pq.read_table(g).to_pylist():
                if row["outcome"] == "duplicate" and row["original_thumb_offset"] is not None and row["duplicate_of"] in keys:
                    twin_key = twin_key or keys[row["duplicate_of"]]
    assert twin_key is not None, "the sample plants a near duplicate per date"
    kept2 = kept_rows(runs["roots"][DATES[1]])
    return {
        # A uid two runs kept (date 2's byte copy of a date-1 record), and one of date 3.
        "uid": [copy["uid"], kept3[0]["uid"]],
        "key": [twin_key, kept3[-1]["key"], "no-such-key"],
        "url": [json.loads(kept2[0]["json"])["url"], json.loads(kept2[-1]["json"])["url"]],
    }


def _write_lists(folder: Path, targets: dict[str, list[str]]) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "uids.txt").write_text("# uids, one a line\n\n" + "\n".join(targets["uid"]) + "\n")
    (folder / "keys.txt").write_text("\n".join(targets["key"]) + "\n# end\n")
    pq.write_table(pa.table({"n": [1, 2], "identifier": targets["url"]}), folder / "urls.parquet")
    (folder / "all.txt").write_text("\n".join(targets["uid"] + targets["key"] + targets["url"]) + "\n")
    return {k: str(folder / f"{k}s.{'parquet' if k == 'url' else 'txt'}") for k in targets} | {"all": str(folder / "all.txt")}


def _expected_rewrites(before: dict[str, Path], removed: pa.Table, uids: set[str]) -> tuple[set[str], dict]:
    """The run-root files a takedown of ``removed`` must rewrite (rel to the runs' parent), from
    the files as they were: the row groups that held the records, and the galleries showing them."""
    want: set[str] = set()
    ids_of: dict[str, set[int]] = {}
    for row in removed.to_pylist():
        root = Path(row["run_root"])
        rows = [r for r in kept_rows(root) if r["tar"] == row["tar"] and (r["uid"], r["key"]) == (row["uid"], row["key"])]
        assert len(rows) == 1, row
        ids_of.setdefault(row["run_root"], set()).add(rows[0]["record_id"])
        for suffix in (".tar", ".parquet"):
            want.add(str((root / row["tar"]).with_suffix(suffix).relative_to(root.parent)))
    for root in before.values():
        ids = ids_of.get(str(root), set())
        for g in sorted((root / "write").glob("p*/rg*.gallery")):
            gallery, thumbs = False, False
            for r in pq.read_table(g).to_pylist():
                if r["record_id"] in ids:
                    gallery, thumbs = True, thumbs or r["thumb_offset"] is not None
                elif r["duplicate_of"] in ids:
                    gallery = gallery or r["original_thumb_offset"] is not None or r["outcome"] == "exact_duplicate"
                    thumbs = thumbs or r["original_thumb_offset"] is not None or (
                        r["outcome"] == "exact_duplicate" and r["thumb_offset"] is not None)
            if gallery:
                want.add(str(g.relative_to(root.parent)))
            if thumbs:
                want.add(str(g.with_suffix(".thumbs").relative_to(root.parent)))
    return want, ids_of


def test_takedown_of_uid_key_and_url_lists_removes_exactly_those_records(runs, tmp_path):
    corpus_uri, roots = setup_corpus(tmp_path, runs)
    corpus = open_corpus(corpus_uri)
    targets = _targets(runs)
    lists = _write_lists(tmp_path / "lists", targets)
    assert read_identifiers(lists["uid"]) == targets["uid"]
    assert read_identifiers(lists["url"]) == targets["url"]
    everything = all_records(corpus_uri)
    old_tars = {p: tar_members(p) for r in roots.values() for p in (r / "write").glob("p*/rg*.tar")}
    old_thumbs = {p: p.read_bytes() for r in roots.values() for p in (r / "write").glob("p*/rg*.thumbs")}
    old_galleries = {p: pq.read_table(p).to_pylist() for r in roots.values() for p in (r / "write").glob("p*/rg*.gallery")}
    gen = corpus.head().generation
    removed_so_far = pa.table({"uid": pa.array([], pa.string())})
    for kind in ("uid", "key", "url"):
        listed = set(targets[kind])
        hit = np.isin(np.array(everything.column(kind).to_pylist(), dtype=object), list(listed))
        removed = everything.filter(pa.array(hit)).select(["uid", "key", "url", "run_key", "run_root", "tar"])
        if kind == "uid":
            assert removed.num_rows == 3, "the uid two runs kept is removed from both"
        before = snapshot(tmp_path / "runs")
        want_files, ids_of = _expected_rewrites(roots, removed, set(removed.column("uid").to_pylist()))
        twins_shown = sum(1 for g, rows in old_galleries.items() for r in rows
                          if r["duplicate_of"] in ids_of.get(str(g.parents[2]), set())
                          and r["original_thumb_offset"] is not None)
        if kind == "key":
            assert twins_shown >= 1, "the key list removes a record a near duplicate's gallery entry shows"
        summary = takedown(corpus_uri, lists[kind], reason=f"{kind} opt-out", date=TAKEDOWN_DATE)
        gen += 1
        assert summary["generation"] == gen == corpus.head().generation
        assert summary["removed"] == removed.num_rows
        assert sorted(summary["keys"]) == sorted(set(removed.column("key").to_pylist()))
        assert summary["run_keys"] == sorted(set(removed.column("run_key").to_pylist()))
        by_id = {i["identifier"]: i for i in summary["by_identifier"]}
        assert set(by_id) == listed
        for ident, item in by_id.items():
            assert item["kind"] == kind
            assert sorted(r["key"] for r in item["removed"]) == sorted(
                r["key"] for r in removed.to_pylist() if r[kind] == ident)
        # Only the row groups that held the records (and the galleries showing them) changed.
        after = snapshot(tmp_path / "runs")
        changed = {p for p in before if after.get(p) != before[p]}
        assert set(after) == set(before)
        assert changed == want_files, (changed ^ want_files)
        assert summary["files_rewritten"] == len(want_files)
        removed_so_far = pa.concat_tables([removed_so_far, removed.select(["uid"])])

        # No removed image's bytes in any tar of any run root; every other member unchanged.
        removed_images = set()
        for row in removed.to_pylist():
            tar = Path(row["run_root"]) / row["tar"]
            name = next(n for n in old_tars[tar] if n.startswith(member_key(row["key"]) + ".") or
                        n.startswith(member_key(row["key"]) + "_r"))
            removed_images.add(old_tars[tar][name])
        for tar in old_tars:
            now = tar_members(tar)
            blob = tar.read_bytes()
            assert not any(img in blob for img in removed_images), tar
            assert all(old_tars[tar][n] == data for n, data in now.items())
            rows = pq.read_table(tar.with_suffix(".parquet"), columns=["key"]).column("key").to_pylist()
            assert len({n.split(".")[0] for n in now}) == len(rows), tar
        # The galleries no longer show them.
        for g, old_rows in old_galleries.items():
            ids = ids_of.get(str(g.parents[2]), set())
            rows = pq.read_table(g).to_pylist()
            assert not any(r["record_id"] in ids for r in rows)
            assert not any(r["duplicate_of"] in ids and r["original_thumb_offset"] is not None for r in rows)
            thumbs = g.with_suffix(".thumbs").read_bytes()
            for r in old_rows:
                if r["record_id"] in ids and r["thumb_offset"] is not None:
                    old = old_thumbs[g.with_suffix(".thumbs")][r["thumb_offset"]:r["thumb_offset"] + r["thumb_size"]]
                    assert old not in thumbs, g
        # The corpus: not listed, not found, recorded.
        table = all_records(corpus_uri)
        gone = set(removed_so_far.column("uid").to_pylist())
        assert not gone & set(table.column("uid").to_pylist())
        assert table.num_rows == everything.num_rows - sum(
            1 for u in everything.column("uid").to_pylist() if u in gone)
        assert corpus.lookup_uids(sorted(gone)) == {}
        assert listed <= corpus.takedown_identifiers()[kind]

        # A rerun of the same list removes nothing and writes nothing.
        frozen, head_bytes = snapshot(tmp_path), (Path(corpus_uri) / HEAD_FILE).read_bytes()
        again = takedown(corpus_uri, lists[kind], reason=f"{kind} opt-out", date=TAKEDOWN_DATE)
        assert again["removed"] == 0 and again["noop"]
        assert snapshot(tmp_path) == frozen and (Path(corpus_uri) / HEAD_FILE).read_bytes() == head_bytes

    head = corpus.head()
    assert [t["removed"] for t in head.takedowns] == [3, len(targets["key"]) - 1, len(targets["url"])]
    recorded = pq.read_table(Path(corpus_uri) / head.takedowns[1]["file"]).to_pylist()
    assert {r["identifier"]: r["kind"] for r in recorded} == dict.fromkeys(targets["key"], "key")
    assert next(r for r in recorded if r["identifier"] == "no-such-key")["removed_uids"] == []
    assert all(r["reason"] == "key opt-out" and r["date"] == TAKEDOWN_DATE for r in recorded)


def test_a_takedown_before_any_run_keeps_its_records_out(runs, tmp_path):
    roots = {}
    roots[DATES[0]] = tmp_path / "runs" / DATES[0]
    shutil.copytree(runs["roots"][DATES[0]], roots[DATES[0]])
    kept = kept_rows(roots[DATES[0]])
    listed = [kept[1]["key"], json.loads(kept[4]["json"])["url"]]
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
    corpus_uri = str(tmp_path / "corpus")
    first = takedown(corpus_uri, str(tmp_path / "list.txt"), reason="opt-out", date=TAKEDOWN_DATE)
    assert first["removed"] == 0 and first["identifiers"] == 2 and first["generation"] == 1
    corpus = open_corpus(corpus_uri)
    got = publish(corpus, RunRoot(str(roots[DATES[0]])), run_key=DATES[0], logical_date=DATES[0],
                  checked_generation=1, embed_fingerprint=FP)
    assert got["taken_down"] == 2 and got["records"] == len(kept) - 2
    table = all_records(corpus_uri)
    assert not {kept[1]["key"], kept[4]["key"]} & set(table.column("key").to_pylist())
    # ... and out of the run's output.
    for tar in (roots[DATES[0]] / "write").glob("p*/rg*.tar"):
        names = tar_members(tar)
        assert not any(n.startswith((member_key(kept[1]["key"]) + ".", member_key(kept[4]["key"]) + "."))
                       for n in names)


TAKEDOWN_CHILD = """
from winnow.corpus import takedown
takedown({corpus!r}, {list_uri!r}, reason="opt-out", date={date!r})
"""


def test_sigkill_mid_takedown_then_rerun_gives_the_fault_free_result(runs, tmp_path):
    base = tmp_path / "t"
    lists = _write_lists(tmp_path / "lists", _targets(runs))
    corpus_uri, _ = setup_corpus(base, runs)
    clean = takedown(corpus_uri, lists["all"], reason="opt-out", date=TAKEDOWN_DATE)
    writes = clean["files_rewritten"] + clean["manifest_files"]
    assert clean["removed"] >= 7 and writes > 4
    want = file_bytes(base, (f"corpus/{HEAD_FILE}",))
    want_head = head_json(base / "corpus")
    # A kill after the first writes, the last ones and a spread between (every kind of file).
    points = sorted({1, 2, writes - 1, writes, *range(3, writes - 1, max(1, writes // 8))})
    for point in points:
        shutil.rmtree(base)
        corpus_uri, _ = setup_corpus(base, runs)  # the same paths: the same bytes before the takedown
        head_before = (base / "corpus" / HEAD_FILE).read_bytes()
        child = run_in_child(TAKEDOWN_CHILD.format(corpus=corpus_uri, list_uri=lists["all"], date=TAKEDOWN_DATE),
                             f"takedown:after_rewrite:{point}")
        assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
        assert (base / "corpus" / TAKEDOWN_JOURNAL).exists()
        assert (base / "corpus" / HEAD_FILE).read_bytes() == head_before
        # While it is pending, its identifiers already keep records out.
        assert set(_targets(runs)["key"]) <= open_corpus(corpus_uri).takedown_identifiers()["key"]
        resumed = takedown(corpus_uri, lists["all"], reason="opt-out", date=TAKEDOWN_DATE)
        assert resumed["resumed"] and resumed["removed"] == clean["removed"]
        assert resumed["files_rewritten"] == clean["files_rewritten"]
        got = file_bytes(base, (f"corpus/{HEAD_FILE}",))
        assert sorted(got) == sorted(want)
        assert [k for k in want if got[k] != want[k]] == []
        assert head_json(base / "corpus") == want_head


# ---- on S3 ------------------------------------------------------------------------------------

def test_publish_lookup_and_takedown_on_s3(runs, s3, tmp_path):  # noqa: F811 - the fixture
    from tests.storage._runs import upload_folder

    storage = StorageOptions.from_env()
    prefix = "s3://winnow/corpus-test"
    run_uris = {}
    for date in DATES[:2]:
        run_uris[date] = f"{prefix}/runs/{date}"
        upload_folder(str(runs["roots"][date]), run_uris[date])
    corpus_uri = f"{prefix}/corpus"
    corpus = open_corpus(corpus_uri, storage)
    for i, date in enumerate(DATES[:2]):
        got = publish(corpus, RunRoot(run_uris[date], storage), run_key=date, logical_date=date,
                      checked_generation=i, embed_fingerprint=FP)
        assert got["published"] and got["generation"] == i + 1
    again = publish(corpus, RunRoot(run_uris[DATES[0]], storage), run_key=DATES[0], logical_date=DATES[0],
                    checked_generation=0, embed_fingerprint=FP)
    assert again["already"]
    kept = {d: kept_rows(runs["roots"][d]) for d in DATES[:2]}
    table = all_records(corpus_uri, storage)
    assert sorted(zip(table.column("run_key").to_pylist(), table.column("key").to_pylist())) == sorted(
        (d, r["key"]) for d in DATES[:2] for r in kept[d])
    assert set(table.column("run_root").to_pylist()) == set(run_uris.values())
    found = corpus.lookup_uids([r["uid"] for r in kept[DATES[1]]])
    assert set(found) == {r["uid"] for r in kept[DATES[1]]}

    # Take down a key and a uid; the list itself lives on S3.
    victims = [kept[DATES[0]][2], kept[DATES[1]][3]]
    fs, path = RunRoot(f"{prefix}/lists/list.txt", storage).filesystem()
    with fs.open_output_stream(path) as out:
        out.write(f"{victims[0]['key']}\n{victims[1]['uid']}\n".encode())
    local = {}
    for v, date in zip(victims, DATES[:2]):
        local[v["key"]] = tar_members(runs["roots"][date] / v["tar"])
    summary = takedown(corpus_uri, f"{prefix}/lists/list.txt", reason="s3 opt-out", storage=storage,
                       date=TAKEDOWN_DATE)
    assert summary["removed"] >= 2 and {victims[0]["key"], victims[1]["key"]} <= set(summary["keys"])
    for v, date in zip(victims, DATES[:2]):
        fs, path = RunRoot(f"{run_uris[date]}/{v['tar']}", storage).filesystem()
        with fs.open_input_stream(path) as f:
            blob = f.read()
        image = next(data for name, data in local[v["key"]].items() if name.startswith(member_key(v["key"]) + "."))
        assert image not in blob
        assert all(n in local[v["key"]] for n in tar_members_bytes(blob))
    table = all_records(corpus_uri, storage)
    assert not {victims[0]["key"], victims[1]["key"]} & set(table.column("key").to_pylist())
    assert corpus.lookup_uids([victims[1]["uid"]]) == {}
    noop = takedown(corpus_uri, f"{prefix}/lists/list.txt", reason="s3 opt-out", storage=storage, date=TAKEDOWN_DATE)
    assert noop["noop"] and noop["removed"] == 0
    assert corpus.head().generation == 3


def tar_members_bytes(blob: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        return {i.name: tar.extractfile(i).read() for i in tar.getmembers() if i.isfile()}
