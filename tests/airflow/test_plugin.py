"""The winnow plugin's views and data endpoints over a real run, behind Airflow's real auth.

Tokens come from the real SimpleAuthManager (an admin and a user without a role); nothing is
overridden. The DAG runs are rows in the test metadata DB whose conf points at a run made by
the engine (the live browser test covers runs made by a real scheduler).
"""

from __future__ import annotations

import contextvars
import importlib
import json
import os
from datetime import UTC, datetime

import pytest

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """A run whose write stage failed on row group 1 (test-only fault hook)."""
    from winnow.data.sample import TINY_MODEL_PARAMS, generate_sample
    from winnow.exceptions import RowGroupsFailedError
    from winnow.pipeline import CurationConfig, run_all
    from winnow.stages.write import STAGE

    root = tmp_path_factory.mktemp("plugin")
    generate_sample(str(root / "in"), shards=1, per_shard=14, seed=5, corrupt=True)
    cfg = CurationConfig(input_uri=str(root / "in"), output_root=str(root / "out"), run_key="r1", buffer_size=5,
                         max_partitions=2, **{**TINY_MODEL_PARAMS, "aesthetic_threshold": 3.0, "nsfw_threshold": 0.6})
    os.environ["WINNOW_TEST_FAULTS"] = json.dumps({"stage": STAGE, "row_groups": [1]})
    try:
        with pytest.raises(RowGroupsFailedError):
            run_all(cfg, backend="local")
    finally:
        del os.environ["WINNOW_TEST_FAULTS"]
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
    return [f"/ui/run?dag_id=image_curation&run_id={run_id}", "/static/winnow.js", f"/api/runs/{run_id}/progress",
            f"/api/runs/{run_id}/gallery", f"/api/runs/{run_id}/scores", f"/api/runs/{run_id}/thumbs/0/0/100"]


def test_plugin_loads_and_declares_its_tabs(airflow_db):
    from airflow import plugins_manager

    assert not plugins_manager.get_import_errors()
    apps, _ = plugins_manager.get_fastapi_plugins()
    assert any(a.get("url_prefix") == "/winnow" for a in apps), apps
    views = {v["url_route"]: v for v in plugins_manager._get_ui_plugins()[0]}
    assert views["winnow-run"]["destination"] == "dag_run" and "{RUN_ID}" in views["winnow-run"]["href"]
    assert views["winnow-partition"]["destination"] == "task_instance" and "{MAP_INDEX}" in views["winnow-partition"]["href"]


def test_every_endpoint_needs_a_session_and_read_access_to_the_dag(http, dag_runs):
    _, client, _, nobody = http
    for path in _paths(dag_runs["ok"]):
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


def test_scores_give_a_joint_histogram_that_adds_up(http, dag_runs):
    _, client, admin, _ = http
    s = client.get(f"/api/runs/{dag_runs['ok']}/scores", headers=admin).json()
    assert sum(map(sum, s["joint"])) == s["scored"] > 0
    assert s["thresholds"] == {"aesthetic": 3.0, "nsfw": 0.6, "clip_score": 0.0} and s["clip_filter_on"] is False


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

    from winnow.stages.thresholds import keep_count, kth_best

    _, client, admin, _ = http
    m = built["fractions"]
    r = m["records"]
    s = client.get(f"/api/runs/{m['run_id']}/scores", headers=admin).json()
    clip = s["clip"]
    assert s["clip_filter_on"] is True and clip["enabled"] is True and s["filters"]["clip_score"]["keep_fraction"] == 0.7
    assert sum(clip["counts"]) == clip["scored"] == int((~np.isnan(r.clip)).sum()) > 0
    assert clip["threshold"] == s["thresholds"]["clip_score"] and clip["threshold"] in clip["edges"]
    assert sum(clip["counts"][clip["edges"].index(clip["threshold"]):]) == clip["kept_at_threshold"]
    for name, values in (("aesthetic", r.aesthetic), ("clip_score", r.clip)):
        q = s["keep_fractions"][name]
        n = int((~np.isnan(values)).sum())
        assert q["scored"] == n and len(q["table"]) == 100 and not q["sampled"]
        for row in q["table"]:
            assert row["threshold"] == kth_best(lambda v=values: iter([v]), keep_count(row["fraction"], n)), (name, row)
            assert row["keeps"] == int((values[~np.isnan(values)] >= row["threshold"]).sum())
        run_row = q["table"][round(q["run_fraction"] * 100) - 1]
        assert run_row["fraction"] == q["run_fraction"] and run_row["threshold"] == s["thresholds"][name]
    assert s["kept_at_thresholds"] == np.array(s["joint_clip_passed"])[
        s["aesthetic_edges"].index(s["thresholds"]["aesthetic"]):, :s["nsfw_edges"].index(0.5)].sum()


def test_scores_of_a_run_with_the_clip_filter_off_say_so(http, built):
    _, client, admin, _ = http
    s = client.get(f"/api/runs/{built['clipoff']['run_id']}/scores", headers=admin).json()
    assert s["clip_filter_on"] is False and s["clip"]["enabled"] is False and s["clip"]["kept_at_threshold"] is None
    assert s["thresholds"] == {"aesthetic": 4.0, "nsfw": 0.5, "clip_score": 0.0}
    assert s["joint_clip_passed"] == s["joint"] and s["keep_fractions"]["clip_score"]["run_fraction"] is None
    assert sum(s["clip"]["counts"]) == s["clip"]["scored"] > 0


def test_the_gallery_filters_and_explains_every_outcome_and_the_page_lists_them(http, built):
    import re

    from tests.report.test_report import GALLERY_ROWS
    from winnow.stages.thumbnails import OUTCOMES

    _, client, admin, _ = http
    base = f"/api/runs/{built['fractions']['run_id']}"
    page = client.get(f"{base}/gallery?limit=200", headers=admin).json()
    assert [i["outcome"] for i in page["items"]] == [row["outcome"] for row in GALLERY_ROWS]
    assert page["outcomes"] == list(OUTCOMES) and page["clip_filter_on"] is True
    for outcome in OUTCOMES:
        items = client.get(f"{base}/gallery?outcome={outcome}", headers=admin).json()["items"]
        assert [i["outcome"] for i in items] == [outcome] and items[0]["reason"], outcome
    html = client.get(f"/ui/run?dag_id=image_curation&run_id={built['fractions']['run_id']}", headers=admin).text
    assert re.findall(r'<option value="(\w+)">', html) == list(OUTCOMES)
    for element in ('id="hist-clip"', 'id="fa"', 'id="fc"'):
        assert element in html


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
    plugin._CONN_CACHE.clear()
    run = {"conf": {"storage_conn_id": "winnow_cache_probe"}}

    def poll() -> None:
        # In the api-server each request runs in a context of its own; here, a copy of this one,
        # so the connection's settings do not leak into the tests after this one.
        contextvars.copy_context().run(plugin._use_run_storage, run)

    for _ in range(5):
        poll()
        clock[0] += 3
    assert calls == ["winnow_cache_probe"]
    clock[0] += plugin.CONN_CACHE_S
    poll()
    assert calls == ["winnow_cache_probe"] * 2
    plugin._CONN_CACHE.clear()
