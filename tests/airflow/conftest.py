"""Real Airflow 3.3 for the operator and DAG tests: a temp AIRFLOW_HOME with SQLite, migrated once.

The environment is set here, before anything imports Airflow, because Airflow reads its
configuration at import time.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Airflow's processes import winnow as a user's install does (the installed ``winnow`` and
# ``winnow_airflow``, the DAG and plugin folders): the repo root is not put on their path.
if str(REPO) not in sys.path[:1]:
    sys.path.insert(0, str(REPO))
from benchmarks import _common  # noqa: E402  (the benchmarks set Airflow up the same way)
from tests._tiny import TINY_MODEL  # noqa: E402

# Tests import this module by name too; the env var keeps one AIRFLOW_HOME per session.
AIRFLOW_HOME = os.environ.setdefault("WINNOW_TEST_AIRFLOW_HOME", tempfile.mkdtemp(prefix="winnow-airflow-"))
AIRFLOW_ENV = _common.airflow_env(AIRFLOW_HOME, logging_level="INFO")
os.environ.update(AIRFLOW_ENV)
AIRFLOW_BIN = _common.AIRFLOW_BIN


def airflow_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the ``airflow`` CLI against this test's AIRFLOW_HOME; fail with its output."""
    return _common.airflow_cli(AIRFLOW_ENV, *args, timeout=timeout)


@contextlib.contextmanager
def retries_set(dag, retries: int):
    """Every task of ``dag`` retries ``retries`` times meanwhile; then as declared again, params
    included (the DAG object is shared by the session: a module must leave it as it found it, and
    a run's conf is merged into the params of the tasks it ran, so one run's conf would become the
    next run's defaults)."""
    import copy

    declared = {task.task_id: (task.retries, copy.deepcopy(task.params)) for task in dag.tasks}
    dag_params = copy.deepcopy(dag.params)
    for task in dag.tasks:
        task.retries = retries
    try:
        yield dag
    finally:
        for task in dag.tasks:
            task.retries, task.params = declared[task.task_id]
        dag.params = dag_params


@pytest.fixture(scope="session")
def airflow_db() -> str:
    """A migrated metadata DB (SQLite) in the temp AIRFLOW_HOME; about 6 s, once per session."""
    airflow_cli("db", "migrate", timeout=300)
    return AIRFLOW_HOME


@pytest.fixture(scope="session")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


@pytest.fixture(scope="session")
def curation_dag(dagbag):
    assert not dagbag.import_errors, dagbag.import_errors
    return dagbag.dags["image_curation"]


#: The shared cluster's DAG runs (``cluster_dag_runs``): 19 records in 4 row groups, 2 partitions.
CLUSTER_RUNS_CONF = {"buffer_size": 5, "max_partitions": 2, **TINY_MODEL, "aesthetic_threshold": 0.0}


@pytest.fixture(scope="session")
def cluster_dag_runs(shared_multinode, curation_dag, tmp_path_factory):
    """The image_curation DAG run twice under ``dag.test()`` on the session's shared multi-node Ray
    (``tests/conftest.py``: a 0-CPU head with the dashboard's Jobs API and token auth, two worker
    nodes): in driver mode (attached by GCS address + token) and in job mode (every step a Ray
    Job), on one generated input, plus the single-node reference of the same config (local
    backend, no Ray). Shared by ``test_multinode_dag.py`` (both equal the reference) and
    ``test_job_mode.py`` (job mode's jobs, links and partition summaries; it equals driver mode):
    the suite pays for one driver-mode and one job-mode run, not two of each."""
    import time
    from datetime import UTC, datetime
    from unittest import mock

    import ray

    from benchmarks._common import driver_conn, job_conn, jobs_of
    from tests._multinode import SHARED_WORKERS
    from tests.airflow._ray_jobs import timed_run
    from winnow.data.sample import generate_sample
    from winnow.pipeline import CurationConfig, run_all

    cluster = shared_multinode
    cluster.restore(SHARED_WORKERS)  # a node-loss test may have run before
    root = tmp_path_factory.mktemp("cluster_dag_runs")
    manifest = generate_sample(str(root / "shards"), shards=1, per_shard=12, seed=3, corrupt=True)
    conf = {"input_uri": str(root / "shards"), "output_root": str(root / "out"), **CLUSTER_RUNS_CONF}
    # The single-node reference: the same config in this process, without Ray.
    run_all(CurationConfig(**{**conf, "run_key": "reference"}), backend="local")
    cluster.detach()  # the DAG's tasks attach to the cluster, not to a Ray of an earlier test
    env = {"AIRFLOW_CONN_RAY_MN_DRIVER": driver_conn(cluster.address, cluster.token),
           "AIRFLOW_CONN_RAY_MN_JOB": job_conn(cluster.dashboard_url, cluster.token, poll_interval=1)}
    out: dict = {"manifest": manifest, "conf": conf, "root": root, "t0": time.perf_counter()}
    try:
        with mock.patch.dict(os.environ, env), retries_set(curation_dag, 0):
            try:
                out["driver"], out["driver_s"] = timed_run(curation_dag, datetime(2025, 8, 11, tzinfo=UTC), conf,
                                                           "driver", "ray_mn_driver")
            finally:
                ray.shutdown()
            out["job"], out["job_s"] = timed_run(curation_dag, datetime(2025, 8, 12, tzinfo=UTC), conf, "job",
                                                 "ray_mn_job")
    finally:
        ray.shutdown()  # later tests of this session start their own Ray
    out["jobs"] = jobs_of(cluster.dashboard_url, cluster.token)
    out["roots"] = {k: str(root / "out" / k) for k in ("reference", "driver", "job")}
    return out
