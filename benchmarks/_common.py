"""Shared helpers of the benchmark harnesses: machine description, cached sample shards, medians,
a temp Airflow home, a Ray head with its Jobs API.

Benchmarks are scripts, not tests: nothing here is collected by pytest. They never import
``tests``; the tests import what they share with the benchmarks from here.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from winnow.data.sample import TINY_MODEL_PARAMS  # noqa: E402

#: The curation every benchmark runs: the demo's tiny-model params (each filter drops some
#: records, dedup finds the planted copies).
TINY_CURATION = dict(TINY_MODEL_PARAMS)


def machine() -> dict:
    """What the numbers were measured on, load included (this machine is shared)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        mem_gib = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": mem_gib,
        "gpu": gpu,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


def describe(m: dict) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return (f"{m['nproc']} cores {m['cpu']}, {m['ram_gib']} GiB RAM{gpu}; "
            f"load average {m['loadavg'][0]:.2f} / {m['loadavg'][1]:.2f} / {m['loadavg'][2]:.2f} (1/5/15 min)")


def ensure_sample(folder: str, *, shards: int, per_shard: int, seed: int = 0) -> dict:
    """Generate sample shards once (cached by a manifest with the same size and seed)."""
    from winnow.data.sample import MANIFEST, generate_sample

    manifest_path = Path(folder) / MANIFEST
    stamp = Path(folder) / "_bench_params.json"
    params = {"shards": shards, "per_shard": per_shard, "seed": seed}
    if manifest_path.exists() and stamp.exists() and json.loads(stamp.read_text()) == params:
        return json.loads(manifest_path.read_text())
    manifest = generate_sample(folder, shards=shards, per_shard=per_shard, seed=seed)
    stamp.write_text(json.dumps(params))
    return manifest


def sync(device) -> None:
    """Wait for a CUDA device's queued work (timings end when the device has finished)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def time_image_tower(stage, pixels, batch_size: int) -> float:
    """Seconds the embed stage's image tower takes over ``pixels`` (already preprocessed), in
    ``batch_size`` batches, ending with the copy of every output to the host."""
    import torch

    sync(stage.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        outs = [stage.forward(pixels[s : s + batch_size]) for s in range(0, len(pixels), batch_size)]
        for o in outs:
            o.cpu()
    sync(stage.device)
    return time.perf_counter() - t0


def median(values: list[float]) -> float:
    return statistics.median(values)


def run_json_child(argv: list[str], *, env: dict | None = None, timeout: float = 1800) -> dict:
    """Run a child Python process that prints one JSON line starting with ``RESULT `` last."""
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, cwd=str(REPO),
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(
        f"child {' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    )


class Timer:
    """``with Timer() as t: ...; t.seconds``"""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0


SMOKE_HELP = ("seconds, tiny data: check that the script still runs against today's code (the test suite "
              "runs every benchmark this way); its figures mean nothing")


#: The token of a running Ray head a script attaches to (``--ray-address``), never on the
#: command line.
RAY_TOKEN_ENV = "WINNOW_BENCH_RAY_TOKEN"


def token_env() -> dict[str, str]:
    """Ray's token-auth settings for a child attaching to the ``--ray-address`` head (Ray reads
    them when it is imported), from ``$WINNOW_BENCH_RAY_TOKEN``."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ[RAY_TOKEN_ENV]}


def add_ray_head(ap, *, jobs: bool = False) -> None:
    """``--ray-address`` (and with ``jobs``, ``--ray-url``): attach to a running Ray head with token
    auth (token in ``$WINNOW_BENCH_RAY_TOKEN``) instead of starting one, as the test suite's smoke
    runs do with its one shared head. A measurement starts its own."""
    ap.add_argument("--ray-address", help=f"GCS address of a running Ray head to attach to (token in ${RAY_TOKEN_ENV})")
    if jobs:
        ap.add_argument("--ray-url", help="that head's dashboard URL (its Jobs API); needed with --ray-address")


def add_smoke(ap) -> None:
    """The ``--smoke`` flag every benchmark script has (``tests/benchmarks/test_smoke.py`` runs it)."""
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)


def apply_smoke(args, **tiny) -> None:
    """With ``--smoke``: replace the arguments named in ``tiny`` (a ``None`` workdir-like value
    becomes a fresh temp folder) and say that the figures are not a measurement."""
    import tempfile

    if not getattr(args, "smoke", False):
        return
    for name, value in tiny.items():
        setattr(args, name, tempfile.mkdtemp(prefix="winnow-smoke-") if value is None else value)
    print("smoke run: tiny data, the figures are not a measurement", file=sys.stderr, flush=True)


# ---- Airflow: a temp AIRFLOW_HOME on SQLite ---------------------------------------------------

AIRFLOW_BIN = str(Path(sys.executable).with_name("airflow"))


def airflow_env(home: str, *, logging_level: str = "WARNING") -> dict[str, str]:
    """Airflow's settings for ``home`` (SQLite in it, this checkout's DAGs and plugins, no
    examples). Airflow reads them when it is imported: set them first."""
    return {
        "AIRFLOW_HOME": home,
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": logging_level,
    }


def airflow_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the ``airflow`` CLI with ``env`` over this process's environment; a failure raises
    with its output."""
    proc = subprocess.run([AIRFLOW_BIN, *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"airflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# ---- a local Ray head with its Jobs API -------------------------------------------------------

def start_job_head(root: Path, *, extra_env: dict[str, str] | None = None) -> dict:
    """A local Ray head with the dashboard's job server and token auth on loopback ports, whose job
    drivers and workers run this checkout's code with this venv's Python. Started by pid (stop it
    with ``winnow.ray.cluster.stop_head(started["head"])``, never ``ray stop``)."""
    import secrets
    import uuid

    from winnow.ray import cluster

    token = secrets.token_hex(24)
    env = {
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
        # The job entrypoint is `python -m winnow.job`: this venv's python, this checkout.
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


def job_conn(url: str, token: str, **extra) -> str:
    """An Airflow ``ray`` connection (JSON) in job mode: Ray Jobs submitted to the dashboard at ``url``."""
    return json.dumps({"conn_type": "ray", "host": url, "password": token, "extra": {"mode": "job", **extra}})


def driver_conn(address: str, token: str) -> str:
    """An Airflow ``ray`` connection (JSON) in driver mode: the task attaches to the GCS ``address``."""
    return json.dumps({"conn_type": "ray", "host": address, "password": token, "extra": {"mode": "driver"}})


def jobs_of(url: str, token: str) -> list[dict]:
    """winnow's Ray Jobs on the head whose dashboard is ``url`` (the Jobs API's records)."""
    import requests

    r = requests.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    r.raise_for_status()
    return [j for j in r.json() if (j.get("submission_id") or "").startswith("winnow-")]
