"""image_curation end to end under ``dag.test()`` with a local Ray, the tiny model and generated
shards: a sparse failure, ``airflow tasks clear --only-failed`` and a resume that computes only
the failed row groups, counts that add up, and config changes refused or overwritten.

One run root is carried through the tests of this module in order (they are slow: each DAG
run costs a minute or two on two cores, mostly Ray actor start-up per mapped task).
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
import time
from datetime import UTC, datetime
from unittest import mock

import pyarrow.parquet as pq
import pytest

from tests.airflow.conftest import airflow_cli, retries_set

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FAULT_RUN_DATE = datetime(2025, 3, 1, tzinfo=UTC)
CHANGE_RUN_DATE = datetime(2025, 3, 2, tzinfo=UTC)
FAULTY_ROW_GROUPS = [1, 6]  # row group 1 is in partition 0, row group 6 in partition 2
PARTITION_TASKS = ("partition.embed", "partition.aesthetic", "partition.nsfw", "write")


def _states(dag_run) -> dict[tuple[str, int], tuple[str, int]]:
    return {(ti.task_id, ti.map_index): (str(getattr(ti.state, "value", ti.state)), ti.try_number)
            for ti in dag_run.get_task_instances()}


def _xcom(dag_run, task_id: str, map_index: int = -1, key: str = "return_value"):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(XComModel).filter_by(
            dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id=task_id, map_index=map_index, key=key
        ).one_or_none()
        return None if row is None else XComModel.deserialize_value(row)


def _resume(dag, logical_date):
    """Let ``dag.test`` drive an existing run instead of replacing it (it would otherwise
    clear every task instance and recreate the run): the state after ``airflow tasks clear``
    is kept, as a scheduler would keep it."""
    from airflow.models.dagrun import DagRun
    from airflow.sdk import DagRunState
    from airflow.utils.session import create_session

    def existing_run(*, dag, logical_date, session, **_):
        dr = session.query(DagRun).filter_by(dag_id=dag.dag_id, logical_date=logical_date).one()
        dr.state = DagRunState.RUNNING
        session.commit()
        dr.dag = dag
        return dr

    with mock.patch("airflow.models.dagrun.get_or_create_dagrun", existing_run), mock.patch(
        "airflow.serialization.definitions.dag.SerializedDAG.clear_dags"
    ):
        dag.test(logical_date=logical_date)
    with create_session() as session:
        dr = session.query(DagRun).filter_by(dag_id=dag.dag_id, logical_date=logical_date).one()
        session.expunge(dr)
        return dr


@pytest.fixture(scope="module")
def run_env(tmp_path_factory, curation_dag):
    from winnow.data.sample import generate_sample

    root = tmp_path_factory.mktemp("curation")
    shards = root / "shards"
    manifest = generate_sample(str(shards), shards=2, per_shard=12, seed=0, corrupt=True)
    conf = {
        "input_uri": str(shards), "output_root": str(root / "out"), "run_key": "e2e",
        "buffer_size": 4, "max_partitions": 3, "model": "winnow-tiny-vit", "pretrained": "random",
        "allow_random_weights": True, "aesthetic_threshold": 0.0,
    }
    with retries_set(curation_dag, 0):
        yield {"dag": curation_dag, "conf": conf, "run_root": str(root / "out" / "e2e"),
               "manifest": manifest, "faults": str(root / "faults")}


@pytest.fixture(scope="module")
def faulted_run(run_env):
    """First run: row groups 1 and 6 of embed raise once (test-only fault hook)."""
    spec = {"stage": "embed", "row_groups": FAULTY_ROW_GROUPS, "once_dir": run_env["faults"]}
    t0 = time.perf_counter()
    with mock.patch.dict(os.environ, {"WINNOW_TEST_FAULTS": json.dumps(spec)}):
        dr = run_env["dag"].test(logical_date=FAULT_RUN_DATE, run_conf=run_env["conf"])
    seconds = time.perf_counter() - t0
    return {"dr": dr, "states": _states(dr), "seconds": seconds,
            "embed0": _xcom(dr, "partition.embed", 0), "index": _xcom(dr, "index", key="summary"),
            # No Ray Job in driver mode: the task runner pushes the link's empty value, failed or not.
            "links": {(t, p): _xcom(dr, t, p, key="_link_RayJobLink")
                      for t, p in (("index", -1), ("partition.embed", 0), ("partition.embed", 1))}}


@pytest.fixture(scope="module")
def resumed_run(run_env, faulted_run):
    """Clear only the failed task instances with the CLI, then let the run carry on."""
    day = FAULT_RUN_DATE.strftime("%Y-%m-%d")
    airflow_cli("tasks", "clear", "image_curation", "--only-failed", "--yes",
                "--start-date", day, "--end-date", day)
    t0 = time.perf_counter()
    with mock.patch.dict(os.environ, {"WINNOW_TEST_FAULTS": json.dumps(
            {"stage": "embed", "row_groups": FAULTY_ROW_GROUPS, "once_dir": run_env["faults"]})}):
        dr = _resume(run_env["dag"], FAULT_RUN_DATE)
    seconds = time.perf_counter() - t0
    summaries = {(t, p): _xcom(dr, t, p) for t in PARTITION_TASKS for p in range(3)}
    return {"dr": dr, "states": _states(dr), "seconds": seconds, "summaries": summaries,
            "report": _xcom(dr, "report")}


def test_sparse_failure_fails_only_the_affected_partitions(faulted_run):
    states = faulted_run["states"]
    assert faulted_run["dr"].state == "failed"
    assert states[("index", -1)][0] == "success"
    assert states[("partition.embed", 0)][0] == "failed"
    assert states[("partition.embed", 2)][0] == "failed"
    # The healthy partition went all the way through its chain.
    for task_id in ("partition.embed", "partition.aesthetic", "partition.nsfw"):
        assert states[(task_id, 1)][0] == "success", task_id
    assert states[("partition.aesthetic", 0)][0] == "upstream_failed"
    assert states[("dedup", -1)][0] == "upstream_failed"
    assert set(faulted_run["links"].values()) == {""}, faulted_run["links"]
    # The failed task still committed its other row group and said which one failed.
    embed0 = faulted_run["embed0"]
    assert embed0["failed"] == [1] and embed0["computed"] == 1
    assert "injected test fault" in embed0["first_error"]
    done = sorted(os.path.basename(p) for p in glob.glob(f"{faulted_run['index']['run_root']}/embed/p00000/rg*.parquet"))
    assert done == ["rg000000000.parquet"]


def test_clear_only_failed_then_resume_computes_exactly_the_failed_row_groups(faulted_run, resumed_run):
    assert resumed_run["dr"].state == "success"
    before, after = faulted_run["states"], resumed_run["states"]
    # Task instances that had succeeded were not run again.
    for key, (state, tries) in before.items():
        if state == "success":
            assert after[key] == (state, tries), key
    assert after[("partition.embed", 0)] == ("success", 2)
    s = resumed_run["summaries"]
    assert (s[("partition.embed", 0)]["computed"], s[("partition.embed", 0)]["skipped"]) == (1, 1)
    assert (s[("partition.embed", 2)]["computed"], s[("partition.embed", 2)]["skipped"]) == (1, 2)
    print(f"\nfaulted run {faulted_run['seconds']:.1f} s, resume {resumed_run['seconds']:.1f} s")


def test_mapped_instances_are_labelled_with_their_row_group_range(resumed_run):
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = [ti for ti in resumed_run["dr"].get_task_instances(session=session) if ti.task_id == "write"]
        labels = sorted(ti.rendered_map_index for ti in tis)
    assert labels == ["p0: row groups 0-1", "p1: row groups 2-4", "p2: row groups 5-7"]


def test_counts_add_up_and_match_the_output_files(run_env, resumed_run):
    from winnow.schemas import IMAGE_EXTENSIONS

    report = resumed_run["report"]
    from winnow.stages.status import COUNT_NAMES

    assert report["records"] == sum(report[b] for b in COUNT_NAMES.values())
    assert report["exact_duplicates"] == run_env["manifest"]["expected"]["exact_duplicates"] > 0
    assert report["records"] == run_env["manifest"]["expected"]["records"]
    assert report["undecodable"] > 0  # the sample has corrupt members
    run_root = run_env["run_root"]
    rows = sum(pq.read_metadata(p).num_rows for p in glob.glob(f"{run_root}/write/p*/rg*.parquet"))
    images = 0
    for path in glob.glob(f"{run_root}/write/p*/rg*.tar"):
        with tarfile.open(path) as tar:
            images += sum(1 for n in tar.getnames() if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
    assert rows == images == report["kept"] == report["written"]
    with open(f"{run_root}/_summary.json") as f:
        assert json.load(f)["kept"] == report["kept"]


def test_task_state_store_holds_the_partition_progress(resumed_run):
    """The resumed embed instance of partition 0 recorded its progress under its map index."""
    from airflow.models.task_state_store import TaskStateStoreModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(TaskStateStoreModel).filter_by(
            dag_id="image_curation", run_id=resumed_run["dr"].run_id, task_id="partition.embed",
            map_index=0, key="winnow.progress.embed",
        ).one()
        record = json.loads(row.value)
    assert record["state"] == "done" and record["committed"] == 2 and record["failed"] == []
    assert record["try_number"] == 2 and len(record["fingerprint"]) == 16


def test_changed_threshold_on_the_same_run_key_fails_fast_and_overwrites_nothing(run_env, resumed_run):
    run_root = run_env["run_root"]
    nsfw_files = {p: os.path.getmtime(p) for p in glob.glob(f"{run_root}/nsfw/p*/rg*.parquet")}
    conf = {**run_env["conf"], "nsfw_threshold": 0.9}
    dr = run_env["dag"].test(logical_date=CHANGE_RUN_DATE, run_conf=conf)
    states = _states(dr)
    assert dr.state == "failed"
    assert states[("index", -1)] == ("failed", 1)  # AirflowFailException: no retry
    assert {os.path.getmtime(p) for p in nsfw_files} == set(nsfw_files.values())
    assert not glob.glob(f"{run_root}/*.replaced-*")


def test_overwrite_recomputes_the_changed_stage_and_later_ones_only(run_env, resumed_run):
    conf = {**run_env["conf"], "nsfw_threshold": 0.9, "overwrite": True}
    dr = run_env["dag"].test(logical_date=CHANGE_RUN_DATE, run_conf=conf)
    assert dr.state == "success"
    computed = {t: sum(_xcom(dr, t, p)["computed"] for p in range(3)) for t in (*PARTITION_TASKS, "status")}
    # A threshold is the thresholds step's: no score is computed again, only what follows it.
    assert computed["partition.embed"] == computed["partition.aesthetic"] == computed["partition.nsfw"] == 0
    assert computed["status"] == computed["write"] == 8
    moved = _xcom(dr, "index", key="summary")["moved_aside"]
    assert set(moved) == {"thresholds", "centroids", "assign", "pairwise", "dedup", "status", "write"}


def test_bad_params_fail_fast_without_retries(run_env, tmp_path):
    dag = run_env["dag"]
    with retries_set(dag, 2):
        conf = {**run_env["conf"], "input_uri": str(tmp_path / "nowhere"), "run_key": "bad"}
        dr = dag.test(logical_date=datetime(2025, 3, 3, tzinfo=UTC), run_conf=conf)
    assert dr.state == "failed"
    assert _states(dr)[("index", -1)] == ("failed", 1)
    assert not os.path.exists(tmp_path / "out")
