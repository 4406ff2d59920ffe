"""Airflow worker slot-seconds per partition: job mode vs driver mode on the same input and Ray head.

A local Ray head with its job server and token auth; the ``image_curation`` DAG through
``dag.test()`` (temp AIRFLOW_HOME, SQLite) twice per round on the same generated shards: job mode
(each partition task submits a Ray Job and defers) and driver mode (the task process attaches to
the head by GCS address and drives Ray Data). A slot-second is a second the operator's code
occupies an Airflow worker: ``execute`` plus, in job mode, ``execute_complete`` (the deferred time
in between holds no slot). Airflow's own per-try overhead (the same in both modes) is outside.

    python benchmarks/job_mode_slots.py --runs 1 --json /tmp/winnow-bench/job_slots.json

``--ray-address``/``--ray-url`` (token in ``$WINNOW_BENCH_RAY_TOKEN``) use a running head with its
job server instead of starting one (the test suite's smoke run: its shared head).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", help="write the raw figures here")
    ap.add_argument("--one-job-max-records", type=int, default=None,
                    help="the job connection's extra one_job_max_records (0: a Ray Job per step; default: "
                         "winnow's, under which this run of 12 records runs in one job)")
    from benchmarks._common import (
        RAY_TOKEN_ENV,
        add_ray_head,
        add_smoke,
        airflow_cli,
        airflow_env,
        apply_smoke,
        driver_conn,
        job_conn,
        start_job_head,
    )

    add_ray_head(ap, jobs=True)
    add_smoke(ap)
    args = ap.parse_args()
    if args.ray_address and not (args.ray_url and os.environ.get(RAY_TOKEN_ENV)):
        ap.error(f"--ray-address needs --ray-url and ${RAY_TOKEN_ENV}")
    apply_smoke(args, runs=1)  # one job-mode DAG run of 12 records: its smallest form
    # The smoke run makes the job-mode run only: the driver-mode one runs the same lines of this
    # script (the suite runs driver mode on the shared cluster elsewhere), and each run costs a minute.
    modes = (("job", "ray_jobb"),) if args.smoke else (("job", "ray_jobb"), ("driver", "ray_driverb"))
    # Airflow reads its settings when it is imported: set them first (INFO logs, as the tests run it).
    settings = airflow_env(tempfile.mkdtemp(prefix="winnow-bench-airflow-"), logging_level="INFO")
    os.environ.update(settings)
    airflow_cli(settings, "db", "migrate", timeout=300)
    import ray
    from airflow.dag_processing.dagbag import DagBag

    from winnow.data.sample import generate_sample
    from winnow.ray import cluster
    from winnow_airflow.base import CurationOperator
    from winnow_airflow.stages import OPERATORS, ReportOperator

    root = Path(tempfile.mkdtemp(prefix="winnow-bench-jobs-"))
    generate_sample(str(root / "shards"), shards=1, per_shard=12, seed=0, corrupt=True)
    conf = {"input_uri": str(root / "shards"), "buffer_size": 10, "max_partitions": 1,
            "model": "winnow-tiny-vit", "pretrained": "random", "allow_random_weights": True,
            "aesthetic_threshold": 0.0}
    slots: dict[tuple[str, int], float] = defaultdict(float)

    def timed(fn):
        def wrapper(self, context, *a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(self, context, *a, **kw)
            finally:
                slots[(self.task_id, context["ti"].map_index)] += time.perf_counter() - t0
        return wrapper

    if args.ray_address:  # a running head: attached to, left running
        started = {"head": None, "token": os.environ[RAY_TOKEN_ENV], "url": args.ray_url,
                   "address": args.ray_address}
    else:
        started = start_job_head(root)
    results: dict[str, list[dict]] = {mode: [] for mode, _ in modes}
    load = os.getloadavg()
    try:
        dag = DagBag(dag_folder=str(REPO / "dags")).dags["image_curation"]
        knobs = {} if args.one_job_max_records is None else {"one_job_max_records": args.one_job_max_records}
        env = {"AIRFLOW_CONN_RAY_JOBB": job_conn(started["url"], started["token"], **knobs),
               "AIRFLOW_CONN_RAY_DRIVERB": driver_conn(started["address"], started["token"])}
        day = datetime(2025, 5, 1, tzinfo=UTC)
        with mock.patch.dict(os.environ, env), contextlib.ExitStack() as patches:
            # Every step's operator code counts (the global steps are Ray Jobs in job mode too).
            for cls in {*OPERATORS.values(), ReportOperator}:
                patches.enter_context(mock.patch.object(cls, "execute", timed(cls.execute)))
            patches.enter_context(mock.patch.object(CurationOperator, "execute_complete",
                                                    timed(CurationOperator.execute_complete)))
            for r in range(args.runs):
                for mode, conn in modes:
                    slots.clear()
                    t0 = time.perf_counter()
                    dr = dag.test(logical_date=day, run_conf={**conf, "output_root": str(root / f"out{r}"),
                                                              "run_key": mode, "ray_conn_id": conn})
                    wall = time.perf_counter() - t0
                    day += timedelta(days=1)
                    per_task = {f"{t}[{m}]": round(s, 2) for (t, m), s in sorted(slots.items())}
                    results[mode].append({"state": str(dr.state), "wall_s": round(wall, 1),
                                          "slot_s_per_partition": round(sum(slots.values()), 2),
                                          "per_task": per_task})
                    if mode == "job":
                        results[mode][-1]["jobs"] = job_phases(started, dr.run_id)
                    print(mode, results[mode][-1], flush=True)
                ray.shutdown()
    finally:
        if started["head"] is not None:
            cluster.stop_head(started["head"], timeout_s=15)
    phases = [j for run in results["job"] for j in run.get("jobs", [])]
    summary = {mode: {"slot_s_median": statistics.median(x["slot_s_per_partition"] for x in runs),
                      "wall_s_median": statistics.median(x["wall_s"] for x in runs), "runs": runs}
               for mode, runs in results.items()}
    if phases:  # where a job's time goes, median over every job of every round
        summary["job_phases_median_s"] = {k: round(statistics.median(j[k] for j in phases), 2)
                                          for k in ("submit_to_driver", "driver_to_attached", "attached_to_done",
                                                    "done_to_ended", "total")}
        summary["jobs_per_run"] = len(phases) // max(1, len(results["job"]))
    summary["load_at_start"] = [round(x, 2) for x in load]
    summary["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def job_phases(started: dict, run_id: str) -> list[dict]:
    """Each Ray Job of one DAG run, its time cut into: submitted -> driver's main() (runtime env,
    driver process start), main() -> attached to Ray (imports, ray.init), attached -> done (the
    step: Ray Data, workers or actors, model load, compute, commits), done -> ended (driver exit,
    as Ray's job record says). From the job record's start/end times and the job's
    ``WINNOW_JOB_TIMES`` line."""
    import requests

    from benchmarks._common import jobs_of
    from winnow.job import TIMES_MARKER

    out = []
    headers = {"Authorization": f"Bearer {started['token']}"}
    for job in jobs_of(started["url"], started["token"]):
        if job["metadata"].get("airflow_run_id") != run_id:
            continue
        logs = requests.get(f"{started['url']}/api/jobs/{job['submission_id']}/logs", headers=headers,
                            timeout=30).json().get("logs") or ""
        line = next((ln for ln in reversed(logs.splitlines()) if TIMES_MARKER in ln), None)
        if line is None or not job.get("start_time") or not job.get("end_time"):
            continue
        t = json.loads(line.split(TIMES_MARKER, 1)[1])
        start, end = job["start_time"] / 1000, job["end_time"] / 1000
        out.append({"stage": job["metadata"].get("winnow_stage"), "submit_to_driver": t["main"] - start,
                    "driver_to_attached": t["attached"] - t["main"], "attached_to_done": t["done"] - t["attached"],
                    "done_to_ended": end - t["done"], "total": end - start})
    return out


if __name__ == "__main__":
    raise SystemExit(main())
