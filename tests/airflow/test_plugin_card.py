"""The dataset card in the Curation view: ``GET /winnow/api/runs/{run_id}/card`` through the
plugin's FastAPI app behind Airflow's real auth (the ``http`` fixture of test_plugin.py), over a
real tiny run (local backend) whose report wrote ``card.json`` and ``CARD.md``; and the page's
Card tab."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests._tiny import tiny_config
from tests.airflow.test_plugin import http  # noqa: F401 - the shared fixture

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def card_runs(airflow_db, tmp_path_factory):
    """A reported run (the CLIP-score filter on by keep fraction), a copy of it whose card files
    are gone (a run reported before cards existed), and a run key nothing has run under; a DAG run
    for each."""
    import shutil

    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState

    from winnow.data.sample import generate_sample
    from winnow.pipeline import run_all

    root = tmp_path_factory.mktemp("plugin-card")
    generate_sample(str(root / "in"), shards=1, per_shard=10, seed=4)
    out = root / "out"
    cfg = tiny_config(input_uri=str(root / "in"), output_root=str(out), run_key="carded", buffer_size=5,
                      max_partitions=2, clip_score_keep_fraction=0.6)
    summary = run_all(cfg, backend="local")
    shutil.copytree(out / "carded", out / "older")
    for name in ("card.json", "CARD.md"):
        (out / "older" / name).unlink()
    runs = {"carded": "plugin-card-1", "older": "plugin-card-2", "notyet": "plugin-card-3"}
    when = datetime(2019, 10, 1, tzinfo=UTC)
    with create_session() as session:
        for i, (key, run_id) in enumerate(runs.items()):
            logical_date = when.replace(day=1 + i)
            for old in session.query(DagRun).filter(DagRun.dag_id == "image_curation").filter(
                    (DagRun.run_id == run_id) | (DagRun.logical_date == logical_date)):
                session.delete(old)
            session.flush()
            session.add(DagRun(dag_id="image_curation", run_id=run_id, run_type="manual",
                               conf={"output_root": str(out), "run_key": key},
                               state=DagRunState.RUNNING if key == "notyet" else DagRunState.SUCCESS,
                               logical_date=logical_date, run_after=when))
    return {"out": out, "summary": summary, "run_ids": runs}


def test_the_card_endpoint_serves_the_card_the_report_wrote(http, card_runs):  # noqa: F811
    _, client, admin, nobody = http
    path = f"/api/runs/{card_runs['run_ids']['carded']}/card"
    assert client.get(path).status_code == 401
    assert client.get(path, headers=nobody).status_code == 403
    r = client.get(path, headers=admin)
    assert r.status_code == 200, r.text
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    body = r.json()
    run_root = card_runs["out"] / "carded"
    assert body["stored"] is True
    assert body["card"] == json.loads((run_root / "card.json").read_text())
    assert body["markdown"] == (run_root / "CARD.md").read_text()
    card, summary = body["card"], card_runs["summary"]
    assert card["counts"]["records"] == summary["records"]
    assert {o["count"]: o["records"] for o in card["counts"]["outcomes"]}["kept"] == summary["kept"]
    assert {f["name"]: f["threshold"] for f in card["filters"]} == summary["thresholds"]
    clip = next(f for f in card["filters"] if f["chosen_by"] == "keep_fraction")
    assert clip["keep_fraction"] == 0.6 and "chosen by keep_fraction" in body["markdown"]


def test_a_run_reported_before_cards_gets_one_built_from_storage_and_a_run_not_reported_none(http, card_runs):  # noqa: F811
    _, client, admin, _ = http
    ids = card_runs["run_ids"]
    carded = client.get(f"/api/runs/{ids['carded']}/card", headers=admin).json()
    r = client.get(f"/api/runs/{ids['older']}/card", headers=admin)
    assert r.status_code == 200, r.text
    older = r.json()
    assert older["stored"] is False
    assert not (card_runs["out"] / "older" / "card.json").exists()  # the view writes nothing
    # The card of the run it was copied from, built now from the copied storage.
    assert older["card"]["counts"] == carded["card"]["counts"]
    assert older["card"]["filters"] == carded["card"]["filters"]
    r = client.get(f"/api/runs/{ids['notyet']}/card", headers=admin)
    assert r.status_code == 404 and "has no card yet" in r.json()["detail"], r.text
    assert client.get("/api/runs/no-such-run/card", headers=admin).status_code == 404


def test_the_page_has_a_card_tab_that_its_script_fills_from_the_card_endpoint(http, card_runs):  # noqa: F811
    import re

    plugin, client, admin, _ = http
    html = client.get(f"/ui/run?dag_id=image_curation&run_id={card_runs['run_ids']['carded']}", headers=admin).text
    assert re.search(r'<button type="button" data-tab="card">Card</button>', html)
    assert re.search(r'<section id="tab-card" hidden>', html)
    js = (Path(plugin.__file__).with_name("winnow_static") / "winnow.js").read_text()
    assert '"/card"' in js and "renderCard" in js and "innerHTML" not in js and "insertAdjacentHTML" not in js
