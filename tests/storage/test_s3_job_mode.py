"""Job mode with shards and run root on a real S3 endpoint, the credentials only in the Airflow
``aws`` connection named by ``storage_conn_id``: neither this process (Airflow's task and
trigger) nor the Ray head and its job drivers and workers have any AWS_* variable.

Every step (index, the partition stages, centroids, each pairwise bucket) runs as a Ray Job; each
job gets short-lived credentials minted from the connection (STS GetSessionToken at the test
server). The run succeeds, the curation view reads it through the same connection, and the
connection's secret is in no task log, XCom, trigger kwargs, job entrypoint, job metadata,
runtime env or Ray log. With ``cluster_credentials: cluster`` and a cluster that has none, the
failure is one line naming the setting.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import pytest

from benchmarks._common import job_conn, jobs_of
from benchmarks._s3server import ACCESS_KEY, SECRET_KEY
from tests._multinode import DROPPED_PREFIXES, shared_multinode_fixture
from tests.airflow.conftest import airflow_db, curation_dag, dagbag, retries_set  # noqa: F401  (fixtures)
from tests.storage._runs import counts_of, upload_folder
from tests.storage.conftest import BUCKET, _reset_storage
from tests.storage.test_s3_dag import _output_to, _xcoms

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

RUN_DATE = datetime(2025, 8, 1, tzinfo=UTC)
CLUSTER_ID_DATE = datetime(2025, 8, 2, tzinfo=UTC)
PREFIX = f"s3://{BUCKET}/jobmode"
CONN_ID = "winnow_s3_jobs"
ONE_PARTITION = dict(buffer_size=12, max_partitions=1, model="winnow-tiny-vit", pretrained="random",
                     allow_random_weights=True, aesthetic_threshold=0.0)


def _without_aws() -> None:
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[key]


cluster = shared_multinode_fixture()


@pytest.fixture(scope="module")
def head(cluster):
    """The session's shared Ray (a head with the dashboard's Jobs API and token auth, two worker
    nodes; ``tests/conftest.py``) as the job-mode cluster: every process of it started with no
    AWS_* variable in its environment (``tests._multinode`` drops them)."""
    assert "AWS_" in "".join(DROPPED_PREFIXES)
    return {"url": cluster.dashboard_url, "token": cluster.token, "address": cluster.address,
            "temp_dir": cluster.temp_dir, "logs": [cluster.root / "head.log", *(n.log for n in cluster.nodes)]}


@pytest.fixture(scope="module")
def runs(s3, head, curation_dag, local_run, tmp_path_factory, pytestconfig):  # noqa: F811
    upload_folder(local_run["shards"], f"{PREFIX}/shards")  # the test's own upload, with the AWS_* of `s3`
    conn = {"conn_type": "aws", "login": ACCESS_KEY, "password": SECRET_KEY,
            "extra": {"endpoint_url": s3.endpoint, "region_name": "us-east-1"}}
    cluster_conn = {**conn, "extra": {**conn["extra"], "cluster_credentials": "cluster"}}
    env = {f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps(conn),
           "AIRFLOW_CONN_WINNOW_S3_CLUSTER_ID": json.dumps(cluster_conn),
           "AIRFLOW_CONN_RAY_S3JOBS": job_conn(head["url"], head["token"], poll_interval=1,
                                               one_job_max_records=0)}  # a job per step, each checked below
    conf = {"input_uri": f"{PREFIX}/shards/shard-{{000000..000001}}.tar", "output_root": f"{PREFIX}/out",
            "run_key": "jobs", "storage_conn_id": CONN_ID, "ray_conn_id": "ray_s3jobs", **ONE_PARTITION}
    logs = tmp_path_factory.mktemp("s3joblog")
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    out: dict = {}
    with mock.patch.dict(os.environ, env):
        _without_aws()
        _reset_storage()
        with capture.global_and_fixture_disabled(), retries_set(curation_dag, 0):
            with _output_to(str(logs / "run.log")):
                out["dr"] = curation_dag.test(logical_date=RUN_DATE, run_conf=conf)
            with _output_to(str(logs / "cluster_id.log")):
                out["cluster_id"] = curation_dag.test(
                    logical_date=CLUSTER_ID_DATE,
                    run_conf={**conf, "run_key": "cluster-id", "storage_conn_id": "winnow_s3_cluster_id"})
        out["progress"] = _curation_view(out["dr"].run_id)
        _reset_storage()
    out["log"] = (logs / "run.log").read_text(errors="replace")
    out["cluster_id_log"] = (logs / "cluster_id.log").read_text(errors="replace")
    out["jobs"] = jobs_of(head["url"], head["token"])
    out["local"] = local_run["summary"]
    return out


def _curation_view(run_id: str) -> dict:
    """The plugin's progress endpoint for the run, as the Curation tab asks for it."""
    from airflow.api_fastapi.app import create_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi.testclient import TestClient

    manager = create_auth_manager()
    manager.init()
    plugin = importlib.import_module("winnow_plugin")
    token = manager.generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
    r = TestClient(plugin.app).get(f"/api/runs/{run_id}/progress", headers={"Authorization": f"Bearer {token}"})
    return {"status": r.status_code, "body": r.json() if r.status_code == 200 else r.text}


def _jobs_of_run(runs, dr) -> list[dict]:
    return [j for j in runs["jobs"] if j["metadata"].get("airflow_run_id") == dr.run_id]


def test_job_mode_on_s3_with_only_the_connection_succeeds_with_the_local_counts(runs):
    assert runs["dr"].state == "success", runs["log"][-3000:]
    report = next(v for t, _, k, v in _xcoms(runs["dr"]) if t == "report" and k == "return_value")
    assert report["records"] == runs["local"]["records"] and report["undecodable"] > 0
    layout = ("partitions", "row_groups")  # one partition here, three in the reference: same records
    assert ({k: v for k, v in counts_of(report).items() if k not in layout}
            == {k: v for k, v in counts_of(runs["local"]).items() if k not in layout})


def test_every_step_ran_as_a_ray_job_on_the_cluster(runs):
    """Index, centroids and each pairwise bucket too: the Airflow worker scanned, clustered and
    compared nothing itself."""
    from winnow.job import chained_stages
    from winnow.registry import STAGES

    jobs = _jobs_of_run(runs, runs["dr"])
    stages = {j["metadata"]["winnow_stage"] for j in jobs}
    chained = {c for s in STAGES for c in chained_stages(s.name)}  # run inside the job of their phase
    assert stages == {s.name for s in STAGES} - chained, stages
    assert all(j["status"] == "SUCCEEDED" for j in jobs)
    units = {(j["metadata"]["winnow_stage"], j["metadata"]["winnow_unit"]) for j in jobs}
    assert ("index", "run") in units and ("centroids", "run") in units and ("pairwise", "b00000") in units


def test_each_job_got_short_lived_credentials_never_the_connection_secret(runs):
    jobs = _jobs_of_run(runs, runs["dr"])
    assert jobs
    for job in jobs:
        env = (job.get("runtime_env") or {}).get("env_vars") or {}
        assert env.get("AWS_SESSION_TOKEN") and env.get("AWS_ACCESS_KEY_ID") not in (None, ACCESS_KEY)
        assert env.get("AWS_SECRET_ACCESS_KEY") not in (None, SECRET_KEY)
        shown = json.dumps({k: job.get(k) for k in ("entrypoint", "metadata", "runtime_env", "message")})
        assert SECRET_KEY not in shown and ACCESS_KEY not in shown, job["submission_id"]


def test_the_secret_is_in_no_task_log_xcom_trigger_kwargs_or_ray_log(runs, head):
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    assert "short-lived credentials from connection" in runs["log"]
    assert SECRET_KEY not in runs["log"] and SECRET_KEY not in runs["cluster_id_log"]
    assert SECRET_KEY not in json.dumps(_xcoms(runs["dr"]), default=str)
    with create_session() as session:
        kwargs = [ti.next_kwargs for ti in session.query(TaskInstance).filter_by(run_id=runs["dr"].run_id)]
    assert SECRET_KEY not in json.dumps(kwargs, default=str)
    from winnow_airflow.triggers import RayJobTrigger

    _, trigger_kwargs = RayJobTrigger(conn_id="c", submission_id="s", storage_conn_id=CONN_ID).serialize()
    assert trigger_kwargs["storage_conn_id"] == CONN_ID and SECRET_KEY not in json.dumps(trigger_kwargs)
    ray_logs = [p for p in glob.glob(f"{head['temp_dir']}/**/*", recursive=True) if os.path.isfile(p)]
    assert any("job-driver-" in p for p in ray_logs)
    for path in ray_logs + [str(p) for p in head["logs"]]:
        try:
            data = Path(path).read_bytes()
        except OSError:
            continue
        assert SECRET_KEY.encode() not in data, path


def test_the_curation_view_reads_the_run_through_its_connection(runs):
    assert runs["progress"]["status"] == 200, runs["progress"]
    stages = {s["stage"]: s for s in runs["progress"]["body"]["stages"]}
    assert stages["embed"]["committed"] == stages["embed"]["units"] > 0
    assert all(s["status"] == "done" for s in stages.values()), {k: s["status"] for k, s in stages.items()}


def test_a_cluster_without_credentials_fails_in_one_line_naming_the_setting(runs):
    """``cluster_credentials: cluster`` sends no credentials; this cluster has none of its own."""
    dr = runs["cluster_id"]
    assert dr.state == "failed"
    log = runs["cluster_id_log"]
    lines = [ln for ln in log.splitlines() if "RayJobError" in ln and "ended FAILED" in ln]
    assert lines, log[-3000:]
    assert "StorageError" in lines[0] and "cluster_credentials" in lines[0], lines[0]
    assert "==" not in lines[0].split("ended FAILED", 1)[1]  # the job's message, not a base64 fragment
