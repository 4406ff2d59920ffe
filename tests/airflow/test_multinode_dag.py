"""The ``image_curation`` DAG on a multi-node Ray on loopback (a head with 0 CPUs, the common
production shape, and two worker nodes of 2 CPUs each, each its own raylet: the session's shared
cluster, which ``tests/ray/test_multinode.py`` uses too), in driver mode and in job mode, under
``dag.test()``: the output equals a single-node reference run's (kept keys, tar bytes of every row
group, counts).

No model worker may ask for more than one node has: the cluster's 4 CPUs are on two nodes, so a
request sized by the cluster total (the old policy) would never be placed and the run would hang.
"""

from __future__ import annotations

import pytest

from tests._multinode import SHARED_WORKERS, shared_multinode_fixture
from tests.airflow._ray_jobs import output

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

cluster = shared_multinode_fixture()


@pytest.fixture(scope="module")
def runs(cluster, cluster_dag_runs):
    """The shared cluster's driver- and job-mode DAG runs and their reference
    (``cluster_dag_runs`` in ``tests/airflow/conftest.py``; ``test_job_mode.py`` checks them too)."""
    return cluster_dag_runs


def test_multinode_cluster_has_no_node_with_the_clusters_cpu_total(cluster):
    import ray

    cluster.connect()
    try:
        cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
    finally:
        cluster.detach()
    assert sorted(cpus) == [0, *sorted(SHARED_WORKERS)], cpus
    assert len(cpus) >= 3 and max(cpus) < sum(cpus), cpus  # no node holds the cluster's total


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
    # 19 records: the run is one Ray Job, the index's (a job per step on this cluster:
    # test_job_mode.py's failure fallback)
    assert [j["metadata"]["winnow_stage"] for j in jobs] == ["index"]
    print(f"\nmulti-node job mode DAG run: {runs['job_s']:.0f} s ({len(jobs)} Ray jobs)")
