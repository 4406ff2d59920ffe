"""Airflow worker slot-seconds per partition: job mode vs driver mode on the same input and Ray head.

A local Ray head with its job server and token auth; the ``image_curation`` DAG through
``dag.test()`` (temp AIRFLOW_HOME, SQLite) twice per round on the same generated shards: job mode
(each partition task submits a Ray Job and defers) and driver mode (the task process attaches to
the head by GCS address and drives Ray Data). A slot-second is a second the operator's code
occupies an Airflow worker: ``execute`` plus, in job mode, ``execute_complete`` (the deferred time
in between holds no slot). Airflow's own per-try overhead (the same in both modes) is outside.

    python benchmarks/job_mode_slots.py --runs 1 --json /tmp/winnow-bench/job_slots.json
"""

from __future__ import annotations

import argparse
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
    args = ap.parse_args()
    os.environ.setdefault("WINNOW_TEST_AIRFLOW_HOME", tempfile.mkdtemp(prefix="winnow-bench-airflow-"))
    from tests.airflow.conftest import airflow_cli  # sets the Airflow environment first

    airflow_cli("db", "migrate", timeout=300)
    import ray
    from airflow.dag_processing.dagbag import DagBag

    from operators.base import RowGroupStageOperator
    from tests.airflow._ray_jobs import driver_conn, job_conn, start_job_head
    from winnow.data.sample import generate_sample
    from winnow.ray import cluster

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

    started = start_job_head(root)
    results: dict[str, list[dict]] = {"job": [], "driver": []}
    load = os.getloadavg()
    try:
        dag = DagBag(dag_folder=str(REPO / "dags")).dags["image_curation"]
        env = {"AIRFLOW_CONN_RAY_JOBB": job_conn(started["url"], started["token"]),
               "AIRFLOW_CONN_RAY_DRIVERB": driver_conn(started["address"], started["token"])}
        day = datetime(2025, 5, 1, tzinfo=UTC)
        with mock.patch.dict(os.environ, env), \
                mock.patch.object(RowGroupStageOperator, "execute", timed(RowGroupStageOperator.execute)), \
                mock.patch.object(RowGroupStageOperator, "execute_complete",
                                  timed(RowGroupStageOperator.execute_complete)):
            for r in range(args.runs):
                for mode, conn in (("job", "ray_jobb"), ("driver", "ray_driverb")):
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
                    print(mode, results[mode][-1], flush=True)
                ray.shutdown()
    finally:
        cluster.stop_head(started["head"], timeout_s=15)
    summary = {mode: {"slot_s_median": statistics.median(x["slot_s_per_partition"] for x in runs),
                      "wall_s_median": statistics.median(x["wall_s"] for x in runs), "runs": runs}
               for mode, runs in results.items()}
    summary["load_at_start"] = [round(x, 2) for x in load]
    summary["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
