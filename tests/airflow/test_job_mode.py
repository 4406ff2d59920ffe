"""Job mode under ``dag.test()`` (Airflow runs the trigger inline) against a real Ray head with the
dashboard, its job server and token auth: the same output and counts as driver mode, job ids that
a later try finds again, and a wrong token that fails fast without showing the token.

The head is the session's shared multi-node Ray (``tests/conftest.py``: a 0-CPU head, two worker
nodes), and the job- and driver-mode runs checked here are the ones ``test_multinode_dag.py``
compares with a single-node reference (``cluster_dag_runs``, 2 partitions): one cluster and one
run of each mode for both modules. Job mode on a plain single head runs in the live job-mode and
the S3 job-mode modules. Slow: each Ray Job pays a driver and worker start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from unittest import mock

import pytest

from benchmarks._common import job_conn
from tests._multinode import shared_multinode_fixture
from tests.airflow._ray_jobs import output

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

BAD_TOKEN_DATE = datetime(2025, 4, 3, tzinfo=UTC)

cluster = shared_multinode_fixture()


@pytest.fixture(scope="module")
def ray_jobs(cluster, cluster_dag_runs):
    """The shared cluster's head as this module's job server (and the runs' input folder)."""
    return {"url": cluster.dashboard_url, "token": cluster.token, "address": cluster.address,
            "root": cluster_dag_runs["root"]}


@pytest.fixture(scope="module")
def runs(cluster_dag_runs):
    """The same input curated twice on the cluster: job mode, then driver mode (attached by GCS
    address + token)."""
    from winnow.rowgroups.plan import RowGroupPlan

    conf = cluster_dag_runs["conf"]
    plan = RowGroupPlan(num_records=cluster_dag_runs["manifest"]["expected"]["records"],
                        buffer_size=conf["buffer_size"], max_partitions=conf["max_partitions"])
    assert plan.num_partitions == 2, plan  # mapped tasks of two partitions: one job each
    return {**cluster_dag_runs, "run_roots": cluster_dag_runs["roots"], "plan": plan}


def _xcom(dag_run, task_id: str, map_index: int = -1, key: str = "return_value"):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(XComModel).filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id=task_id,
                                                 map_index=map_index, key=key).one_or_none()
        return None if row is None else XComModel.deserialize_value(row)


def test_job_mode_run_gives_the_same_output_and_counts_as_driver_mode(runs):
    assert runs["job"].state == "success" and runs["driver"].state == "success"
    job, driver = output(runs["run_roots"]["job"]), output(runs["run_roots"]["driver"])
    assert job["keys"] and job["keys"] == driver["keys"]
    assert job["tars"] == driver["tars"]
    assert job["counts"] == driver["counts"]
    assert job["counts"]["records"] == runs["manifest"]["expected"]["records"]
    print(f"\njob mode run {runs['job_s']:.0f} s, driver mode run {runs['driver_s']:.0f} s")


def test_a_small_run_ran_as_one_ray_job_carrying_its_airflow_identity(runs, ray_jobs):
    """19 records (at most the connection's ``one_job_max_records``, 4,000 by default): the index's
    job ran every step; every other task instance completed from what it left (its partition,
    threshold, centroid and bucket summaries), with no job of its own and an empty job link.
    A job per step (``one_job_max_records`` 0) runs in the S3 job-mode and live job-mode modules."""
    from winnow.registry import STAGES
    from winnow_airflow.corpus import CORPUS_STEPS

    jobs = [j for j in runs["jobs"] if j["metadata"].get("airflow_run_id") == runs["job"].run_id]
    assert [(j["metadata"]["airflow_task_id"], j["metadata"]["airflow_map_index"]) for j in jobs] == [("index", "-1")]
    (job,) = jobs
    assert job["status"] == "SUCCEEDED" and job["metadata"]["airflow_dag_id"] == "image_curation"
    assert job["submission_id"].endswith("-g0") and "--one-job-max-records 4000" in job["entrypoint"]
    assert _xcom(runs["job"], "index", key="_link_RayJobLink") == f"{ray_jobs['url']}/#/jobs/{job['submission_id']}"
    stage_of = {spec.task_id: spec.name for spec in STAGES}
    tis = [ti for ti in runs["job"].get_task_instances()
           if ti.task_id not in {"report", "index"} and ti.task_id not in {t for t, _ in CORPUS_STEPS}]
    assert {stage_of[ti.task_id] for ti in tis} == {s.name for s in STAGES} - {"index"}
    for ti in tis:
        assert _xcom(runs["job"], ti.task_id, ti.map_index, key="_link_RayJobLink") == "", ti.task_id
        if stage_of[ti.task_id] in {s.name for s in STAGES if s.scope == "partition"}:
            summary = _xcom(runs["job"], ti.task_id, ti.map_index)
            expected = len(runs["plan"].partition_row_groups(ti.map_index))
            assert summary["computed"] == summary["row_groups"] == expected and summary["failed"] == [], ti.task_id
    # the global steps' results, as driver mode returns them
    for task_id in ("index", "centroids", "thresholds"):
        assert _xcom(runs["job"], task_id) == _xcom(runs["driver"], task_id), task_id
    assert _xcom(runs["job"], "index") == list(range(runs["plan"].num_partitions))


def test_a_failure_inside_the_runs_one_job_leaves_that_step_and_the_later_ones_to_their_own_jobs(
        runs, ray_jobs, curation_dag, tmp_path):
    """nsfw row group 1 (partition 0) fails once inside the index's job: the job stops after the
    score phase (partition 1 done whole, partition 0 up to nsfw), the nsfw task of partition 0
    submits its own job for that row group (chaining clip_score), and every later step runs as its
    own job; the output equals driver mode's. The fault reaches the jobs through the connection's
    runtime env (test-only, ``WINNOW_TEST_FAULTS``)."""
    import json

    from benchmarks._common import jobs_of
    from tests.airflow.conftest import retries_set
    from winnow.job import chained_summary_uri
    from winnow.rowgroups import CommitStore

    fault = json.dumps({"stage": "nsfw", "row_groups": [1], "once_dir": str(tmp_path / "once")})
    conn = job_conn(ray_jobs["url"], ray_jobs["token"], poll_interval=1,
                    runtime_env={"env_vars": {"WINNOW_TEST_FAULTS": fault}})
    conf = {**runs["conf"], "output_root": str(tmp_path / "out")}
    with mock.patch.dict(os.environ, {"AIRFLOW_CONN_RAY_FALLBACK": conn}), retries_set(curation_dag, 0):
        dr = curation_dag.test(logical_date=datetime(2025, 8, 13, tzinfo=UTC),
                               run_conf={**conf, "run_key": "fallback", "ray_conn_id": "ray_fallback"})
    assert dr.state == "success"
    root = str(tmp_path / "out" / "fallback")
    got, driver = output(root), output(runs["run_roots"]["driver"])
    assert got["keys"] == driver["keys"] and got["tars"] == driver["tars"] and got["counts"] == driver["counts"]
    jobs = [j for j in jobs_of(ray_jobs["url"], ray_jobs["token"]) if j["metadata"].get("airflow_run_id") == dr.run_id]
    by_task = {(j["metadata"]["airflow_task_id"], int(j["metadata"]["airflow_map_index"])) for j in jobs}
    assert ("index", -1) in by_task and ("partition.nsfw", 0) in by_task and ("thresholds", -1) in by_task
    assert not by_task & {("partition.embed", 0), ("partition.embed", 1), ("partition.aesthetic", 0),
                          ("partition.nsfw", 1), ("partition.clip_score", 0), ("partition.clip_score", 1)}
    store = CommitStore(root)
    left = {(stage, p) for stage in ("embed", "aesthetic", "nsfw", "clip_score") for p in (0, 1)
            if os.path.exists(chained_summary_uri(root, stage, p, store.fingerprint_digest(stage)))}
    # the index's job left partition 0's embed and aesthetic (nsfw failed there) and all of partition 1
    assert {("embed", 0), ("aesthetic", 0), ("nsfw", 0), ("embed", 1), ("aesthetic", 1), ("nsfw", 1),
            ("clip_score", 1)} <= left
    assert not os.path.exists(chained_summary_uri(root, "thresholds", None, store.fingerprint_digest("thresholds")))
    nsfw0 = _xcom(dr, "partition.nsfw", 0)
    assert nsfw0["computed"] == 1 and nsfw0["failed"] == [], nsfw0


def test_an_emptied_state_store_still_finds_the_newest_job_by_probing(ray_jobs):
    """Two generations submitted for one (dag, run, task, map index, fingerprint); a try with no
    state store record (a plain dict stands in for the emptied store) finds generation 1."""
    from types import SimpleNamespace

    from winnow_airflow.hooks import RayHook
    from winnow_airflow.jobs import RayJobRunner

    with mock.patch.dict(os.environ, {"AIRFLOW_CONN_RAY_PROBE": job_conn(ray_jobs["url"], ray_jobs["token"])}):
        hook = RayHook("ray_probe")
        op = SimpleNamespace(stage="embed", log=hook.log)
        runner = RayJobRunner(op, hook)
        ctx = {"dag": SimpleNamespace(dag_id="probe_dag"), "run_id": f"r{time.time_ns()}",
               "ti": SimpleNamespace(task_id="partition.embed", map_index=3), "task_state_store": None}
        run = SimpleNamespace(fingerprint="f" * 16, stage="embed")
        base = runner.base_id(ctx, run)
        assert base == runner.base_id(dict(ctx), run)  # deterministic
        assert runner.current(ctx, run, base) == (0, None)
        for g in (0, 1):
            hook.submit_job(runner.submission_id(base, g), "python -c 'print(1)'", metadata={"probe": "1"})
        hook.submit_job(runner.submission_id(base, 1), "python -c 'print(2)'", metadata={})  # same id: no second job
        generation, job = runner.current(ctx, run, base)
        assert generation == 1 and job["submission_id"] == f"{base}-g1"
        assert job["entrypoint"] == "python -c 'print(1)'"
        other = runner.base_id({**ctx, "ti": SimpleNamespace(task_id="partition.embed", map_index=4)}, run)
        assert other != base


def test_a_wrong_token_fails_fast_naming_the_connection_and_never_shows_the_token(ray_jobs, curation_dag, tmp_path, capfd):
    from winnow_airflow.exceptions import RayAuthError
    from winnow_airflow.hooks import RayHook

    bad = "not-the-token-" + "7" * 20
    with mock.patch.dict(os.environ, {"AIRFLOW_CONN_RAY_BADTOK": job_conn(ray_jobs["url"], bad)}):
        with pytest.raises(RayAuthError, match="connection 'ray_badtok'.*HTTP 403.*wrong token") as err:
            RayHook("ray_badtok").get_job("winnow-anything-g0")
        assert bad not in str(err.value)
        conf = {"input_uri": str(ray_jobs["root"] / "shards"), "output_root": str(tmp_path), "run_key": "bad",
                "buffer_size": 10, "max_partitions": 1, "model": "winnow-tiny-vit", "pretrained": "random",
                "allow_random_weights": True, "ray_conn_id": "ray_badtok"}
        t0 = time.perf_counter()
        dr = curation_dag.test(logical_date=BAD_TOKEN_DATE, run_conf=conf)
        seconds = time.perf_counter() - t0
    states = {ti.task_id: (str(getattr(ti.state, "value", ti.state)), ti.try_number)
              for ti in dr.get_task_instances() if ti.map_index in (-1, 0)}
    assert dr.state == "failed" and states["index"] == ("failed", 1)  # no retry for a bad token
    captured = capfd.readouterr()
    text = captured.out + captured.err
    assert "ray_badtok" in text and "wrong token" in text
    assert bad not in text
    # Driver mode: one GCS call instead of Ray's ~20 s of retries and a bare "Failed to connect".
    probe = ("import sys, time\nimport ray\nfrom winnow.ray.cluster import connect\nt0 = time.perf_counter()\n"
             f"try:\n    connect({ray_jobs['address']!r}, token={bad!r})\n"
             "finally:\n    print(f'connect took {time.perf_counter() - t0:.1f} s', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert proc.returncode != 0 and "RayAuthError" in proc.stderr and "wrong token" in proc.stderr
    assert bad not in proc.stdout + proc.stderr
    driver_seconds = float(proc.stderr.rsplit("connect took ", 1)[1].split()[0])
    assert driver_seconds < 10, driver_seconds  # Ray alone retries ~20 s, then says only "Failed to connect"
    print(f"\nbad token: DAG run failed in {seconds:.0f} s, driver connect refused in {driver_seconds:.1f} s")
