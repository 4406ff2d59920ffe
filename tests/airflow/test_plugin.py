"""The winnow plugin: progress of a real run from storage, behind Airflow's auth."""

from __future__ import annotations

import importlib

import pytest


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from winnow.data.sample import generate_sample
    from winnow.pipeline import CurationConfig, run_all

    root = tmp_path_factory.mktemp("plugin")
    generate_sample(str(root / "in"), shards=1, per_shard=10, seed=5)
    cfg = CurationConfig(
        input_uri=str(root / "in"), output_root=str(root / "out"), run_key="r1", buffer_size=4,
        max_partitions=2, model="winnow-tiny-vit", pretrained="random", allow_random_weights=True,
        aesthetic_threshold=0.0,
    )
    summary = run_all(cfg, backend="local")
    return root / "out", summary


@pytest.fixture()
def client(airflow_db, finished_run, monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.setenv("WINNOW_OUTPUT_ROOT", str(finished_run[0]))
    plugin = importlib.import_module("winnow_plugin")
    return plugin, TestClient(plugin.app)


def test_plugin_loads_from_the_plugins_folder_and_mounts_its_app(airflow_db):
    from airflow import plugins_manager

    assert not plugins_manager.get_import_errors()
    apps, _ = plugins_manager.get_fastapi_plugins()
    assert any(a.get("url_prefix") == "/winnow" for a in apps), apps


def test_progress_needs_authentication(client):
    _, http = client
    assert http.get("/runs/r1/progress").status_code in (401, 403)


def test_progress_reports_committed_row_groups_per_stage(client, finished_run):
    plugin, http = client
    http.app.dependency_overrides = {}
    # Authentication is Airflow's job (tested above); here the route itself, as an allowed user.
    route_deps = [r for r in plugin.app.routes if getattr(r, "path", "") == "/runs/{run_key}/progress"][0].dependencies
    for dep in route_deps:
        http.app.dependency_overrides[dep.dependency] = lambda: None
    body = http.get("/runs/r1/progress").json()
    assert body["row_groups"] == 3 and body["complete"] is True
    assert {s: v["committed"] for s, v in body["stages"].items()} == {s: 3 for s in body["stages"]}
    assert body["summary"]["kept"] == finished_run[1]["kept"]
    assert http.get("/runs/..%2Fetc/progress").status_code in (400, 404)
    assert http.get("/runs/nope/progress").status_code == 404
