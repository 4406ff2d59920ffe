"""An embedded winnow run beside a Ray head of the user's own on the same machine (issue 16).

A Ray user often has a ``ray start --head`` running. Ray 2.60's ``ray.init()`` without an
address attaches to the latest cluster ``ray start`` left on the machine (the address in
``<RAY_TMPDIR or /tmp>/ray/ray_current_cluster``) or to ``RAY_ADDRESS``, and with ``num_cpus``
it then refuses ("When connecting to an existing cluster, num_cpus and num_gpus must not be
provided"). winnow's embedded Ray must start its own, whatever runs there, and leave the user's
head alone.

One user head serves the module, started as a user would (``ray start --head --num-cpus=1``) in
an environment of its own: a ``HOME`` and a ``RAY_TMPDIR`` the test owns (so the machine's real
``/tmp/ray`` and ``~/.ray`` are not touched), and every winnow process runs in a subprocess with
that same ``HOME`` and ``RAY_TMPDIR``, i.e. where a bare ``ray.init()`` finds the user's head (the
first test checks that it does). After each run the user's head must be as it was: alive, the
same nodes, the same job table (a driver that attached would be a new job), the same
``ray_current_cluster``, no task or actor running on its workers. Every process started here is
ended by pid. Slow: the demo runs the whole DAG under ``dag.test``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests._procs import kill_until_gone
from winnow.ray import cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
RAY_BIN = str(Path(sys.executable).with_name("ray"))
#: Every winnow process a test starts carries this variable (a fresh value per run), so what it
#: left behind (a local Ray) is found and ended by pid, and the user's head never is.
MARKER = "WINNOW_TEST_BESIDE_USER_RAY"
#: Ray's own per-node processes: not workers.
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::IDLE")

STATE = """
import json, sys
from ray._raylet import GcsClient

gcs = GcsClient(address=sys.argv[1])
nodes = sorted((n.node_id.hex(), int(n.state), n.resources_total.get("CPU", 0.0))
               for n in gcs.get_all_node_info().values())
jobs = sorted((j.job_id.hex(), bool(j.is_dead), int(j.driver_pid)) for j in gcs.get_all_job_info().values())
print("STATE " + json.dumps({"nodes": nodes, "jobs": jobs}))
"""

RUN_ALL = """
import json, sys
import ray
from winnow.pipeline import CurationConfig, run_all

root = sys.argv[1]
# The README's in-process example, on the generated sample.
summary = run_all(CurationConfig(input_uri=f"{root}/shards", output_root=f"{root}/out", run_key="beside",
                                 model="winnow-tiny-vit", pretrained="random", allow_random_weights=True))
print("RESULT " + json.dumps({"gcs": ray.get_runtime_context().gcs_address, "nodes": len(ray.nodes()),
                              "records": summary["records"], "kept": summary["kept"]}))
"""

SHARED = """
import json
import ray
from winnow.ray import cluster

cluster.connect(None)
print("RESULT " + json.dumps({"gcs": ray.get_runtime_context().gcs_address, "head": cluster.head_status()}))
"""


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _clean_env() -> dict[str, str]:
    """This process's environment without anything that points Ray, winnow or Airflow somewhere."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("RAY_", "WINNOW_", "AIRFLOW_", "AIRFLOW__")) and k != "PYTHONPATH"}


def _session(pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == pid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return out


def _marked(value: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE and p.environ().get(MARKER) == value:
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def user_ray():
    """``ray start --head --num-cpus=1`` in the user's environment, ended by pid at the end."""
    base = Path(tempfile.mkdtemp(prefix="wu-", dir="/tmp"))  # short: Ray's unix sockets live under it
    home = base / "home"
    home.mkdir()
    env = {**_clean_env(), "HOME": str(home), "RAY_TMPDIR": str(base), "RAY_USAGE_STATS_ENABLED": "0"}
    current = base / "ray" / "ray_current_cluster"  # where `ray start` records "the" cluster of the machine
    # Free ports instead of 6379/10001/52365 (other Rays may run here); a loaded 2-core machine
    # needs longer than Ray's default for the raylet to register. Neither changes how a later
    # `ray.init()` finds this head.
    cmd = [RAY_BIN, "start", "--head", "--block", "--num-cpus=1", f"--port={cluster.free_port()}",
           f"--ray-client-server-port={cluster.free_port()}", f"--dashboard-agent-listen-port={cluster.free_port()}",
           "--include-dashboard=false", "--disable-usage-stats"]
    log_path = base / "user-head.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(base),
                                env={**env, "RAY_raylet_start_wait_time_s": "300",
                                     "RAY_agent_register_timeout_ms": "300000"})
    try:
        deadline = time.monotonic() + 300
        while not (current.exists() and current.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the user's Ray head did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield {"pid": proc.pid, "proc": proc, "address": current.read_text().strip(), "env": env,
               "current": current, "base": base}
    finally:
        cluster.stop_head(proc.pid, timeout_s=10)
        left = _session(proc.pid)
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"processes of the user's head outlived it: {left}"


def _head_state(user) -> dict:
    """What a winnow run must not change on the user's head."""
    assert user["proc"].poll() is None, "the user's Ray head died"
    proc = subprocess.run([sys.executable, "-c", STATE, user["address"]], env=user["env"], capture_output=True,
                          text=True, timeout=180, cwd=str(user["base"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads(proc.stdout.split("STATE ", 1)[1])
    state["current_cluster"] = user["current"].read_text()
    return state


def _busy_workers(user) -> list[str]:
    """Workers of the user's head running a task or actor (a Ray worker renames itself ``ray::<what>``)."""
    busy = []
    for p in _session(user["pid"]):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::") and not title.startswith(RAY_AGENTS):
            busy.append(title)
    return busy


@contextlib.contextmanager
def _owned():
    """A marker for the winnow processes started inside; whatever of them is left running at the
    end (a local Ray, a shared head) is ended by pid."""
    marker = uuid.uuid4().hex
    try:
        yield marker
    finally:
        kill_until_gone(lambda: _marked(marker))


def _run_winnow(args: list[str], env: dict[str, str], timeout: float, cwd: Path, marker: str | None = None):
    """A winnow process in the user's environment (with no ``marker``: its leftovers are ended now)."""
    if marker is None:
        with _owned() as marker:
            return _run_winnow(args, env, timeout, cwd, marker)
    return subprocess.run([sys.executable, *args], env={**env, MARKER: marker, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=timeout, cwd=str(cwd))


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    return json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])


def test_a_bare_ray_init_here_would_attach_to_the_users_head(user_ray):
    """The condition of the bug, checked with Ray alone: in this environment ``ray.init()`` finds
    the user's head and, asked for CPUs, refuses."""
    probe = ("import ray\nfrom ray._private import services\nprint('FOUND', services.canonicalize_bootstrap_address(None))\n"
             "try:\n    ray.init(num_cpus=1, include_dashboard=False)\nexcept ValueError as exc:\n    print('REFUSED', exc)\n"
             "else:\n    print('STARTED', ray.get_runtime_context().gcs_address)\n")
    proc = _run_winnow(["-c", probe], user_ray["env"], 180, user_ray["base"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"FOUND {user_ray['address']}" in proc.stdout
    assert "REFUSED When connecting to an existing cluster, num_cpus" in proc.stdout, proc.stdout


def test_run_all_in_process_runs_on_its_own_ray_and_leaves_the_users_head_alone(user_ray, tmp_path):
    from winnow.data.sample import generate_sample

    manifest = generate_sample(str(tmp_path / "shards"), shards=1, per_shard=12, seed=0, corrupt=True)
    before = _head_state(user_ray)
    t0 = time.perf_counter()
    proc = _run_winnow(["-c", RUN_ALL, str(tmp_path)], user_ray["env"], 600, tmp_path)
    seconds = time.perf_counter() - t0
    result = _result(proc)
    assert result["records"] == manifest["expected"]["records"] and result["kept"] >= 1
    assert _port(result["gcs"]) != _port(user_ray["address"]) and result["nodes"] == 1
    assert _head_state(user_ray) == before
    assert _busy_workers(user_ray) == []
    # Ray writes ~/.ray/auth_token for a new local Ray with no token configured, and the user's
    # next `ray start` would then demand it: the embedded Ray uses a token of winnow's own.
    assert not (Path(user_ray["env"]["HOME"]) / ".ray" / "auth_token").exists()
    print(f"\nrun_all beside the user's head: {seconds:.0f} s")


def test_the_demo_runs_on_its_own_ray_and_leaves_the_users_head_alone(user_ray, tmp_path):
    """``python -m winnow_airflow.demo`` (what ``bash .ci/demo`` runs) on one small shard, for a user
    who also exported ``RAY_ADDRESS`` for their head: the whole DAG under ``dag.test``."""
    env = {**user_ray["env"], "RAY_ADDRESS": user_ray["address"]}
    before = _head_state(user_ray)
    t0 = time.perf_counter()
    proc = _run_winnow(["-m", "winnow_airflow.demo", "--out", str(tmp_path / "demo"), "--shards", "1", "--per-shard", "12"],
                       env, 900, REPO)
    seconds = time.perf_counter() - t0
    log = tmp_path / "demo" / "airflow.log"
    tail = log.read_text(errors="replace")[-6000:] if log.exists() else ""
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:], tail)
    assert ": success" in proc.stdout, proc.stdout[-3000:]
    summary = json.loads((tmp_path / "demo" / "runs" / "demo" / "_summary.json").read_text())
    assert summary["records"] > 0 and summary["kept"] >= 1
    assert _head_state(user_ray) == before
    assert _busy_workers(user_ray) == []
    print(f"\ndemo beside the user's head: {seconds:.0f} s")


def test_the_shared_embedded_head_is_winnows_own_and_does_not_become_the_machines_default(user_ray, tmp_path):
    """``WINNOW_RAY_EMBEDDED=shared`` (Airflow standalone / LocalExecutor task processes), with
    ``RAY_ADDRESS`` naming the user's head: winnow starts and attaches to its own head, and does
    not take over ``ray_current_cluster`` (the user's next ``ray.init()`` still finds their head)."""
    state_dir = Path(tempfile.mkdtemp(prefix="ws-", dir="/tmp"))
    env = {**user_ray["env"], "RAY_ADDRESS": user_ray["address"], cluster.EMBEDDED_ENV: "shared",
           cluster.STATE_DIR_ENV: str(state_dir)}
    before = _head_state(user_ray)
    with _owned() as marker:
        try:
            connected = _run_winnow(["-c", SHARED], env, 300, tmp_path, marker)
        finally:  # the shared head outlives the task process that started it: stop it as a user would
            stop = _run_winnow(["-m", "winnow.ray.cluster", "stop"], env, 120, tmp_path, marker)
            shutil.rmtree(state_dir, ignore_errors=True)
    result = _result(connected)
    assert stop.returncode == 0 and "stopped" in stop.stdout, (stop.stdout, stop.stderr[-2000:])
    assert result["head"] is not None
    assert _port(result["gcs"]) == result["head"]["port"] != _port(user_ray["address"])
    assert _head_state(user_ray) == before
    assert _busy_workers(user_ray) == []
