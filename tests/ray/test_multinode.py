"""The Ray resource policy on a real multi-node cluster (loopback): a head of 0 CPUs plus two
worker nodes of 2 CPUs each, so the cluster's sum (4 CPUs) is more than any node holds. It is the
session's shared cluster (``tests/conftest.py``; ``tests/airflow/test_multinode_dag.py`` runs the
DAG on it too): one cluster start for the suite.

- the policy's rules on given node shapes (no cluster needed);
- on the cluster: every model-worker request fits one node (the old sizing, by
  ``ray.cluster_resources()``, asked for 4 CPUs and waited forever), torch threads match the
  CPUs a worker got, ``compute`` picks tasks or actors;
- ``run_all`` over the cluster gives the local reference's output, each row group committed once;
- a worker node lost mid-partition (its raylet and workers SIGKILLed while the partition's model
  worker is held on a barrier the test releases): the run ends with the reference's output and
  no committed row group is written again.

Every commit (the rename of a row group's ``.parquet`` into place) in the cluster's worker
processes is logged by an audit hook installed through ``worker_process_setup_hook``; the same
hook holds the chosen row group's commit until the test releases it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import ray.cloudpickle

from tests._multinode import SHARED_WORKERS, shared_multinode_fixture
from tests._procs import Background, wait_gone
from tests._tiny import tiny_config
from tests.faults._faultkit import RunOutput, assert_untouched, committed_files, read_commit_log
from winnow.data.sample import generate_sample
from winnow.exceptions import ConfigError, ResourceRequestError
from winnow.execution import Execution, default_compute
from winnow.pipeline import CurationConfig, run_all
from winnow.ray.resources import Node, alive_nodes, largest_node, model_worker_request, unit_request
from winnow.ray.runner import run_stage_partition
from winnow.rowgroups import CommitStore, RowGroupPlan
from winnow.rowgroups.task import RowGroupTask

pytestmark = pytest.mark.timeout(1200)

WORKER_CPUS = SHARED_WORKERS
assert WORKER_CPUS == (2, 2), "the CPU figures asserted below are for two 2-CPU worker nodes"
cluster = shared_multinode_fixture()

# ---- the policy on given node shapes -------------------------------------------------------

HEAD1_WORKER2 = [Node("head", 1, 0), Node("w", 2, 0)]  # the cluster: sum 3, largest 2


def test_cpu_model_worker_never_asks_for_the_clusters_sum():
    tasks = model_worker_request(compute="tasks", nodes=HEAD1_WORKER2)
    assert (tasks.num_cpus, tasks.num_gpus, tasks.width) == (2, 0, 1)  # the largest node, not 3
    actors = model_worker_request(compute="actors", nodes=HEAD1_WORKER2)
    assert (actors.num_cpus, actors.num_gpus, actors.width) == (1, 0, 1)  # half of it: partitions share a node
    assert model_worker_request(compute="actors", nodes=[Node("a", 1, 0)]).num_cpus == 1  # at least 1
    assert model_worker_request(compute="tasks", nodes=HEAD1_WORKER2, worker_cpus=2).num_cpus == 2


def test_a_knob_larger_than_every_node_is_an_error_naming_it_and_the_largest_node():
    with pytest.raises(ResourceRequestError, match=r"worker_cpus=3 .*largest alive Ray node has 2 CPUs and 0 GPUs"):
        model_worker_request(compute="actors", nodes=HEAD1_WORKER2, worker_cpus=3)
    with pytest.raises(ResourceRequestError, match=r"worker_gpus=1 .*largest alive Ray node has 2 CPUs"):
        model_worker_request(compute="actors", nodes=HEAD1_WORKER2, worker_gpus=1)
    gpu_box = [Node("g", 4, 2), Node("c", 16, 0)]  # each knob fits some node, never both on one
    with pytest.raises(ResourceRequestError, match=r"no alive Ray node holds a worker of 8 CPU\(s\) and 1 GPU"):
        model_worker_request(compute="actors", nodes=gpu_box, worker_cpus=8)
    with pytest.raises(ConfigError, match="worker_cpus must be a number > 0"):
        model_worker_request(compute="actors", nodes=HEAD1_WORKER2, worker_cpus=0)
    with pytest.raises(ResourceRequestError, match="1 CPU.*the default worker size.*0 CPUs"):
        model_worker_request(compute="actors", nodes=[Node("head", 0, 0)])  # only a 0-CPU head is up


def test_gpu_workers_default_to_one_gpu_and_one_cpu_as_many_as_the_nodes_hold():
    nodes = [Node("head", 2, 0), Node("g4", 16, 4), Node("g2", 8, 2)]
    r = model_worker_request(compute="actors", nodes=nodes)
    assert (r.num_cpus, r.num_gpus, r.width) == (1, 1, 6)
    assert model_worker_request(compute="actors", nodes=nodes, max_width=3).width == 3  # its row groups
    two = model_worker_request(compute="actors", nodes=nodes, worker_gpus=2, worker_cpus=4)
    assert (two.num_cpus, two.num_gpus, two.width) == (4, 2, 3)  # 2 on g4 + 1 on g2
    assert model_worker_request(compute="actors", nodes=nodes, worker_gpus=0).num_gpus == 0  # CPU forced
    with pytest.raises(ResourceRequestError, match=r"worker_gpus=8 .*4 GPUs"):
        model_worker_request(compute="actors", nodes=nodes, worker_gpus=8)
    assert largest_node(nodes).node_id == "g4"
    units = unit_request(use_gpu=False, nodes=HEAD1_WORKER2)
    assert (units.num_cpus, units.num_gpus, units.width) == (1, 0, 3)  # each node counted alone


def test_compute_is_the_callers_choice_with_one_documented_default(monkeypatch):
    monkeypatch.delenv("WINNOW_RAY_EMBEDDED", raising=False)
    assert default_compute(None) == "tasks"  # an embedded Ray this process owns
    assert default_compute("127.0.0.1:6379") == default_compute("auto") == "actors"
    monkeypatch.setenv("WINNOW_RAY_EMBEDDED", "shared")
    assert default_compute(None) == "actors"
    assert Execution(ray_address="auto", compute="tasks").compute == "tasks"  # the caller's choice wins
    assert Execution(compute=None).compute == "actors"  # None: the default, fixed when the value is built
    with pytest.raises(ConfigError, match="compute must be one of tasks, actors"):
        Execution(compute="actor")


# ---- on the cluster ------------------------------------------------------------------------

class ProbeModelStage:
    """A model stage whose rows say what its worker got: CPUs, torch threads, node."""

    name = "probe"

    def fingerprint_config(self):
        return {}

    def setup(self):
        import torch  # noqa: F401 - a model stage's worker has torch loaded

    def process(self, task: RowGroupTask) -> pa.Table:
        import ray
        import torch

        ctx = ray.get_runtime_context()
        start, stop = task.record_range
        n = stop - start
        return pa.table({"record_id": pa.array(range(start, stop), pa.int64()),
                         "cpus": [float(ctx.get_assigned_resources().get("CPU", 0))] * n,
                         "threads": [torch.get_num_threads()] * n, "node": [ctx.get_node_id()] * n})


# Ray workers cannot import this test module: ship its classes and hooks by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_multinode_policy_reads_alive_nodes_and_every_request_fits_one_node(cluster):
    cluster.connect()
    nodes = alive_nodes()
    assert sorted(n.cpus for n in nodes) == [0, *WORKER_CPUS]
    assert ray.cluster_resources()["CPU"] == sum(WORKER_CPUS)  # what the old sizing asked for
    for compute in ("tasks", "actors"):
        r = model_worker_request(compute=compute)
        assert r.num_cpus <= largest_node().cpus and r.num_gpus == 0
    with pytest.raises(ResourceRequestError, match=r"worker_cpus=4 .*largest alive Ray node has 2 CPUs"):
        model_worker_request(compute="actors", worker_cpus=sum(WORKER_CPUS))


@pytest.mark.slow
@pytest.mark.parametrize("compute, cpus", [("tasks", 2.0), ("actors", 1.0)])
def test_multinode_model_worker_fits_a_node_and_its_torch_threads_match(cluster, tmp_path, compute, cpus):
    """Before: a CPU model worker asked for the cluster's 4 CPUs and this never finished."""
    cluster.connect()
    plan = RowGroupPlan(40, 10, max_partitions=1)
    root = str(tmp_path / "run")
    s = run_stage_partition(ProbeModelStage(), run_root=root, plan=plan, partition=0, uses_model=True,
                            execution=Execution(ray_address=cluster.address, compute=compute))
    assert s.ok and s.computed == 4, s.failed
    store = CommitStore(root)
    rows = [r for rg in range(4) for r in store.read_table("probe", 0, rg).to_pylist()]
    assert {r["cpus"] for r in rows} == {cpus}
    assert {r["threads"] for r in rows} == {int(cpus)}
    assert {r["node"] for r in rows} <= set(cluster.node_ids())  # worker nodes (the head has no CPU)
    with pytest.raises(ResourceRequestError, match="worker_cpus=3"):
        run_stage_partition(ProbeModelStage(), run_root=str(tmp_path / "again"), plan=plan, partition=0,
                            uses_model=True, execution=Execution(ray_address=cluster.address, compute=compute,
                                                                 worker_cpus=3))


# ---- whole runs ---------------------------------------------------------------------------

LOG_ENV = "WINNOW_TEST_COMMIT_LOG"
HOLD_ENV = "WINNOW_TEST_COMMIT_HOLD"
_COMMIT = re.compile(r"/rg\d{9}\.parquet$")


def _commit_hook() -> None:
    """Runs in every Ray worker process of the test's job: log each row-group commit (pid,
    path); hold the first commit of the chosen path (``HOLD_ENV``: JSON with ``path``, ``held``,
    ``release``) until the ``release`` file exists, after writing the ``held`` file (pid, node)."""
    import json
    import os
    import sys
    import time

    log = os.environ.get(LOG_ENV)
    hold = json.loads(os.environ.get(HOLD_ENV) or "null")

    def audit(event, args):
        if event != "os.rename" or not _COMMIT.search(str(args[1])):
            return
        dst = str(args[1])
        if hold and dst == hold["path"] and not os.path.exists(hold["held"]):
            import ray

            tmp = hold["held"] + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}, f)
            os.rename(tmp, hold["held"])  # (not a row-group path: this hook ignores it)
            while not os.path.exists(hold["release"]):
                time.sleep(0.05)
        if log:
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {dst}\n")

    sys.addaudithook(audit)


def _commits(log: Path, run_root: str) -> Counter:
    """How many times each row-group file under ``run_root`` was committed (relative paths)."""
    return Counter(path for _, path in read_commit_log(log, run_root))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    base = tmp_path_factory.mktemp("multinode-runs")
    generate_sample(str(base / "input"), shards=2, per_shard=12, seed=11)
    return base


def _config(base: Path, run_key: str) -> CurationConfig:
    # 24 records in 6 row groups of 4, 2 partitions; thresholds that keep everything but dedup
    # (the random tiny model's scores carry no meaning).
    return tiny_config(input_uri=str(base / "input"), output_root=str(base / "out"), run_key=run_key, buffer_size=4,
                       max_partitions=2, batch_size=4)


@pytest.fixture(scope="module")
def reference(sample):
    """The single-process run every cluster run must reproduce (local backend, no Ray)."""
    cfg = _config(sample, "reference")
    summary = run_all(cfg, backend="local")
    return summary, RunOutput.of(cfg.run_root)


COUNTS = ("records", "undecodable", "aesthetic_dropped", "nsfw_dropped", "duplicates", "kept", "written",
          "row_groups", "partitions")


def _assert_same_output(cfg: CurationConfig, summary: dict, reference) -> None:
    ref_summary, ref_output = reference
    got = RunOutput.of(cfg.run_root)
    assert got.kept_keys == ref_output.kept_keys
    assert got.tars == ref_output.tars and got.tars  # the same bytes in every output tar
    assert {k: summary[k] for k in COUNTS} == {k: ref_summary[k] for k in COUNTS}


def _attach(cluster, tmp_path: Path, hold: dict | None = None) -> Path:
    log = tmp_path / "commits.log"
    env = {LOG_ENV: str(log), **({HOLD_ENV: json.dumps(hold)} if hold else {})}
    cluster.connect(runtime_env={"worker_process_setup_hook": _commit_hook, "env_vars": env})
    return log


@pytest.mark.slow
def test_multinode_run_all_equals_the_local_reference(cluster, sample, reference, tmp_path):
    log = _attach(cluster, tmp_path)
    cfg = _config(sample, "multinode")
    summary = run_all(cfg, ray_address=cluster.address)
    _assert_same_output(cfg, summary, reference)
    commits = _commits(log, cfg.run_root)
    assert commits and set(commits.values()) == {1}  # every row group committed once
    assert sum(1 for p in commits if p.startswith("embed/")) == summary["row_groups"]


@pytest.mark.slow
def test_multinode_node_lost_mid_partition_ends_with_the_reference_output(cluster, sample, reference, tmp_path):
    """Keep last in this module: it leaves the cluster one worker node short (the shared
    cluster's fixture replaces it before the next module that uses the cluster)."""
    cfg = _config(sample, "multinode-node-lost")
    held_rg = 4  # partition 1 (row groups 3, 4, 5): partition 0 is committed by then
    target = CommitStore(cfg.run_root).row_group_path("embed", 1, held_rg)
    hold = {"path": target, "held": str(tmp_path / "held.json"), "release": str(tmp_path / "release")}
    log = _attach(cluster, tmp_path, hold)
    run = Background(lambda: run_all(cfg, ray_address=cluster.address))
    try:
        # The barrier: the model worker waits before its commit.
        run.wait_for("the barrier", lambda: os.path.exists(hold["held"]))
        held = json.loads(Path(hold["held"]).read_text())
        before = committed_files(cfg.run_root)
        assert any(p.startswith("embed/p00000/") for p in before)  # mid-run: partition 0 committed
        victim = cluster.node_named(cluster.node_ids()[held["node"]])
        survivor = next(n for n in cluster.nodes if n is not victim and not n.killed)
        cluster.kill_node(victim)  # its raylet, object store and workers (the held one too)
        wait_gone(held["pid"])
    finally:
        Path(hold["release"]).touch()
    run.join(timeout=900)
    reruns, summary = 0, run.result
    if run.error is not None:  # allowed: a rerun resumes (committed row groups are skipped)
        reruns = 1
        summary = run_all(cfg, ray_address=cluster.address)
    _assert_same_output(cfg, summary, reference)
    assert_untouched(before, cfg.run_root)  # nothing committed before the loss was written again
    commits = _commits(log, cfg.run_root)
    assert set(commits.values()) == {1}, {p: n for p, n in commits.items() if n != 1}
    assert commits[os.path.relpath(target, cfg.run_root)] == 1  # the held row group: once, elsewhere
    assert cluster.node_ids() == {nid: survivor.name for nid in cluster.node_ids()}
    print(f"node {victim.name} lost mid-partition; reruns: {reruns}; error: {run.error!r}")
