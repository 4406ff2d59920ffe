"""The corpus under real Airflow (``dag.test()``, a local Ray, the tiny model, real tars and a
local corpus): three dates run one after another build one corpus in date order, copies of
earlier kept images are ``corpus_duplicate`` naming the record they copy, copies of dropped ones
get their original's outcome, publish and the takedown DAG emit asset events on the corpus, the
``image_takedown`` DAG removes a listed record, and the date-order gate of ``corpus_check``
(called directly: a run waits for an unpublished previous date, not for a published one).

The three runs are the module's fixture (a minute or so each on two cores); their input comes
from ``tests._corpus_data.make_dates`` (three dates of overlapping shards) through the DAG's
``{{ ds }}`` in ``input_uri``.
"""

from __future__ import annotations

import asyncio
import glob
import json
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

from tests._corpus_data import RUN_PARAMS, make_dates
from tests._tiny import ONLY_DEDUP, TINY_MODEL
from tests.airflow.conftest import retries_set

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

#: Not the dates other dag.test modules of the session use (one metadata DB for the session).
DATES = ("2025-05-01", "2025-05-02", "2025-05-03")
BUFFER, PARTITIONS = 16, 1


def _key(date: str) -> str:
    return date.replace("-", "")


def _logical(date: str) -> datetime:
    return datetime.strptime(date, "%Y-%m-%d").replace(tzinfo=UTC)


def _states(dag_run) -> dict[tuple[str, int], str]:
    return {(ti.task_id, ti.map_index): str(getattr(ti.state, "value", ti.state)) for ti in dag_run.get_task_instances()}


def _xcom(dag_run, task_id: str, map_index: int = -1, key: str = "return_value"):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(XComModel).filter_by(
            dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id=task_id, map_index=map_index, key=key
        ).one_or_none()
        return None if row is None else XComModel.deserialize_value(row)


def _status_rows(run_root: str) -> dict[str, dict]:
    from winnow.stages.status import iter_status

    table = pa.concat_tables(list(iter_status(run_root)), promote_options="permissive")
    return {row["key"]: row for row in table.to_pylist()}


def _tar_images(run_root: str) -> dict[str, bytes]:
    """member name -> bytes of every image in the run's written tars."""
    from winnow.schemas import IMAGE_EXTENSIONS

    out = {}
    for path in sorted(glob.glob(f"{run_root}/write/p*/rg*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                    out[member.name] = tar.extractfile(member).read()
    return out


def _corpus_events(corpus_uri: str) -> list[dict]:
    """The asset events on the corpus's asset, oldest first (their extra)."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    from winnow_airflow.corpus import asset_uri

    with create_session() as session:
        rows = (session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                .filter(AssetModel.uri == asset_uri(corpus_uri)).order_by(AssetEvent.id).all())
        return [dict(r.extra or {}) for r in rows]


@pytest.fixture(scope="module")
def corpus_runs(tmp_path_factory, curation_dag):
    """The three dates, one DAG run after another, building one corpus."""
    root = tmp_path_factory.mktemp("corpus")
    manifest = make_dates(root / "shards", dates=DATES)
    conf = {
        # The DAG renders {{ ds }}: each date reads its own folder (make_dates names them by date).
        "input_uri": str(root / "shards") + "/{{ ds }}", "output_root": str(root / "out"),
        "corpus_uri": str(root / "corpus"), "url_field": manifest["url_field"],
        "buffer_size": BUFFER, "max_partitions": PARTITIONS, **TINY_MODEL, **ONLY_DEDUP, **RUN_PARAMS,
    }
    runs, seconds = {}, {}
    with retries_set(curation_dag, 0):
        for date in DATES:
            t0 = time.perf_counter()
            runs[date] = curation_dag.test(logical_date=_logical(date), run_conf=conf)
            seconds[date] = round(time.perf_counter() - t0, 1)
    print(f"\ncorpus runs: {seconds} s")
    return {"root": root, "manifest": manifest, "conf": conf, "runs": runs, "corpus_uri": conf["corpus_uri"],
            "run_roots": {d: str(root / "out" / _key(d)) for d in DATES}, "seconds": seconds}


def test_three_dates_succeed_and_the_corpus_lists_them_in_date_order(corpus_runs):
    from winnow.corpus import open_corpus

    for date, dr in corpus_runs["runs"].items():
        states = _states(dr)
        assert dr.state == "success", (date, {k: v for k, v in states.items() if v != "success"})
        for task_id in ("corpus_pre", "corpus_check", "publish"):
            assert states[(task_id, -1)] == "success", (date, task_id)
        published = _xcom(dr, "publish")
        assert published["published"] is True and published["generation"] >= 1, published
    head = open_corpus(corpus_runs["corpus_uri"], None).head()
    runs = head.runs
    assert [r["run_key"] for r in runs] == [_key(d) for d in DATES]
    assert [str(r["logical_date"])[:10] for r in runs] == list(DATES)
    generations = [r["generation"] for r in runs]
    assert generations == sorted(generations) and len(set(generations)) == 3
    assert head.generation == generations[-1]
    # Each publish reported what the corpus head now says of its run.
    for date, run in zip(DATES, runs):
        published = _xcom(corpus_runs["runs"][date], "publish")
        assert (published["generation"], published["records"]) == (run["generation"], run["records"]), (date, run)
        summary = json.loads(Path(corpus_runs["run_roots"][date], "_summary.json").read_text())
        assert published["records"] == summary["kept"], date
    # The publish steps wrote the corpus's card: all three runs, from the head.
    card = json.loads(Path(corpus_runs["corpus_uri"], "card.json").read_text())
    assert [r["run_key"] for r in card["runs"]] == [_key(d) for d in DATES]
    assert card["generation"] == head.generation


def test_copies_of_earlier_kept_images_are_corpus_duplicates_naming_the_original(corpus_runs):
    manifest = corpus_runs["manifest"]["dates"]
    status = {d: _status_rows(corpus_runs["run_roots"][d]) for d in DATES}
    checked = 0
    for date in DATES[1:]:
        for copy in manifest[date]["copies"]:
            if copy["of_outcome"] != "kept":
                continue
            original = status[copy["of_date"]][copy["of_key"]]
            assert original["outcome"] == "kept", (copy, original["outcome"], original.get("reason"))
            row = status[date][copy["key"]]
            assert row["outcome"] == "corpus_duplicate", (copy, row["outcome"], row.get("reason"))
            assert (row["duplicate_of_run"], row["duplicate_of_key"], row["duplicate_of_uid"]) == (
                _key(copy["of_date"]), copy["of_key"], copy["of_uid"]), (copy, row)
            checked += 1
    # Date 2 copies 3 kept images of date 1 (1 byte-identical, 2 re-encoded); date 3 copies 3 of each.
    assert checked == 9
    # Nothing a corpus duplicate names was written again.
    for date in DATES[1:]:
        written = set(_tar_images(corpus_runs["run_roots"][date]))
        dup_keys = {k for k, r in status[date].items() if r["outcome"] == "corpus_duplicate"}
        assert not {n.rsplit(".", 1)[0] for n in written} & dup_keys


def test_copies_of_earlier_dropped_images_get_their_original_outcome(corpus_runs):
    manifest = corpus_runs["manifest"]["dates"]
    status = {d: _status_rows(corpus_runs["run_roots"][d]) for d in DATES}
    checked = 0
    for date in DATES[1:]:
        for copy in manifest[date]["copies"]:
            if copy["of_outcome"] == "kept":
                continue
            assert status[copy["of_date"]][copy["of_key"]]["outcome"] == copy["of_outcome"], copy
            row = status[date][copy["key"]]
            assert row["outcome"] == copy["of_outcome"], (copy, row["outcome"], row.get("reason"))
            assert row["duplicate_of_run"] is None, row
            checked += 1
    assert checked == 12  # per earlier date, 2 copies of each of its 2 dropped planted records


def test_publish_emits_one_corpus_asset_event_per_run(corpus_runs):
    events = _corpus_events(corpus_runs["corpus_uri"])
    publishes = [e for e in events if "run_key" in e]
    assert [e["run_key"] for e in publishes] == [_key(d) for d in DATES]
    assert [e["logical_date"] for e in publishes] == list(DATES)
    for event, date in zip(publishes, DATES):
        published = _xcom(corpus_runs["runs"][date], "publish")
        assert (event["generation"], event["records"], event["published"]) == (
            published["generation"], published["records"], True)


def test_corpus_tasks_without_a_corpus_do_nothing():
    """Unset (absent, null or empty): each corpus task returns at once, touching neither storage
    nor Ray (no config is even built: the params here would not make one)."""
    from winnow_airflow.corpus import CORPUS_OPERATORS, CORPUS_STEPS

    assert [t for t, _ in CORPUS_STEPS] == list(CORPUS_OPERATORS)
    for task_id, op in CORPUS_OPERATORS.items():
        for params in ({}, {"corpus_uri": None}, {"corpus_uri": ""}, {"corpus_uri": "  "}):
            assert op(task_id=task_id).execute({"params": params}) == {"corpus": None}, (task_id, params)


def test_the_date_order_gate_waits_for_an_unpublished_previous_date_only(corpus_runs, curation_dag):
    """The gate of ``corpus_check``, called directly: the previous DAG run (as the Task SDK's
    ``get_previous_dagrun`` gives it) of the same corpus is waited for until it has published."""
    from winnow_airflow.corpus import PreviousRun, gate, previous_run

    corpus = corpus_runs["corpus_uri"]
    dag = curation_dag

    def dag_run(date: str, **conf):
        return SimpleNamespace(run_id=f"backfill__{date}T00:00:00+00:00", logical_date=_logical(date),
                               conf={"corpus_uri": corpus, **conf})

    # The previous run, by the DAG's run-key rule: conf run_key, else the logical date.
    assert previous_run(dag_run("2025-05-03"), corpus, dag) == PreviousRun(
        run_key="20250503", run_id="backfill__2025-05-03T00:00:00+00:00", logical_date="2025-05-03")
    assert previous_run(dag_run("2025-05-03", run_key="mine"), corpus, dag).run_key == "mine"
    # The same corpus however written; another corpus, or none, is not waited for.
    assert previous_run(dag_run("2025-05-03"), "file://" + corpus + "/", dag) is not None
    assert previous_run(dag_run("2025-05-03", corpus_uri=corpus + "-other"), corpus, dag) is None
    assert previous_run(dag_run("2025-05-03", corpus_uri=""), corpus, dag) is None
    assert previous_run(SimpleNamespace(run_id="r", logical_date=_logical("2025-05-03"), conf={}), corpus, dag) is None
    assert previous_run(None, corpus, dag) is None

    # Published (a date of the fixture): go. Not published (a date after them): wait, saying for what.
    assert gate(corpus, previous_run(dag_run("2025-05-03"), corpus, dag), None) is None
    waiting = gate(corpus, previous_run(dag_run("2025-05-04"), corpus, dag), None)
    assert waiting == (f"waiting for run 20250504 (logical date 2025-05-04) to publish to corpus {corpus}; "
                       "this run's corpus check runs after it")
    assert gate(corpus, None, None) is None  # the first date, or a run without a logical date
    # A run never waits for itself (one run key in every date's conf).
    assert gate(corpus, previous_run(dag_run("2025-05-04", run_key="same"), corpus, dag), None, run_key="same") is None
    # A corpus nothing has published to yet: every run of it waits for its previous date.
    assert gate(str(corpus_runs["root"] / "empty-corpus"), PreviousRun("20250501", "r", "2025-05-01"), None)


def test_the_trigger_fires_once_the_previous_date_has_published(corpus_runs):
    from winnow_airflow.triggers import CorpusPublishedTrigger

    corpus = corpus_runs["corpus_uri"]

    async def first_event(run_key: str, within: float):
        trigger = CorpusPublishedTrigger(corpus_uri=corpus, run_key=run_key, waiting="waiting", poll_interval=0.05)
        gen = trigger.run()
        try:
            return await asyncio.wait_for(gen.__anext__(), within)
        except TimeoutError:
            return None
        finally:
            await gen.aclose()

    event = asyncio.run(first_event("20250502", 30))
    assert event.payload["status"] == "published" and event.payload["run_key"] == "20250502"
    assert asyncio.run(first_event("20250504", 0.5)) is None  # still polling: nothing published it
    # What the triggerer stores and rebuilds it from.
    classpath, kwargs = CorpusPublishedTrigger(corpus_uri=corpus, run_key="k", waiting="w").serialize()
    assert classpath == "winnow_airflow.triggers.CorpusPublishedTrigger"
    assert CorpusPublishedTrigger(**kwargs).serialize() == (classpath, kwargs)


def test_takedown_dag_removes_a_listed_record_from_the_corpus(corpus_runs, dagbag):
    """The image_takedown DAG (dag.test) with a text list naming one key kept on the first date."""
    from winnow.corpus import iter_records

    def keys() -> dict[str, dict]:
        return {r["key"]: r for t in iter_records(corpus_runs["corpus_uri"], columns=["key", "uid", "run_key"])
                for r in t.to_pylist()}

    takedown_dag = dagbag.dags["image_takedown"]
    date = DATES[0]
    run_root = corpus_runs["run_roots"][date]
    before = keys()
    status = _status_rows(run_root)
    kept = sorted(k for k, r in status.items() if r["outcome"] == "kept" and k in before)
    victim = kept[0]
    uid = before[victim]["uid"]
    images_before = _tar_images(run_root)
    assert any(n.rsplit(".", 1)[0] == victim for n in images_before)
    listed = corpus_runs["root"] / "takedown.txt"
    listed.write_text(f"{victim}\n")
    conf = {"corpus_uri": corpus_runs["corpus_uri"], "list_uri": str(listed), "reason": "test opt-out"}

    t0 = time.perf_counter()
    dr = takedown_dag.test(logical_date=datetime(2025, 6, 1, tzinfo=UTC), run_conf=conf)
    seconds = time.perf_counter() - t0
    assert dr.state == "success", _states(dr)
    after = keys()
    assert set(before) - set(after) == {victim}
    # No byte of the removed image is left in the run's tars; every other image is.
    images_after = _tar_images(run_root)
    assert {n for n in images_before if n.rsplit(".", 1)[0] != victim} == set(images_after)
    from winnow.data.tarscan import image_uid

    assert uid not in {image_uid(b) for b in images_after.values()}
    summary = _xcom(dr, "takedown")
    assert summary["removed"] == 1 and summary["keys"] == [victim] and summary["run_keys"] == [_key(date)]
    event = _corpus_events(corpus_runs["corpus_uri"])[-1]
    assert event == {"takedown": summary["takedown"], "removed": 1}, event
    # The takedown task rewrote the corpus card: the takedown and its reason are on it.
    card = json.loads(Path(corpus_runs["corpus_uri"], "card.json").read_text())
    assert [(t["reason"], t["removed"]) for t in card["takedowns"]][-1:] == [("test opt-out", 1)], card["takedowns"]
    assert "test opt-out" in Path(corpus_runs["corpus_uri"], "CARD.md").read_text()
    # Idempotent: the same list again removes nothing more.
    dr2 = takedown_dag.test(logical_date=datetime(2025, 6, 2, tzinfo=UTC), run_conf=conf)
    assert dr2.state == "success" and keys() == after
    assert _xcom(dr2, "takedown")["removed"] == 0
    assert _corpus_events(corpus_runs["corpus_uri"])[-1] == {"takedown": None, "removed": 0}
    print(f"\ntakedown DAG run {seconds:.1f} s")


def test_takedown_dag_params_are_required(dagbag):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    dag = dagbag.dags["image_takedown"]
    assert dag.schedule is None
    assert [t.task_id for t in dag.tasks] == ["takedown"] and [a.name for a in dag.tasks[0].outlets] == ["winnow_corpus"]
    for word in ("idempotent", "resumable", "takedown"):
        assert word in dag.doc_md.lower()
    params = ParamsDict(dag.params)
    with pytest.raises(ParamValidationError):
        params.validate()  # corpus_uri, list_uri and reason have no default
    params.update({"corpus_uri": "s3://b/c", "list_uri": "s3://b/l.txt", "reason": "opt-out"})
    assert params.validate()["reason"] == "opt-out"
    for name, bad in (("reason", ""), ("reason", "   "), ("corpus_uri", ""), ("list_uri", "")):
        with pytest.raises(ParamValidationError):
            ParamsDict(dag.params)[name] = bad
