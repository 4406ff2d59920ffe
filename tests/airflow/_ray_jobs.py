"""A real local Ray head with the dashboard and its job server on loopback ports and token auth on,
for the job-mode tests: started by pid and ended by pid (never ``ray stop``)."""

from __future__ import annotations

import glob
import json
import os
import secrets
import sys
import uuid
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from winnow.ray import cluster

REPO = Path(__file__).resolve().parents[2]
COUNTS = ("records", "undecodable", "aesthetic_dropped", "nsfw_dropped", "duplicates", "kept", "written")


def start_job_head(root: Path, *, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """A head whose job drivers and workers run this checkout's code with the venv's Python."""
    token = secrets.token_hex(24)
    env = {
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
        # The job entrypoint is `python -m winnow.ray.job`: this venv's python, this checkout.
        "PATH": os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", ""))),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        **(extra_env or {}),
    }
    # Short: Ray puts unix sockets under its temp dir (107-byte path limit).
    temp_dir = f"/tmp/wj-{uuid.uuid4().hex[:6]}"
    head = cluster.start_head(temp_dir, root / "ray-head.log", num_cpus=2, env=env,
                              dashboard=True, extra_args=("--num-gpus=0", "--object-store-memory=300000000"),
                              timeout_s=300)  # seen: > 120 s at load 15-20 on 2 cores
    return {"head": head, "token": token, "url": head.dashboard_url, "address": head.address, "temp_dir": temp_dir}


def job_conn(url: str, token: str, **extra: Any) -> str:
    return json.dumps({"conn_type": "ray", "host": url, "password": token, "extra": {"mode": "job", **extra}})


def driver_conn(address: str, token: str) -> str:
    return json.dumps({"conn_type": "ray", "host": address, "password": token, "extra": {"mode": "driver"}})


def output(run_root: str) -> dict[str, Any]:
    """What a run delivers: kept keys, the tar bytes of each row group, the summary counts."""
    write = "write"
    keys = sorted(k for p in glob.glob(f"{run_root}/{write}/p*/rg*.parquet")
                  for k in pq.read_table(p, columns=["key"]).column("key").to_pylist())
    tars = {os.path.basename(p): Path(p).read_bytes() for p in glob.glob(f"{run_root}/{write}/p*/rg*.tar")}
    with open(f"{run_root}/_summary.json") as f:
        summary = json.load(f)
    return {"keys": keys, "tars": tars, "counts": {k: summary.get(k) for k in COUNTS}}


def jobs_of(url: str, token: str) -> list[dict[str, Any]]:
    import requests

    r = requests.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    r.raise_for_status()
    return [j for j in r.json() if (j.get("submission_id") or "").startswith("winnow-")]


def timed_run(dag, logical_date, conf: dict[str, Any], run_key: str, conn_id: str) -> tuple[Any, float]:
    """``dag.test`` of one run named ``run_key`` on the ``ray`` connection ``conn_id``; (run, seconds)."""
    import time

    t0 = time.perf_counter()
    dr = dag.test(logical_date=logical_date, run_conf={**conf, "run_key": run_key, "ray_conn_id": conn_id})
    return dr, time.perf_counter() - t0
