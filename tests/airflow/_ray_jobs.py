"""What the job-mode tests read back from a run (its output, a timed ``dag.test``). The Ray head
with its job server, and the ``ray`` connections to it, are ``benchmarks._common``'s
(``start_job_head``, ``job_conn``, ``driver_conn``, ``jobs_of``): the benchmarks use them too."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

COUNTS = ("records", "undecodable", "aesthetic_dropped", "nsfw_dropped", "duplicates", "kept", "written")


def output(run_root: str) -> dict[str, Any]:
    """What a run delivers: kept keys, the tar bytes of each row group, the summary counts."""
    write = "write"
    keys = sorted(k for p in glob.glob(f"{run_root}/{write}/p*/rg*.parquet")
                  for k in pq.read_table(p, columns=["key"]).column("key").to_pylist())
    tars = {os.path.basename(p): Path(p).read_bytes() for p in glob.glob(f"{run_root}/{write}/p*/rg*.tar")}
    with open(f"{run_root}/_summary.json") as f:
        summary = json.load(f)
    return {"keys": keys, "tars": tars, "counts": {k: summary.get(k) for k in COUNTS}}


def timed_run(dag, logical_date, conf: dict[str, Any], run_key: str, conn_id: str) -> tuple[Any, float]:
    """``dag.test`` of one run named ``run_key`` on the ``ray`` connection ``conn_id``; (run, seconds)."""
    import time

    t0 = time.perf_counter()
    dr = dag.test(logical_date=logical_date, run_conf={**conf, "run_key": run_key, "ray_conn_id": conn_id})
    return dr, time.perf_counter() - t0
