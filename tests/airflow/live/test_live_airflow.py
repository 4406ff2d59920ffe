"""image_curation under a REAL Airflow 3.3 (scheduler + LocalExecutor + api-server, SQLite): sparse
retry by clearing failed mapped instances through the REST API, backfills with a threshold
override and ``--reprocess-behavior failed``, and a task process SIGKILLed mid-partition.

The package's one ``airflow standalone`` (and the local Ray head its tasks attach to via
``ray_default``) serves every test here, and its failed run (partition 1's write fails one row
group on every try) is the sparse run cleared here; the tests share one input and run in file
order. Faults come from the test-only hook (``WINNOW_TEST_FAULTS=@<file>``, rewritten between
runs). Slow: minutes.
"""

from __future__ import annotations

import glob
import json
import os
import time
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.airflow._live import LiveAirflow, LiveAirflowError
from tests.airflow.live.conftest import RUN_TIMEOUT, set_faults, stage_files
from winnow.filters import COUNT_NAMES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

# The package's failed run (partition 1's write fails its second row group) is the sparse run.
# Two backfill dates on the same input and thresholds, in ONE partition (12 + pairwise buckets
# task instances per run instead of 20 +: what the backfill tests check needs no second
# partition, and the output does not depend on the partitioning), run side by side
# (``--max-active-runs 2``): the embed task of one of them is SIGKILLed after its first row group
# committed (the fault fires once, in whichever run gets there first: the test then finds which
# from the task tries); the other is the fault-free reference the cleared sparse run (2
# partitions) must equal.
BACKFILL_DATES = ("2025-02-01", "2025-02-02")
BACKFILL_PARTITIONS = 1
KILLED = ("partition.embed", 0)  # the backfill's one partition
PARTITION_TASKS = ("partition.embed", "partition.aesthetic", "partition.nsfw", "write")
STAGES = ("embed", "aesthetic", "nsfw", "write")
COUNTS = ("records", *COUNT_NAMES.values(), "written")


def _output(run_root: str) -> dict[str, object]:
    """What a run delivers: kept keys, the tar bytes of each row group, the summary counts."""
    keys = sorted(k for p in glob.glob(f"{run_root}/write/p*/rg*.parquet")
                  for k in pq.read_table(p, columns=["key"]).column("key").to_pylist())
    tars = {os.path.basename(p): Path(p).read_bytes() for p in glob.glob(f"{run_root}/write/p*/rg*.tar")}
    with open(f"{run_root}/_summary.json") as f:
        summary = json.load(f)
    return {"keys": keys, "tars": tars, "counts": {k: summary[k] for k in COUNTS}}


@pytest.fixture(scope="module")
def live(shared_airflow):
    """The package's Airflow services; runs land under the DAG's default output root."""
    t0 = time.perf_counter()
    try:
        yield {"af": shared_airflow["af"], "out": shared_airflow["default_out"],
               "fault_file": str(shared_airflow["fault_file"]), "t0": t0}
    finally:
        set_faults(shared_airflow, None)
        print(f"\nlive Airflow module: {time.perf_counter() - t0:.0f} s")


def _ti_seconds(af: LiveAirflow, run_id: str) -> list[float]:
    return [t["duration"] for t in af.task_instances(run_id)
            if t["map_index"] >= 0 and t["duration"] and t["state"] == "success"]


@pytest.fixture(scope="module")
def sparse(failed_run):
    return failed_run


@pytest.fixture(scope="module")
def cleared(live, sparse):
    """POST clearTaskInstances (only_failed) through the REST API; the run then completes."""
    af = live["af"]
    t0 = time.perf_counter()
    cleared = af.clear({"dry_run": False, "only_failed": True, "dag_run_id": sparse["run_id"]})
    state = af.wait_run(sparse["run_id"], timeout=RUN_TIMEOUT, states=("success", "failed"))
    run_id = sparse["run_id"]
    return {"cleared": sorted((t["task_id"], t["map_index"]) for t in cleared), "state": state,
            "states": af.task_states(run_id), "seconds": time.perf_counter() - t0,
            "summaries": {(t, p): af.xcom(run_id, t, p) for t in PARTITION_TASKS for p in range(2)},
            "files": {s: stage_files(sparse["run_root"], s) for s in STAGES}}


def test_sparse_failure_through_the_scheduler_fails_only_the_affected_partition(live, sparse):
    states = sparse["states"]
    assert sparse["state"] == "failed", states
    for key in (("index", -1), ("centroids", -1), ("write", 0)):
        assert states[key][0] == "success", key
    assert states[("write", 1)] == ("failed", 3)  # the DAG's two retries, used up
    for task_id in ("partition.embed", "partition.aesthetic", "partition.nsfw", "assign", "dedup"):
        for p in range(2):
            assert states[(task_id, p)] == ("success", 1), (task_id, p)
    assert states[("report", -1)][0] == "upstream_failed"
    write1 = sparse["write1"]
    assert write1["failed"] == [sparse["faulty_rg"]] and "injected test fault" in write1["first_error"]
    committed = sorted(os.path.basename(p) for p in sparse["files"]["write"] if "/p00001/" in p)
    assert committed == [f"rg{rg:09d}.parquet" for rg in sparse["p1"] if rg != sparse["faulty_rg"]]


def test_rest_clear_only_failed_recomputes_exactly_the_failed_row_group(live, sparse, cleared):
    assert cleared["state"] == "success", cleared["states"]
    # only_failed also takes the upstream_failed instances downstream of the failed one.
    assert ("write", 1) in cleared["cleared"]
    assert all(sparse["states"][k][0] in ("failed", "upstream_failed") for k in cleared["cleared"])
    for key, (state, tries) in sparse["states"].items():
        if state == "success":
            assert cleared["states"][key] == (state, tries), key  # not run again
    assert cleared["states"][("write", 1)] == ("success", 4)
    s = cleared["summaries"]
    assert (s[("write", 1)]["computed"], s[("write", 1)]["skipped"]) == (1, len(sparse["p1"]) - 1)
    # Storage agrees: every row-group file from the failed run is the same file, and the one new
    # file is the failed row group's.
    before, after = sparse["files"]["write"], cleared["files"]["write"]
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == [f"write/p00001/rg{sparse['faulty_rg']:09d}.parquet"]
    for stage in ("embed", "aesthetic", "nsfw"):
        assert cleared["files"][stage] == sparse["files"][stage], stage
    print(f"\nfaulted run {sparse['seconds']:.0f} s; clear -> success {cleared['seconds']:.0f} s")


@pytest.fixture(scope="module")
def backfill(live, sparse, cleared, tmp_path_factory):
    """``airflow backfill create`` over two dates with a threshold override in the conf, in one
    partition, both runs at once. One date's embed task is SIGKILLed right after its first row
    group committed (test-only ``kill_task`` fault, fires once over both runs: the marker file
    is created with O_EXCL): Airflow must notice and retry it."""
    from winnow.rowgroups.plan import RowGroupPlan

    af = live["af"]
    plan = RowGroupPlan(num_records=sparse["plan"].num_records, buffer_size=sparse["plan"].buffer_size,
                        max_partitions=BACKFILL_PARTITIONS)
    assert plan.num_partitions == 1 and len(plan.partition_row_groups(KILLED[1])) >= 2, plan
    killed_rg = plan.partition_row_groups(KILLED[1])[0]
    set_faults(live, {"stage": "embed", "row_groups": [killed_rg], "mode": "kill_task",
                      "once_dir": str(tmp_path_factory.mktemp("faults-kill"))})
    # The sparse run's conf (no run_key: the logical date names the run) in one partition.
    conf = {**sparse["conf"], "max_partitions": BACKFILL_PARTITIONS}
    t0 = time.perf_counter()
    af.cli("backfill", "create", "--dag-id", "image_curation", "--from-date", BACKFILL_DATES[0],
           "--to-date", BACKFILL_DATES[-1], "--max-active-runs", str(len(BACKFILL_DATES)),
           "--dag-run-conf", json.dumps(conf))
    # Below the test's 3600 s timeout, so a stuck backfill fails with the log tail, not a bare timeout.
    deadline = time.monotonic() + 2 * RUN_TIMEOUT
    while True:
        runs = [r for r in af.dag_runs() if r["run_type"] == "backfill"]
        if len(runs) == len(BACKFILL_DATES) and all(r["state"] in ("success", "failed") for r in runs):
            break
        if time.monotonic() > deadline:
            raise LiveAirflowError(f"backfill not done: {[(r['dag_run_id'], r['state']) for r in runs]}\n{af.log_tail()}")
        time.sleep(3)
    set_faults(live, None)
    by_date = {r["logical_date"][:10]: r for r in runs}
    embed_tis = {day: {(t["task_id"], t["map_index"]): t for t in af.task_instances(r["dag_run_id"])}[KILLED]
                 for day, r in by_date.items()}
    killed = [day for day, ti in embed_tis.items() if ti["try_number"] > 1]
    assert len(killed) == 1, f"the kill fault fires once over both runs: {embed_tis}"
    (killed_day,) = killed
    (clean_day,) = set(BACKFILL_DATES) - {killed_day}
    return {"runs": by_date, "seconds": time.perf_counter() - t0, "conf": conf, "killed_rg": killed_rg,
            "killed_day": killed_day, "clean_day": clean_day, "killed_ti": embed_tis[killed_day],
            "killed_summary": af.xcom(by_date[killed_day]["dag_run_id"], *KILLED),
            "ti_seconds": [s for r in runs for s in _ti_seconds(af, r["dag_run_id"])]}


def test_backfill_writes_one_run_key_per_date_with_the_overridden_threshold(live, sparse, backfill):
    for day in BACKFILL_DATES:
        run = backfill["runs"][day]
        assert run["state"] == "success", (day, live["af"].task_states(run["dag_run_id"]))
        run_root = live["out"] / datetime.strptime(day, "%Y-%m-%d").strftime("%Y%m%d")
        summary = json.loads((run_root / "_summary.json").read_text())
        assert summary["config"]["nsfw_threshold"] == 0.6 and summary["config"]["aesthetic_threshold"] == 3.0
        assert summary["config"]["run_key"] == run_root.name
        assert summary["records"] == sparse["manifest"]["expected"]["records"]
        assert summary["partitions"] == BACKFILL_PARTITIONS
    print(f"\nbackfill of {len(BACKFILL_DATES)} dates {backfill['seconds']:.0f} s; mapped task instances "
          f"{sorted(round(s) for s in backfill['ti_seconds'])} s")


def test_sigkilled_task_is_retried_by_airflow_and_computes_only_uncommitted_row_groups(live, backfill):
    ti, summary = backfill["killed_ti"], backfill["killed_summary"]
    assert ti["state"] == "success" and ti["try_number"] == 2, ti  # try 1 died by SIGKILL
    run_root = live["out"] / backfill["killed_day"].replace("-", "")
    partition_dir = run_root / "embed" / f"p{KILLED[1]:05d}"
    killed = partition_dir / f"rg{backfill['killed_rg']:09d}.parquet"
    assert killed.exists()
    # Try 2 skipped what try 1 had committed before it died (at least the killed row group) and
    # computed the rest: row group files older than try 2's start are exactly the skipped ones.
    start = datetime.fromisoformat(ti["start_date"].replace("Z", "+00:00")).timestamp()
    older = [p for p in glob.glob(f"{partition_dir}/rg*.parquet") if os.stat(p).st_mtime < start]
    assert summary["skipped"] == len(older) >= 1
    assert summary["computed"] == summary["row_groups"] - summary["skipped"] and summary["failed"] == []
    assert str(killed) in older


def test_cleared_run_output_equals_a_fault_free_run(live, sparse, cleared, backfill):
    """The sparse run (failed, cleared, resumed; 2 partitions) against the backfill date that had
    no fault (1 partition): the same kept keys, tar bytes of every row group, counts."""
    resumed = _output(sparse["run_root"])
    clean = _output(str(live["out"] / backfill["clean_day"].replace("-", "")))
    assert resumed["keys"] == clean["keys"] and resumed["keys"]
    assert resumed["tars"] == clean["tars"]
    assert resumed["counts"] == clean["counts"]
    c = resumed["counts"]
    assert c["records"] == sum(c[k] for k in COUNTS if k not in ("records", "written"))


def test_backfill_reprocess_failed_leaves_completed_dates_alone(live, backfill):
    af = live["af"]
    roots = [str(live["out"] / d.replace("-", "")) for d in BACKFILL_DATES]
    before = {r: {s: stage_files(r, s) for s in ("embed", "nsfw", "write")} for r in roots}
    runs_before = {r["dag_run_id"]: r for r in af.dag_runs()}
    args = ("backfill", "create", "--dag-id", "image_curation", "--from-date", BACKFILL_DATES[0],
            "--to-date", BACKFILL_DATES[-1], "--reprocess-behavior", "failed",
            "--dag-run-conf", json.dumps(backfill["conf"]))
    deadline = time.monotonic() + 120
    while True:  # the first backfill is marked complete by the scheduler a moment after its runs
        try:
            out = af.cli(*args)
            break
        except LiveAirflowError as exc:
            if "Another backfill is running" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(3)
    # No wait needed: ``backfill create`` makes its runs (or says "already exists") before it
    # returns, and reprocessing a run would have cleared it (no longer "success") by then too.
    runs_after = {r["dag_run_id"]: r for r in af.dag_runs()}
    # Observed on 3.3.2: a backfill is created, but every date is "already exists": no new run.
    assert set(runs_after) == set(runs_before), out.stdout
    assert all(runs_after[k]["state"] == v["state"] for k, v in runs_before.items())
    assert {r: {s: stage_files(r, s) for s in ("embed", "nsfw", "write")} for r in roots} == before


def test_a_scheduler_that_dies_is_started_again_by_the_harness(live):
    """The harness's watchdog (``LiveAirflow._watch_scheduler``) stands in for a deployment's
    supervisor: ``airflow standalone`` never restarts a component, and Airflow 3's scheduler
    exits on some races of its own. SIGKILL the scheduler; a new one must report healthy."""
    import requests

    af = live["af"]
    sched = af.scheduler_process()
    assert sched is not None, f"no scheduler is running before the kill\n{af.log_tail()}"
    before = len(af.scheduler_restarts)
    killed_at = time.time()
    sched.kill()
    deadline = time.monotonic() + 300
    while True:
        health = requests.get(f"{af.base}/api/v2/monitor/health", timeout=30).json()["scheduler"]
        beat = health.get("latest_scheduler_heartbeat")
        if len(af.scheduler_restarts) > before and health["status"] == "healthy" and beat \
                and datetime.fromisoformat(beat.replace("Z", "+00:00")).timestamp() > killed_at:
            break
        if time.monotonic() > deadline:
            raise LiveAirflowError(f"no healthy scheduler after the kill: {health}\n{af.log_tail()}")
        time.sleep(2)
    assert af.scheduler_restarts[-1].poll() is None
