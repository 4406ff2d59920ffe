"""The ``image_curation`` DAG on a multi-node Ray on loopback (a head with 0 CPUs, the common
production shape, and two worker nodes of 1 CPU each, each its own raylet), in driver mode and in
job mode, under ``dag.test()``: the output equals a single-node reference run's (kept keys, tar
bytes of every row group, counts).

No model worker may ask for more than one node has: the cluster's 2 CPUs are on two nodes, so a
request sized by the cluster total (the old policy) would never be placed and the run would hang.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from unittest import mock

import pytest

from tests._multinode import multinode_fixture
from tests.airflow._ray_jobs import driver_conn, job_conn, jobs_of, output, timed_run
from tests.airflow.conftest import retries_set

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

DRIVER_DATE = datetime(2025, 8, 11, tzinfo=UTC)
JOB_DATE = datetime(2025, 8, 12, tzinfo=UTC)

cluster = multinode_fixture(workers=(1, 1), dashboard=True)


@pytest.fixture(scope="module")
def runs(cluster, curation_dag, tmp_path_factory):
    import ray

    from winnow.data.sample import generate_sample
    from winnow.pipeline import CurationConfig, run_all

    root = tmp_path_factory.mktemp("multinode_dag")
    manifest = generate_sample(str(root / "shards"), shards=1, per_shard=12, seed=3, corrupt=True)
    conf = {"input_uri": str(root / "shards"), "output_root": str(root / "out"), "buffer_size": 5,
            "max_partitions": 2, "model": "winnow-tiny-vit", "pretrained": "random",
            "allow_random_weights": True, "aesthetic_threshold": 0.0}
    # The single-node reference: the same config in this process, without Ray.
    run_all(CurationConfig(**{**conf, "run_key": "reference"}), backend="local")
    ray.shutdown()  # the DAG's tasks attach to the cluster, not to a Ray of an earlier test
    env = {"AIRFLOW_CONN_RAY_MN_DRIVER": driver_conn(cluster.address, cluster.token),
           "AIRFLOW_CONN_RAY_MN_JOB": job_conn(cluster.dashboard_url, cluster.token, poll_interval=1)}
    out: dict = {"manifest": manifest}
    with mock.patch.dict(os.environ, env), retries_set(curation_dag, 0):
        try:
            out["driver"], out["driver_s"] = timed_run(curation_dag, DRIVER_DATE, conf, "driver", "ray_mn_driver")
        finally:
            ray.shutdown()
        out["job"], out["job_s"] = timed_run(curation_dag, JOB_DATE, conf, "job", "ray_mn_job")
    out["jobs"] = jobs_of(cluster.dashboard_url, cluster.token)
    out["roots"] = {k: str(root / "out" / k) for k in ("reference", "driver", "job")}
    return out


def test_multinode_cluster_has_no_node_with_the_clusters_cpu_total(cluster):
    import ray

    cluster.connect()
    try:
        cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
    finally:
        ray.shutdown()
    assert sorted(cpus) == [0, 1, 1], cpus


def _same_as_reference(runs, mode: str) -> dict:
    assert runs[mode].state == "success"
    reference, got = output(runs["roots"]["reference"]), output(runs["roots"][mode])
    assert got["keys"] and got["keys"] == reference["keys"]
    assert got["tars"] == reference["tars"]
    assert got["counts"] == reference["counts"]
    assert got["counts"]["records"] == runs["manifest"]["expected"]["records"]
    return got


def test_multinode_driver_mode_dag_output_equals_the_single_node_run(runs):
    _same_as_reference(runs, "driver")
    print(f"\nmulti-node driver mode DAG run: {runs['driver_s']:.0f} s")


def test_multinode_job_mode_dag_output_equals_the_single_node_run(runs):
    _same_as_reference(runs, "job")
    jobs = [j for j in runs["jobs"] if j["metadata"].get("airflow_run_id") == runs["job"].run_id]
    assert jobs and all(j["status"] == "SUCCEEDED" for j in jobs)
    assert {"index", "centroids", "pairwise", "embed"} <= {j["metadata"]["winnow_stage"] for j in jobs}
    print(f"\nmulti-node job mode DAG run: {runs['job_s']:.0f} s ({len(jobs)} Ray jobs)")
