"""The winnow plugin's views and data endpoints over a real run, behind Airflow's real auth.

Tokens come from the real SimpleAuthManager (an admin and a user without a role); nothing is
overridden. The DAG runs are rows in the test metadata DB whose conf points at a run made by
the engine (the live browser test covers runs made by a real scheduler).
"""

from __future__ import annotations

import importlib
import json
from datetime import UTC, datetime

import pytest

from tests._tiny import all_filters, off_threshold

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """A run whose write stage failed on row group 1 (test-only fault hook)."""
    from tests.report._runs import failed_write_run
    from winnow.stages.write import STAGE

    root = tmp_path_factory.mktemp("plugin")
    cfg = failed_write_run(root, run_key="r1", shards=1, per_shard=14, seed=5, max_partitions=2, failed_row_group=1)
    return {"out": str(root / "out"), "run_root": cfg.run_root, "stage": STAGE}


@pytest.fixture(scope="module")
def dag_runs(airflow_db, curated):
    """DAG runs in the metadata DB: one whose conf names the run, one with a bad run key."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState

    # The metadata DB is shared by the whole session (dag.test runs of other modules): these runs
    # take logical dates no other module uses, and replace any run that holds one already.
    when = datetime(2019, 6, 1, tzinfo=UTC)
    runs = {"ok": ("plugin-ok", {"output_root": curated["out"], "run_key": "r1"}),
            "escape": ("plugin-escape", {"output_root": curated["out"], "run_key": ".."}),
            "noroot": ("plugin-noroot", {})}
    with create_session() as session:
        for i, (run_id, conf) in enumerate(runs.values()):
            logical_date = when.replace(day=1 + i)
            for old in session.query(DagRun).filter(DagRun.dag_id == "image_curation").filter(
                    (DagRun.run_id == run_id) | (DagRun.logical_date == logical_date)):
                session.delete(old)
            session.flush()
            session.add(DagRun(dag_id="image_curation", run_id=run_id, run_type="manual", conf=conf,
                               state=DagRunState.FAILED, logical_date=logical_date, run_after=when))
    return {k: v[0] for k, v in runs.items()}


@pytest.fixture(scope="module")
def built(airflow_db, tmp_path_factory):
    """Two run roots made directly with CommitStore (tests/report/_runs.py), with DAG runs: one
    with keep fractions and the CLIP-score filter on (and a gallery of every outcome), one with
    the CLIP-score filter off."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState

    from tests.report._runs import build_run, commit_gallery, random_records
    from tests.report.test_report import GALLERY_ROWS
    from winnow.rowgroups import CommitStore
    from winnow.stages.thresholds import ThresholdsConfig

    out = tmp_path_factory.mktemp("plugin-built") / "out"
    configs = {"fractions": ThresholdsConfig(aesthetic_keep_fraction=0.4, clip_score_keep_fraction=0.7),
               "clipoff": ThresholdsConfig(aesthetic_threshold=4.0)}
    made = {}
    for key, config in configs.items():
        records = random_records(83, seed=len(key))
        plan = build_run(str(out / key), records, config, buffer_size=8)
        made[key] = {"run_id": f"plugin-{key}", "records": records, "plan": plan, "root": str(out / key)}
    commit_gallery(CommitStore(made["fractions"]["root"]), made["fractions"]["plan"], 0, GALLERY_ROWS)
    when = datetime(2019, 7, 1, tzinfo=UTC)
    with create_session() as session:
        for i, (key, m) in enumerate(made.items()):
            logical_date = when.replace(day=1 + i)
            for old in session.query(DagRun).filter(DagRun.dag_id == "image_curation").filter(
                    (DagRun.run_id == m["run_id"]) | (DagRun.logical_date == logical_date)):
                session.delete(old)
            session.flush()
            session.add(DagRun(dag_id="image_curation", run_id=m["run_id"], run_type="manual",
                               conf={"output_root": str(out), "run_key": key}, state=DagRunState.SUCCESS,
                               logical_date=logical_date, run_after=when))
    return made


@pytest.fixture(scope="module")
def corpus_dag_runs(airflow_db, tmp_path_factory):
    """Three real runs that build one corpus, with a takedown between the second and the third,
    and a run without a corpus (tests/report/test_corpus_view.py), with DAG runs whose conf names
    only the output root and run key (the corpus is found from the run root); one more DAG run
    whose conf names the corpus and a run key that has not run yet."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState

    from tests.report.test_corpus_view import build_corpus_runs

    made = build_corpus_runs(tmp_path_factory.mktemp("plugin-corpus"))
    out = str(made["out"])
    runs = {"first": ("plugin-corpus-1", {"output_root": out, "run_key": "20250301"}),
            "second": ("plugin-corpus-2", {"output_root": out, "run_key": "20250302"}),
            "third": ("plugin-corpus-3", {"output_root": out, "run_key": "20250303"}),
            "plain": ("plugin-corpus-plain", {"output_root": out, "run_key": "plain"}),
            "waiting": ("plugin-corpus-waiting", {"output_root": out, "run_key": "20250304",
                                                  "corpus_uri": str(made["corpus"])})}
    when = datetime(2019, 8, 1, tzinfo=UTC)
    with create_session() as session:
        for i, (run_id, conf) in enumerate(runs.values()):
            logical_date = when.replace(day=1 + i)
            for old in session.query(DagRun).filter(DagRun.dag_id == "image_curation").filter(
                    (DagRun.run_id == run_id) | (DagRun.logical_date == logical_date)):
                session.delete(old)
            session.flush()
            session.add(DagRun(dag_id="image_curation", run_id=run_id, run_type="manual", conf=conf,
                               state=DagRunState.RUNNING if run_id.endswith("waiting") else DagRunState.SUCCESS,
                               logical_date=logical_date, run_after=when))
    return {**made, "run_ids": {k: v[0] for k, v in runs.items()}}


@pytest.fixture(scope="module")
def http(airflow_db):
    """The plugin's app with the real auth manager, and tokens for an admin and a roleless user."""
    from airflow.api_fastapi.app import create_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi.testclient import TestClient

    manager = create_auth_manager()
    manager.init()
    plugin = importlib.import_module("winnow_plugin")
    admin = manager.generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
    nobody = manager.generate_jwt(SimpleAuthManagerUser(username="outsider", role=None))
    return plugin, TestClient(plugin.app), {"Authorization": f"Bearer {admin}"}, {"Authorization": f"Bearer {nobody}"}


def _paths(run_id: str) -> list[str]:
    return [f"/ui/run?dag_id=image_curation&run_id={run_id}", "/static/winnow.js", "/api/filters",
            f"/api/runs/{run_id}/progress", f"/api/runs/{run_id}/gallery", f"/api/runs/{run_id}/scores",
            f"/api/runs/{run_id}/thumbs/0/0/100", f"/api/runs/{run_id}/corpus"]


def test_plugin_loads_and_declares_its_tabs(airflow_db):
    from airflow import plugins_manager

    assert not plugins_manager.get_import_errors()
    apps, _ = plugins_manager.get_fastapi_plugins()
    assert any(a.get("url_prefix") == "/winnow" for a in apps), apps
    views = {v["url_route"]: v for v in plugins_manager._get_ui_plugins()[0]}
    assert views["winnow-run"]["destination"] == "dag_run" and "{RUN_ID}" in views["winnow-run"]["href"]
    assert views["winnow-partition"]["destination"] == "task_instance" and "{MAP_INDEX}" in views["winnow-partition"]["href"]


def test_every_endpoint_needs_a_session_and_read_access_to_the_dag(http, dag_runs, corpus_dag_runs):
    _, client, _, nobody = http
    for path in _paths(dag_runs["ok"]) + _paths(corpus_dag_runs["run_ids"]["second"]):
        assert client.get(path).status_code == 401, path
        r = client.get(path, headers=nobody)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]


def test_run_page_is_plain_html_with_a_strict_csp_and_no_inline_script(http, dag_runs):
    _, client, admin, _ = http
    r = client.get(f"/ui/run?dag_id=image_curation&run_id={dag_runs['ok']}", headers=admin)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'self'" in csp
    import re

    scripts = re.findall(r"<script[^>]*>(.*?)</script>", r.text, flags=re.S)
    assert scripts and all(s.strip() == "" for s in scripts)  # only <script src=...>
    assert "http://" not in r.text and "https://" not in r.text  # nothing from a CDN
    assert client.get("/static/winnow.js", headers=admin).headers["content-type"].startswith("text/javascript")
    for bad in ("/static/run.html", "/static/..%2Fwinnow_plugin.py", "/static/winnow_plugin.py"):
        assert client.get(bad, headers=admin).status_code == 404, bad


def test_progress_finds_the_run_root_from_the_dag_run_and_shows_the_failed_row_group(http, dag_runs, curated):
    _, client, admin, _ = http
    r = client.get(f"/api/runs/{dag_runs['ok']}/progress", headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["run_root"] == curated["run_root"] and body["dag_run"]["state"] == "failed"
    write = next(s for s in body["stages"] if s["stage"] == curated["stage"])
    assert write["failed"] == 1 and write["map"].startswith("1c1f")
    assert "injected test fault" in write["errors"][0]["error"]
    status = {s["stage"]: s["status"] for s in body["stages"]}
    assert status == {**{s: "done" for s in status}, curated["stage"]: "failed"}, status  # no stage "pending"
    again = client.get(f"/api/runs/{dag_runs['ok']}/progress", headers={**admin, "If-None-Match": r.headers["ETag"]})
    assert again.status_code == 304 and again.content == b""


def test_unknown_runs_bad_run_keys_and_runs_without_a_root_are_refused(http, dag_runs):
    _, client, admin, _ = http
    assert client.get("/api/runs/no-such-run/progress", headers=admin).status_code == 404
    assert client.get("/api/runs/..%2F..%2Fetc/progress", headers=admin).status_code == 404
    r = client.get(f"/api/runs/{dag_runs['escape']}/progress", headers=admin)
    assert r.status_code == 400 and "run key" in r.json()["detail"]
    r = client.get(f"/api/runs/{dag_runs['noroot']}/gallery", headers=admin)
    assert r.status_code == 404 and "no run root" in r.json()["detail"]


def test_gallery_pages_filter_and_thumbnails_come_as_jpeg_by_offset(http, dag_runs):
    _, client, admin, _ = http
    base = f"/api/runs/{dag_runs['ok']}"
    page = client.get(f"{base}/gallery?limit=200", headers=admin).json()
    items = page["items"]
    assert items and page["next"] is None and 1 not in {i["row_group"] for i in items}
    with_thumb = next(i for i in items if i["thumb_size"])
    r = client.get(f"{base}/thumbs/{with_thumb['row_group']}/{with_thumb['thumb_offset']}/{with_thumb['thumb_size']}",
                   headers=admin)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    undecodable = client.get(f"{base}/gallery?outcome=undecodable", headers=admin).json()["items"]
    assert undecodable and all(i["outcome"] == "undecodable" for i in undecodable)
    assert client.get(f"{base}/gallery?outcome=../x", headers=admin).status_code == 400
    assert client.get(f"{base}/thumbs/1/0/100", headers=admin).status_code == 404  # failed row group
    assert client.get(f"{base}/thumbs/999/0/100", headers=admin).status_code == 404
    assert client.get(f"{base}/thumbs/0/-1/100", headers=admin).status_code in (404, 422)


def test_scores_give_histograms_and_whatif_cells_that_add_up_to_the_runs_kept_count(http, dag_runs, curated):
    from tests.report.test_report import _consistent, run_limits, whatif_kept
    from winnow.data.index import load_index
    from winnow.stages.status import count_outcomes

    _, client, admin, _ = http
    s = client.get(f"/api/runs/{dag_runs['ok']}/scores", headers=admin).json()
    _consistent(s)
    assert s["population"] > 0 and all(f["scored"] > 0 for f in s["filters"] if f["enabled"])
    assert s["thresholds"] == all_filters({"aesthetic": 3.0, "nsfw": 0.6}, off_threshold)
    assert s["enabled"] == all_filters({"aesthetic": True, "nsfw": True}, False)
    counts = count_outcomes(curated["run_root"], load_index(curated["run_root"]).plan)
    assert whatif_kept(s, run_limits(s)) == s["kept_at_thresholds"] == counts["kept"]


def test_run_root_comes_from_the_index_tasks_xcom_before_the_conf():
    plugin = importlib.import_module("winnow_plugin")
    run = {"index_summary": {"run_root": "s3://bucket/curated/20250101"}, "conf": {"output_root": "/elsewhere"},
           "logical_date": None, "run_id": "r"}
    assert plugin.run_root_of(run) == "s3://bucket/curated/20250101"
    run = {"index_summary": None, "conf": {"output_root": "s3://b/c/"}, "run_id": "manual__x",
           "logical_date": datetime(2025, 1, 2, tzinfo=UTC)}
    assert plugin.run_root_of(run) == "s3://b/c/20250102"  # the DAG's default run key rule


def test_extra_link_points_at_the_tab_of_the_task_instance():
    from winnow_airflow.links import view_url

    assert view_url("image_curation", "r 1", "write", 2) == \
        "/dags/image_curation/runs/r%201/tasks/write/mapped/2/plugin/winnow-partition"
    assert view_url("image_curation", "r1", "report", -1) == "/dags/image_curation/runs/r1/plugin/winnow-run"


def test_scores_give_the_clip_histogram_and_keep_fraction_tables_the_thresholds_step_would_pick(http, built):
    import numpy as np

    from tests.report.test_report import _by_name, _consistent, run_limits, whatif_kept
    from winnow.stages.thresholds import keep_count, kth_best

    _, client, admin, _ = http
    m = built["fractions"]
    r = m["records"]
    s = client.get(f"/api/runs/{m['run_id']}/scores", headers=admin).json()
    _consistent(s)
    by = _by_name(s)
    clip = by["clip_score"]
    assert s["enabled"] == all_filters({"aesthetic": True, "nsfw": True, "clip_score": True}, False)
    assert clip["enabled"] is True
    assert s["entries"]["clip_score"]["keep_fraction"] == clip["run_fraction"] == 0.7
    assert sum(clip["counts"]) == clip["scored"] == int((~np.isnan(r.clip) & r.population).sum()) > 0
    assert clip["threshold"] == s["thresholds"]["clip_score"] and clip["threshold"] in clip["edges"]
    assert sum(clip["counts"][clip["edges"].index(clip["threshold"]):]) == clip["kept_at_threshold"]
    assert not s["sampled"] and not s["whatif"]["sampled"]
    for name, values in (("aesthetic", r.aesthetic), ("clip_score", r.clip)):
        f = by[name]
        q = f["fraction_table"]
        n = int((~np.isnan(values)).sum())
        assert f["fraction_scored"] == n and len(q) == 100
        for row in q:
            assert row["threshold"] == kth_best(lambda v=values: iter([v]), keep_count(row["fraction"], n)), (name, row)
            assert row["keeps"] == int((values[~np.isnan(values)] >= row["threshold"]).sum())
        run_row = q[round(f["run_fraction"] * 100) - 1]
        assert run_row["fraction"] == f["run_fraction"] and run_row["threshold"] == s["thresholds"][name] == f["threshold"]
    assert by["aesthetic"]["run_fraction"] == 0.4 and s["thresholds"]["nsfw"] == 0.5
    assert s["kept_at_thresholds"] == whatif_kept(s, run_limits(s)) == r.kept_by(run_limits(s))


def test_scores_of_a_run_with_the_clip_filter_off_say_so(http, built):
    from tests.report.test_report import _by_name, _consistent, run_limits, whatif_kept

    _, client, admin, _ = http
    m = built["clipoff"]
    s = client.get(f"/api/runs/{m['run_id']}/scores", headers=admin).json()
    _consistent(s)
    clip = _by_name(s)["clip_score"]
    assert s["enabled"] == all_filters({"aesthetic": True, "nsfw": True}, False)
    assert clip["enabled"] is False and clip["kept_at_threshold"] is None and clip["run_fraction"] is None
    assert s["thresholds"] == all_filters({"aesthetic": 4.0, "nsfw": 0.5}, off_threshold)
    assert sum(clip["counts"]) == clip["scored"] > 0
    # Off: it drops nothing, records without a caption included.
    assert run_limits(s)["clip_score"] is None and clip["missing"]["records"] > 0
    assert s["kept_at_thresholds"] == whatif_kept(s, run_limits(s)) == m["records"].kept_by(run_limits(s))


def test_the_gallery_filters_and_explains_every_outcome_and_the_page_lists_them(http, built):
    from tests.report.test_report import GALLERY_ROWS
    from winnow.stages.thumbnails import OUTCOMES

    _, client, admin, _ = http
    base = f"/api/runs/{built['fractions']['run_id']}"
    page = client.get(f"{base}/gallery?limit=200", headers=admin).json()
    assert [i["outcome"] for i in page["items"]] == [row["outcome"] for row in GALLERY_ROWS]
    assert page["outcomes"] == list(OUTCOMES)
    assert page["enabled"] == all_filters({"aesthetic": True, "nsfw": True, "clip_score": True}, False)
    for outcome in OUTCOMES:
        items = client.get(f"{base}/gallery?outcome={outcome}", headers=admin).json()["items"]
        assert [i["outcome"] for i in items] == [outcome] and items[0]["reason"], outcome
    # The page's outcome menu is made from /api/filters: see the test after this one.
    html = client.get(f"/ui/run?dag_id=image_curation&run_id={built['fractions']['run_id']}", headers=admin)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")


#: Words of a filter that are the browser's own property names too (the ``width`` and ``height``
#: of a canvas, a style, a DOMRect, a TextMetrics: the image-size filters' columns): the script may
#: write them as a property. As a string or an option value it may not, as any filter word.
DOM_PROPERTIES = frozenset({"width", "height"})


def _filter_words() -> dict[str, str]:
    """Every word that belongs to one filter (its name, outcome, summary count, params and
    columns) -> the filter."""
    from winnow.filters import FILTERS

    words: dict[str, str] = {}
    for spec in FILTERS:
        own = [spec.name, spec.outcome, spec.count, *(p.name for p in spec.params), *spec.column_names]
        if spec.missing is not None:
            own += [spec.missing.outcome, spec.missing.count, spec.missing.column]
        words.update(dict.fromkeys(own, spec.name))
    return words


def test_the_filter_list_comes_from_the_declarations_and_the_view_names_no_filter(http):
    import re
    from pathlib import Path

    from winnow.filters import ALL_COUNT_NAMES, FILTERS, OUTCOMES, PARAMS, describe

    plugin, client, admin, _ = http
    r = client.get("/api/filters", headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["filters"] == json.loads(json.dumps(describe()))
    assert [f["name"] for f in body["filters"]] == [spec.name for spec in FILTERS]
    for f, spec in zip(body["filters"], FILTERS):
        assert (f["keep"], f["label"], f["outcome"], f["count"], f["columns"], f["off"]) == \
            (spec.keep, spec.label, spec.outcome, spec.count, list(spec.column_names), spec.off)
        assert [f["threshold_param"], f["fraction_param"]] == [p.name for p in spec.params] + [None] * (2 - len(spec.params))
    assert [p for f in body["filters"] for p in (f["threshold_param"], f["fraction_param"]) if p] == [p.name for p in PARAMS]
    assert [o["name"] for o in body["outcomes"]] == list(OUTCOMES)
    assert all(o["count"] == ALL_COUNT_NAMES[o["name"]] and o["label"] for o in body["outcomes"])
    # The view builds its menus, histograms and sliders from that list: neither the page nor its
    # script writes a filter's word as a string, an option value or (the script) a property.
    static = Path(plugin.__file__).with_name("winnow_static")
    found = []
    for name in ("winnow.js", "run.html"):
        text = (static / name).read_text()
        for word, spec in _filter_words().items():
            w = re.escape(word)
            patterns = [rf"([\"'`]){w}\1", rf"<option[^>]*value\s*=\s*[\"']?{w}\b"]
            if name.endswith(".js") and word not in DOM_PROPERTIES:
                patterns.append(rf"\.{w}\b")
            found += [(name, spec, word, m.group(0)) for p in patterns for m in re.finditer(p, text)]
    assert not found, found


def test_the_runs_storage_connection_is_looked_up_once_per_cache_period_not_per_poll(airflow_db, monkeypatch):
    """The run view polls every 3 s: the connection (a metadata-DB read) is looked up once per
    ``CONN_CACHE_S``, then again after it, so an edited connection is seen within it. (A spy
    counts the real lookups.)"""
    from airflow.models.connection import Connection

    plugin = importlib.import_module("winnow_plugin")
    conn = Connection(conn_id="winnow_cache_probe", conn_type="aws", login="AKIDPROBE", password="probe-secret",
                      extra=json.dumps({"endpoint_url": "http://127.0.0.1:9"}))
    calls = []
    monkeypatch.setattr(Connection, "get_connection_from_secrets",
                        classmethod(lambda cls, conn_id: calls.append(conn_id) or conn))
    clock = [1000.0]
    monkeypatch.setattr(plugin.time, "monotonic", lambda: clock[0])
    plugin._RUN_STORAGE.clear()
    run = {"conf": {"storage_conn_id": "winnow_cache_probe"}}

    def poll() -> None:
        # Each request gets the run's settings as a value of its own; nothing is installed.
        options = plugin.run_storage(run)
        assert options.endpoint_url == "http://127.0.0.1:9" and options.access_key_id == "AKIDPROBE"

    for _ in range(5):
        poll()
        clock[0] += 3
    assert calls == ["winnow_cache_probe"]
    clock[0] += plugin.CONN_CACHE_S
    poll()
    assert calls == ["winnow_cache_probe"] * 2
    plugin._RUN_STORAGE.clear()


def test_the_corpus_view_lists_the_runs_the_totals_and_the_takedowns_of_a_runs_corpus(http, corpus_dag_runs):
    _, client, admin, _ = http
    ids, summaries = corpus_dag_runs["run_ids"], corpus_dag_runs["summaries"]
    r = client.get(f"/api/runs/{ids['second']}/corpus", headers=admin)
    assert r.status_code == 200, r.text
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    body = r.json()
    assert body["corpus_uri"] == str(corpus_dag_runs["corpus"]) and body["generation"] == 4
    assert [(x["run_key"], x["logical_date"], x["generation"], x["this"]) for x in body["runs"]] == \
        [("20250301", "2025-03-01", 1, False), ("20250302", "2025-03-02", 2, True), ("20250303", "2025-03-03", 4, False)]
    for x, s in zip(body["runs"], summaries.values()):
        assert x["records"] == s["kept"] and x["published_at"]
        assert {k: x["counts"][k] for k in ("records", "kept", "corpus_duplicates", "takedowns")} == \
            {k: s[k] for k in ("records", "kept", "corpus_duplicates", "takedowns")}
    added = sum(s["kept"] for s in summaries.values())
    assert (body["published_records"], body["taken_down"], body["records"]) == (added, 2, added - 2)
    (t,) = body["takedowns"]
    assert (t["reason"], t["date"], t["identifiers"], t["removed"], t["run_keys"]) == \
        ("opt-out request", "2025-03-02", 2, 2, ["20250301"])
    assert body["this_run"] == {"run_key": "20250302", "published": True, "generation": 2, "logical_date": "2025-03-02"}
    # A run that has not reached its corpus steps: the corpus its conf names, and not published.
    waiting = client.get(f"/api/runs/{ids['waiting']}/corpus", headers=admin).json()
    assert waiting["this_run"]["published"] is False and len(waiting["runs"]) == 3
    assert not any(x["this"] for x in waiting["runs"])


def test_a_run_without_a_corpus_has_no_corpus_view(http, corpus_dag_runs, dag_runs):
    _, client, admin, _ = http
    for run_id in (corpus_dag_runs["run_ids"]["plain"], dag_runs["ok"]):
        r = client.get(f"/api/runs/{run_id}/corpus", headers=admin)
        assert r.status_code == 404 and "has no corpus" in r.json()["detail"], (run_id, r.text)
    assert client.get("/api/runs/no-such-run/corpus", headers=admin).status_code == 404
    assert client.get(f"/api/runs/{dag_runs['noroot']}/corpus", headers=admin).status_code == 404


def test_the_gallery_of_a_corpus_run_shows_each_corpus_duplicate_beside_the_earlier_records_picture(http, corpus_dag_runs):
    import io

    from PIL import Image

    _, client, admin, _ = http
    base = f"/api/runs/{corpus_dag_runs['run_ids']['second']}"
    page = client.get(f"{base}/gallery?outcome=corpus_duplicate&limit=200", headers=admin)
    assert page.status_code == 200, page.text
    items = page.json()["items"]
    copies = {c["key"]: c for c in corpus_dag_runs["data"]["dates"]["2025-03-02"]["copies"]}
    assert items and all(i["outcome"] == "corpus_duplicate" for i in items)
    shown = 0
    for item in items:
        copy = copies[item["key"]]
        assert (item["duplicate_of_run"], item["duplicate_of_key"]) == ("20250301", copy["of_key"]), item
        if item["original_thumb_offset"] is None:  # its original was taken down since
            assert copy["key"] == corpus_dag_runs["gone_copy"]["key"]
            continue
        r = client.get(f"{base}/thumbs/{item['row_group']}/{item['original_thumb_offset']}/{item['original_thumb_size']}",
                       headers=admin)
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", r.text
        with Image.open(io.BytesIO(r.content)) as img:
            img.load()
            assert min(img.size) > 0
        shown += 1
    assert shown == len(items) - 1 >= 2
    # The third run's taken-down copy: no picture, the takedown's reason.
    third = f"/api/runs/{corpus_dag_runs['run_ids']['third']}"
    (taken,) = client.get(f"{third}/gallery?outcome=takedown", headers=admin).json()["items"]
    assert taken["thumb_offset"] is None and taken["takedown_reason"] == "opt-out request"
    # A gallery without a corpus has the corpus fields, empty.
    plain = f"/api/runs/{corpus_dag_runs['run_ids']['plain']}"
    items = client.get(f"{plain}/gallery?limit=200", headers=admin).json()["items"]
    assert items and all(i["duplicate_of_run"] is None and i["takedown_reason"] is None for i in items)


def test_the_page_has_a_corpus_tab_that_the_script_shows_only_for_a_run_with_a_corpus(http, corpus_dag_runs):
    import re
    from pathlib import Path

    plugin, client, admin, _ = http
    html = client.get(f"/ui/run?dag_id=image_curation&run_id={corpus_dag_runs['run_ids']['second']}", headers=admin).text
    # Hidden until the script has asked /corpus; its section is empty until then.
    assert re.search(r'<button type="button" data-tab="corpus" hidden>Corpus</button>', html)
    assert re.search(r'<section id="tab-corpus" hidden>', html)
    js = (Path(plugin.__file__).with_name("winnow_static") / "winnow.js").read_text()
    assert '"/corpus"' in js and "innerHTML" not in js and "insertAdjacentHTML" not in js
