"""The corpus under a REAL Airflow 3.3 (the package's ``airflow standalone``: scheduler,
LocalExecutor, triggerer): ``airflow backfill create`` of three overlapping dates with
``--max-active-runs 3`` and one corpus gives the corpus that running the dates one after another
gives (``winnow.pipeline.run_all``, in this process, into a corpus of its own): the published runs
in date order, the manifest, the kept tars' bytes and the counts. The dates run side by side;
each date's ``corpus_check`` waits (deferred, on the triggerer) until the previous date has
published.

The backfill's runs are deleted when the module ends, so the package's later modules (which count
the DAG's backfill runs) see the DAG as they would without it. Slow: a few minutes.
"""

from __future__ import annotations

import glob
import json
import os
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests._corpus_data import RUN_PARAMS, make_dates
from tests._tiny import ONLY_DEDUP, TINY_MODEL, tiny_config
from tests.airflow._live import DAG_ID, LiveAirflowError
from tests.airflow.live.conftest import RUN_TIMEOUT
from winnow.filters import VALUE_COLUMNS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

DATES = ("2025-05-01", "2025-05-02", "2025-05-03")
BUFFER, PARTITIONS = 16, 1
#: Summary numbers that depend on how a run was driven, not on what it made.
DRIVEN = {"row_groups_computed", "row_groups_skipped", "seconds"}


def _key(date: str) -> str:
    return date.replace("-", "")


#: The run params of both ways (the DAG's conf adds the tiny model and ONLY_DEDUP, as tiny_config does).
RUN_CONF = {"url_field": "url", "buffer_size": BUFFER, "max_partitions": PARTITIONS, **RUN_PARAMS}


def _at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _corpus(corpus_uri: str, out: str) -> dict:
    """What a corpus is, with its output root written as ``OUT`` (the two corpora live apart)."""
    from winnow.corpus import iter_records, open_corpus

    def plain(value):
        if isinstance(value, str):
            return value.replace(out.rstrip("/"), "OUT").replace(corpus_uri.rstrip("/"), "CORPUS")
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    head = open_corpus(corpus_uri, None).head()
    runs = [{k: v for k, v in run.items() if k not in ("published_at", "seconds", "owner")} for run in head.runs]
    records = sorted((plain(r) for t in iter_records(corpus_uri) for r in t.to_pylist()),
                     key=lambda r: (r["run_key"], r["key"]))
    tars, counts = {}, {}
    for run in head.runs:
        run_root = f"{out}/{run['run_key']}"
        tars.update({os.path.relpath(p, out): Path(p).read_bytes() for p in glob.glob(f"{run_root}/write/p*/rg*.tar")})
        summary = json.loads(Path(run_root, "_summary.json").read_text())
        counts[run["run_key"]] = {k: v for k, v in summary.items()
                                  if isinstance(v, int) and not isinstance(v, bool) and k not in DRIVEN}
    return {"generation": head.generation, "runs": plain(runs), "records": records, "tars": tars, "counts": counts}


@pytest.fixture(scope="module")
def dates(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus-live")
    return {"root": root, "manifest": make_dates(root / "shards", dates=DATES)}


@pytest.fixture(scope="module")
def sequential(dates):
    """The reference: the three dates one after another, in this process (no Ray, no Airflow)."""
    from winnow.pipeline import run_all

    root = dates["root"]
    out, corpus = str(root / "seq-out"), str(root / "seq-corpus")
    t0 = time.perf_counter()
    for date in DATES:
        cfg = tiny_config(input_uri=str(root / "shards" / date), output_root=out, run_key=_key(date),
                          corpus_uri=corpus, **RUN_CONF)
        run_all(cfg, backend="local", logical_date=date)
    return {"out": out, "corpus": corpus, "seconds": time.perf_counter() - t0}


def _wait_backfill_done(af, timeout: float) -> None:
    """The scheduler marks a backfill complete a moment after its last run ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        backfills = af.api("GET", "/api/v2/backfills", params={"dag_id": DAG_ID}).json()["backfills"]
        if all(b.get("completed_at") for b in backfills):
            return
        time.sleep(2)


@pytest.fixture(scope="module")
def backfill(shared_airflow, dates, sequential):
    af = shared_airflow["af"]
    root = dates["root"]
    out, corpus = str(root / "live-out"), str(root / "live-corpus")
    conf = {"input_uri": str(root / "shards") + "/{{ ds }}", "output_root": out, "corpus_uri": corpus,
            **TINY_MODEL, **ONLY_DEDUP, **RUN_CONF}
    t0 = time.perf_counter()
    af.cli("backfill", "create", "--dag-id", DAG_ID, "--from-date", DATES[0], "--to-date", DATES[-1],
           "--max-active-runs", str(len(DATES)), "--dag-run-conf", json.dumps(conf))
    deadline = time.monotonic() + 2 * RUN_TIMEOUT
    try:
        while True:
            runs = {r["logical_date"][:10]: r for r in af.dag_runs()
                    if r["run_type"] == "backfill" and (r.get("logical_date") or "")[:10] in DATES}
            if len(runs) == len(DATES) and all(r["state"] in ("success", "failed") for r in runs.values()):
                break
            if time.monotonic() > deadline:
                raise LiveAirflowError(f"backfill not done: {[(d, r['state']) for d, r in runs.items()]}\n"
                                       f"{af.log_tail()}")
            time.sleep(3)
        seconds = time.perf_counter() - t0
        tis = {d: {(t["task_id"], t["map_index"]): t for t in af.task_instances(r["dag_run_id"])}
               for d, r in runs.items()}
        yield {"af": af, "runs": runs, "tis": tis, "out": out, "corpus": corpus, "seconds": seconds,
               "waits": {d: _waiting_lines(af, r["dag_run_id"]) for d, r in runs.items()},
               "failed_logs": {d: _failed_logs(af, r["dag_run_id"], tis[d]) for d, r in runs.items()}}
    finally:
        # Leave the DAG as the later modules expect it: no backfill running, none of these runs.
        _wait_backfill_done(af, 120)
        for r in [r for r in af.dag_runs() if r["run_type"] == "backfill" and (r.get("logical_date") or "")[:10] in DATES]:
            af.api("DELETE", f"/api/v2/dags/{DAG_ID}/dagRuns/{r['dag_run_id']}", ok=(200, 204, 404))


def _failed_logs(af, run_id: str, tis: dict) -> str:
    """The log tails of the run's failed task instances (what a failed assertion shows)."""
    out = []
    for task_id in sorted({task_id for (task_id, _), ti in tis.items() if ti["state"] == "failed"}):
        folder = af.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / f"task_id={task_id}"
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            out.append(f"--- {path.relative_to(folder.parent)} ---\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(out)


def _waiting_lines(af, run_id: str) -> int:
    """How many "waiting for run ..." lines the run's corpus_check logged (0: it never waited)."""
    folder = af.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / "task_id=corpus_check"
    return sum(p.read_text(errors="replace").count("waiting for run ") for p in folder.rglob("*") if p.is_file())


def test_backfill_publishes_in_date_order(backfill, sequential):
    for date in DATES:
        assert backfill["runs"][date]["state"] == "success", (date, {
            k: t["state"] for k, t in backfill["tis"][date].items() if t["state"] != "success"},
            backfill["failed_logs"][date])
    # Each date's corpus check ran after the previous date's publish ended: the gate held.
    for before, after in zip(DATES, DATES[1:]):
        published = _at(backfill["tis"][before][("publish", -1)]["end_date"])
        checked = _at(backfill["tis"][after][("corpus_check", -1)]["end_date"])
        assert checked > published, (before, published, after, checked)
    embed_starts = {d: min(_at(t["start_date"]) for (task_id, _), t in backfill["tis"][d].items()
                           if task_id == "partition.embed") for d in DATES}
    first_publish = _at(backfill["tis"][DATES[0]][("publish", -1)]["end_date"])
    side_by_side = [d for d in DATES[1:] if embed_starts[d] < first_publish]
    print(f"\nsequential reference (run_all, local backend) {sequential['seconds']:.0f} s; "
          f"backfill of {len(DATES)} dates with --max-active-runs {len(DATES)}: {backfill['seconds']:.0f} s; "
          f"'waiting for run' lines per date {backfill['waits']}; dates that embedded before the first date "
          f"published: {side_by_side}")


def test_backfill_builds_the_corpus_that_one_date_after_another_builds(backfill, sequential):
    live = _corpus(backfill["corpus"], backfill["out"])
    ref = _corpus(sequential["corpus"], sequential["out"])
    assert [r["run_key"] for r in live["runs"]] == [_key(d) for d in DATES]
    assert live["runs"] == ref["runs"]
    assert live["generation"] == ref["generation"]
    assert len(live["records"]) == len(ref["records"]) > 0
    # The same records, in the same runs, with the same tar members, urls, captions and
    # embeddings. Scores are compared to float32 rounding: the reference runs the heads in this
    # process, the DAG on Ray workers with other torch thread counts, and a CPU GEMM's last bit
    # depends on its blocking (observed: one aesthetic score 7.0918040 vs 7.0918045).
    scores = {name for name, t in VALUE_COLUMNS if t.startswith("float")}
    for a, b in zip(live["records"], ref["records"]):
        assert {k: v for k, v in a.items() if k not in scores} == {k: v for k, v in b.items() if k not in scores}
        for name in scores:
            assert (a[name] is None) == (b[name] is None) and (a[name] is None or a[name] == pytest.approx(b[name], rel=1e-5)), \
                (a["key"], name, a[name], b[name])
    assert sorted(live["tars"]) == sorted(ref["tars"]) and live["tars"] == ref["tars"]
    assert live["counts"] == ref["counts"]
    assert all(c["corpus_duplicates"] > 0 for k, c in live["counts"].items() if k != _key(DATES[0])), live["counts"]
    print(f"\nsequential reference {sequential['seconds']:.0f} s; corpus of {len(live['records'])} records, "
          f"generation {live['generation']}")


def test_publish_tasks_emitted_corpus_asset_events(backfill):
    from winnow_airflow.corpus import asset_uri

    af = backfill["af"]
    # Airflow keeps an asset that only an alias event created (no DAG names it) inactive: listed
    # with only_active=false, and scheduled on through the alias.
    assets = af.api("GET", "/api/v2/assets", params={"uri_pattern": asset_uri(backfill["corpus"]),
                                                     "only_active": "false"}).json()["assets"]
    assert len(assets) == 1, assets
    events = af.api("GET", "/api/v2/assets/events", params={"asset_id": assets[0]["id"], "limit": 100}).json()
    extras = sorted((e["extra"] for e in events["asset_events"]), key=lambda e: e["logical_date"])
    assert [(e["run_key"], e["logical_date"], e["published"]) for e in extras] == [
        (_key(d), d, True) for d in DATES]
