"""One real ``airflow standalone`` (and one local Ray head its driver-mode tasks attach to) for
every module of this package: the browser test, the live job-mode tests and the live REST tests.

Starting a standalone costs minutes on two loaded cores, so the package starts it once, and one
failed DAG run (``failed_run``: partition 1's write fails one row group on every try) serves
both the browser test (what a curator sees of a failed run) and, after it, the REST tests
(which clear it and check that only that row group is computed again). The modules run one
after another (in file order: browser, job mode, live) and keep out of each other's way: each
triggers runs with its own run ids and run keys, writes its fault spec to the shared fault file
(``set_faults``) only while its run goes, and a module that needs another connection (job
mode's ``ray_jobs``) creates it through the REST API, as a user would.
"""

from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path

import pytest

from tests.airflow._live import LiveAirflow
from winnow.rowgroups.plan import RowGroupPlan

#: A user with no role: no access to any DAG (the browser test's 403 case).
OUTSIDER = "outsider"
RUN_TIMEOUT = 1500  # s; a run is a few minutes on two cores, more when they are shared
#: 2 shards of 20 pictures (46 records with the planted oddities), buffer 8: 6 row groups in 2
#: partitions of 3.
SHARDS, PER_SHARD, BUFFER, PARTITIONS = 2, 20, 8, 2


def set_faults(live: dict, spec: dict | None) -> None:
    """Writes (or, with None, removes) the test-only fault spec every Airflow task process reads."""
    path = Path(live["fault_file"])
    if spec is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(json.dumps(spec))


@pytest.fixture(scope="package")
def shared_airflow(tmp_path_factory):
    root = tmp_path_factory.mktemp("airflow-live")
    fault_file = root / "faults.json"
    af = LiveAirflow(root / "home", extra_env={
        "WINNOW_TEST_FAULTS": f"@{fault_file}",
        # The DAG retries twice with a 30 s+ backoff; the global cap makes retries exhaust in seconds.
        "AIRFLOW__CORE__MAX_TASK_RETRY_DELAY": "1",
        # Two cores: more task processes at once only contend.
        "AIRFLOW__CORE__PARALLELISM": "2",
        # The DAG's default output root. The browser test's run names none, so the view must find
        # that run through the index task's XCom, not through a server-wide setting.
        "WINNOW_OUTPUT_ROOT": str(root / "default-out"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"admin:admin,{OUTSIDER}:",
        # A loaded shared machine: give the Ray head's raylet longer to register than 10 s.
        "RAY_raylet_start_wait_time_s": "100",
    })
    t0 = time.perf_counter()
    try:
        af.start(timeout=600)
        yield {"af": af, "root": root, "fault_file": fault_file, "default_out": root / "default-out",
               "startup_s": time.perf_counter() - t0}
    finally:
        af.stop()
        print(f"\nshared live Airflow: {time.perf_counter() - t0:.0f} s in all; "
              f"scheduler restarted {len(af.scheduler_restarts)} time(s) by the harness's watchdog")
        assert not af.marked_processes(), "processes started by the live fixture outlived it"


def stage_files(run_root: str, stage: str) -> dict[str, tuple[int, int]]:
    """Row-group file name -> (inode, mtime_ns): a recomputed row group gets a new file."""
    out = {}
    for path in glob.glob(f"{run_root}/{stage}/p*/rg*.parquet"):
        st = os.stat(path)
        out[os.path.relpath(path, run_root)] = (st.st_ino, st.st_mtime_ns)
    return out


@pytest.fixture(scope="package")
def failed_run(shared_airflow, tmp_path_factory):
    """A run whose write of partition 1 fails its second row group on all 3 tries (the DAG's 2
    retries + 1): the run ends failed with everything else committed. Its conf names no output
    root, so it lands under the DAG's default (``WINNOW_OUTPUT_ROOT``): the view must find it
    through the index task's XCom."""
    from winnow.data.sample import TINY_MODEL_PARAMS, generate_sample
    from winnow.stages.write import STAGE

    af = shared_airflow["af"]
    root = tmp_path_factory.mktemp("failed-run")
    manifest = generate_sample(str(root / "shards"), shards=SHARDS, per_shard=PER_SHARD, seed=0, corrupt=True)
    plan = RowGroupPlan(num_records=manifest["expected"]["records"], buffer_size=BUFFER, max_partitions=PARTITIONS)
    assert plan.num_partitions == 2 and len(plan.partition_row_groups(1)) >= 2, plan
    faulty = plan.partition_row_groups(1)[1]
    conf = {"input_uri": str(root / "shards"), "buffer_size": BUFFER, "max_partitions": PARTITIONS,
            **TINY_MODEL_PARAMS, "aesthetic_threshold": 3.0, "nsfw_threshold": 0.6,
            # The filters decided before decode on (image size, caption words): the browser test
            # looks for their outcomes in the gallery, the scores view and the summary.
            "min_image_side": 64, "max_aspect_ratio": 3, "min_caption_words": 3}
    set_faults(shared_airflow, {"stage": STAGE, "row_groups": [faulty], "times": 3, "once_dir": str(root / "once")})
    t0 = time.perf_counter()
    try:
        run_id = af.trigger({**conf, "run_key": "sparse"}, run_id="sparse")
        state = af.wait_run(run_id, timeout=RUN_TIMEOUT)
    finally:
        set_faults(shared_airflow, None)
    run_root = str(shared_airflow["default_out"] / "sparse")
    return {"af": af, "root": root, "run_id": run_id, "state": state, "states": af.task_states(run_id),
            "seconds": time.perf_counter() - t0, "conf": conf, "manifest": manifest, "plan": plan,
            "faulty_rg": faulty, "p1": list(plan.partition_row_groups(1)), "run_root": run_root,
            "write1": af.xcom(run_id, STAGE, 1),
            "files": {s: stage_files(run_root, s) for s in ("embed", "aesthetic", "nsfw", STAGE)}}
