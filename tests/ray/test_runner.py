"""The runner over a real local Ray: skips committed row groups, isolates failures, one block each."""

from __future__ import annotations

import json
import os
import sys

import pyarrow as pa
import pytest
import ray.cloudpickle

from winnow.execution import LOCAL, Execution
from winnow.faults import ENV_VAR
from winnow.ray.runner import run_stage_partition
from winnow.rowgroups import CommitStore, RowGroupPlan
from winnow.rowgroups.task import RowGroupTask


class RecordRangeStage:
    """A light stage whose output is its row group's record ids and the worker's pid."""

    name = "ranges"

    def fingerprint_config(self):
        return {}

    def setup(self):
        pass

    def process(self, task: RowGroupTask) -> pa.Table:
        start, stop = task.record_range
        return pa.table({"record_id": pa.array(range(start, stop), pa.int64()), "pid": [os.getpid()] * (stop - start)})


class ModelRangeStage(RecordRangeStage):
    name = "model_ranges"

    def setup(self):
        self.loaded = True  # stands for a model load; must happen before process

    def process(self, task):
        assert self.loaded
        return super().process(task)


# Ray workers cannot import this test module: ship its stage classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def ray_local():
    from winnow.ray.cluster import connect

    connect(None)
    yield
    import ray

    ray.shutdown()


@pytest.mark.parametrize(
    "stage_cls, uses_model", [(RecordRangeStage, False), (ModelRangeStage, True)]
)
def test_runner_computes_only_uncommitted_row_groups_on_ray(tmp_path, ray_local, stage_cls, uses_model):
    plan = RowGroupPlan(100, 10, max_partitions=2)  # partition 1 = row groups 5..9
    store = CommitStore(str(tmp_path))
    stage = stage_cls()
    store.commit_table(stage.name, 1, 6, pa.table({"record_id": [-1]}))  # pre-committed: must be skipped
    summary = run_stage_partition(stage, run_root=str(tmp_path), plan=plan, partition=1, uses_model=uses_model,
                                  execution=Execution())
    assert summary.ok, summary.failed
    assert (summary.row_groups, summary.computed, summary.skipped) == (5, 4, 1)
    assert store.completed(stage.name, 1) == {5, 6, 7, 8, 9}
    assert store.read_table(stage.name, 1, 6).column("record_id").to_pylist() == [-1]  # untouched
    assert store.read_table(stage.name, 1, 9).column("record_id").to_pylist() == list(range(90, 100))
    assert summary.records_in == 40
    again = run_stage_partition(stage, run_root=str(tmp_path), plan=plan, partition=1, uses_model=uses_model,
                                execution=Execution())
    assert (again.computed, again.skipped) == (0, 5)


def test_runner_isolates_failing_row_groups_with_injected_fault(tmp_path, ray_local, monkeypatch):
    plan = RowGroupPlan(60, 10, max_partitions=1)
    monkeypatch.setenv(ENV_VAR, json.dumps({"stage": "ranges", "row_groups": [2, 4], "once_dir": str(tmp_path / "once")}))
    root = str(tmp_path / "run")
    first = run_stage_partition(RecordRangeStage(), run_root=root, plan=plan, partition=0, execution=Execution())
    assert sorted(first.failed) == [2, 4]
    assert "injected test fault" in first.failed[2]
    assert first.computed == 4
    assert CommitStore(root).completed("ranges", 0) == {0, 1, 3, 5}
    second = run_stage_partition(RecordRangeStage(), run_root=root, plan=plan, partition=0, execution=Execution())
    assert second.ok and second.computed == 2 and second.skipped == 4
    assert second.to_dict()["failed_count"] == 0


def test_local_backend_matches_ray_output(tmp_path, ray_local):
    plan = RowGroupPlan(35, 10, max_partitions=1)
    a = run_stage_partition(RecordRangeStage(), run_root=str(tmp_path / "a"), plan=plan, partition=0, execution=LOCAL)
    b = run_stage_partition(RecordRangeStage(), run_root=str(tmp_path / "b"), plan=plan, partition=0,
                            execution=Execution())
    assert a.computed == b.computed == 4
    for rg in range(4):
        ta = CommitStore(str(tmp_path / "a")).read_table("ranges", 0, rg, columns=["record_id"])
        tb = CommitStore(str(tmp_path / "b")).read_table("ranges", 0, rg, columns=["record_id"])
        assert ta.equals(tb)


class CountingSetupStage(ModelRangeStage):
    """Writes the pid of each setup() call, to see how often a model would be loaded."""

    name = "counting"

    def __init__(self, log_path):
        self.log_path = log_path

    def setup(self):
        with open(self.log_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        super().setup()


def test_task_pool_sets_a_model_stage_up_once_per_worker_across_partitions(tmp_path, ray_local):
    plan = RowGroupPlan(80, 10, max_partitions=4)
    log_path = tmp_path / "setups.log"
    for p in range(plan.num_partitions):
        s = run_stage_partition(
            CountingSetupStage(str(log_path)), run_root=str(tmp_path / "run"), plan=plan, partition=p, uses_model=True,
            execution=Execution(),
        )
        assert s.ok and s.computed == 2
    pids = log_path.read_text().split()
    assert len(pids) == len(set(pids)) <= 2  # once per worker process, not once per partition


def test_on_a_shared_ray_a_model_stage_is_set_up_once_per_partition_in_an_actor(tmp_path, ray_local, monkeypatch):
    """WINNOW_RAY_EMBEDDED=shared (what an Airflow task on the shared local head, or on a
    cluster, sees): other drivers compete for the workers, so each partition's model worker is a
    Ray Data actor that keeps its set-up stage for all of the partition's row groups."""
    from winnow.execution import EMBEDDED_ENV

    monkeypatch.setenv(EMBEDDED_ENV, "shared")  # this process stays attached to the module's Ray
    shared = Execution()
    assert shared.compute == Execution(ray_address="127.0.0.1:6379").compute == "actors"
    plan = RowGroupPlan(60, 10, max_partitions=2)  # 3 row groups per partition
    log_path = tmp_path / "setups.log"
    root = str(tmp_path / "run")
    CommitStore(root).commit_table("counting", 1, 4, pa.table({"record_id": [-1]}))  # committed: skipped
    for p in range(plan.num_partitions):
        s = run_stage_partition(CountingSetupStage(str(log_path)), run_root=root, plan=plan, partition=p,
                                uses_model=True, execution=shared)
        assert s.ok and (s.computed, s.skipped) == ((3, 0) if p == 0 else (2, 1))
    pids = log_path.read_text().split()
    assert len(pids) == 2 and len(set(pids)) == 2  # one actor per partition, set up once each
    store = CommitStore(root)
    assert store.read_table("counting", 0, 2).column("record_id").to_pylist() == list(range(20, 30))
    assert store.read_table("counting", 1, 4).column("record_id").to_pylist() == [-1]


KILL_CHILD = """
import json, os, sys
from winnow.execution import LOCAL
from winnow.ray.runner import run_stage_partition
from winnow.rowgroups import RowGroupPlan
sys.path.insert(0, sys.argv[2])
from test_runner import RecordRangeStage
run_stage_partition(RecordRangeStage(), run_root=sys.argv[1], plan=RowGroupPlan(50, 10, max_partitions=1), partition=0,
                    execution=LOCAL)
"""


def test_task_process_killed_mid_partition_resumes_with_only_the_rest(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "run"
    spec = {"stage": "ranges", "row_groups": [1], "mode": "kill_task", "once_dir": str(tmp_path / "once")}
    env = dict(os.environ, **{ENV_VAR: json.dumps(spec)})
    child = subprocess.run([sys.executable, "-c", KILL_CHILD, str(root), os.path.dirname(__file__)], env=env)
    assert child.returncode == -9
    assert CommitStore(str(root)).completed("ranges", 0) == {0, 1}
    plan = RowGroupPlan(50, 10, max_partitions=1)
    again = run_stage_partition(RecordRangeStage(), run_root=str(root), plan=plan, partition=0, execution=LOCAL)
    assert (again.computed, again.skipped) == (3, 2)


class CpuModelStage(ModelRangeStage):
    """A light model stage: ``on_cpu`` gives the copy the driver runs (its pid column says where)."""

    name = "cpu_ranges"
    device = "auto"

    def on_cpu(self):
        copy = CpuModelStage()
        copy.device = "cpu"
        return copy

    def process(self, task):
        table = super().process(task)
        return table.append_column("device", pa.array([self.device] * table.num_rows))


@pytest.mark.parametrize("stage_cls, uses_model", [(RecordRangeStage, False), (CpuModelStage, True)])
def test_a_light_stages_small_partition_runs_in_this_process_and_a_large_one_on_ray(
        tmp_path, ray_local, monkeypatch, stage_cls, uses_model):
    """Within the bound (WINNOW_IN_DRIVER_MAX_RECORDS) every row group is computed by this
    process, a model stage on the CPU; past it, by Ray workers; a stage not marked light never
    runs here."""
    from winnow.ray.runner import IN_DRIVER_ENV, in_driver

    plan = RowGroupPlan(100, 10, max_partitions=2)  # 50 records a partition

    def where(root, partition: int, *, light: bool) -> tuple[set[int], set[str]]:
        stage = stage_cls()
        summary = run_stage_partition(stage, run_root=str(root), plan=plan, partition=partition,
                                      uses_model=uses_model, light=light, execution=Execution())
        assert summary.ok and summary.computed == 5, summary
        store = CommitStore(str(root))
        tables = [store.read_table(stage.name, partition, rg) for rg in plan.partition_row_groups(partition)]
        devices = {d for t in tables for d in t.column("device").to_pylist()} if uses_model else set()
        return {p for t in tables for p in t.column("pid").to_pylist()}, devices

    monkeypatch.setenv(IN_DRIVER_ENV, "50")
    pids, devices = where(tmp_path / "a", 0, light=True)
    assert pids == {os.getpid()} and devices <= {"cpu"}
    pids, devices = where(tmp_path / "a", 1, light=False)  # within the bound, but not light
    assert os.getpid() not in pids and devices <= {"auto"}
    monkeypatch.setenv(IN_DRIVER_ENV, "49")
    pids, devices = where(tmp_path / "b", 0, light=True)
    assert os.getpid() not in pids and devices <= {"auto"}
    assert in_driver(Execution(), 49, light=True) and not in_driver(LOCAL, 10, light=True)
    monkeypatch.setenv(IN_DRIVER_ENV, "0")
    assert not in_driver(Execution(), 1, light=True)


def test_on_a_ray_of_two_cpus_a_light_stage_runs_in_this_process_at_any_size(ray_local, monkeypatch):
    """Past the records bound, the Ray's CPUs decide: on two or fewer its workers only share this
    process's CPUs; the bound set in the environment decides alone."""
    import ray

    from winnow.exceptions import ConfigError
    from winnow.ray.runner import IN_DRIVER_ENV, IN_DRIVER_MAX_RECORDS, _ray_cpus, in_driver

    monkeypatch.delenv(IN_DRIVER_ENV, raising=False)
    assert in_driver(Execution(), IN_DRIVER_MAX_RECORDS, light=True, cluster_cpus=64)
    assert not in_driver(Execution(), IN_DRIVER_MAX_RECORDS + 1, light=True, cluster_cpus=3)
    assert in_driver(Execution(), 10**7, light=True, cluster_cpus=2)
    assert not in_driver(Execution(), 10**7, light=False, cluster_cpus=1)
    assert not in_driver(LOCAL, 10, light=True, cluster_cpus=1)
    # The attached Ray's CPUs, every node's.
    assert _ray_cpus(Execution(ray_address="auto")) == ray.cluster_resources()["CPU"]
    monkeypatch.setenv(IN_DRIVER_ENV, "100")
    assert in_driver(Execution(), 100, light=True, cluster_cpus=64)
    assert not in_driver(Execution(), 101, light=True, cluster_cpus=1)
    monkeypatch.setenv(IN_DRIVER_ENV, "4k")
    with pytest.raises(ConfigError, match="WINNOW_IN_DRIVER_MAX_RECORDS='4k' is not a whole number"):
        in_driver(Execution(), 1, light=True)
