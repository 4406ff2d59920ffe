"""A real Airflow 3.3 (``airflow standalone``: scheduler, LocalExecutor, dag-processor, api-server,
triggerer) on a free loopback port, with a temp AIRFLOW_HOME and SQLite, driven through its REST API.

Every process it starts carries a unique marker in its environment, so ``stop()`` ends exactly
those (including local Ray processes a killed task left behind), and nothing else.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import requests

from tests._procs import kill_until_gone
from winnow.ray import cluster
from winnow.ray.cluster import free_port

REPO = Path(__file__).resolve().parents[2]
AIRFLOW_BIN = str(Path(sys.executable).with_name("airflow"))
DAG_ID = "image_curation"
MARKER_VAR = "WINNOW_LIVE_AIRFLOW_ID"
FINISHED = ("success", "failed")


class LiveAirflowError(AssertionError):
    """The live Airflow did not do what a test waited for; the message carries the log tail."""


def start_ray_head(temp_dir: Path, env: dict[str, str], *, num_cpus: int = 2) -> str:
    """Starts one local Ray head (its processes inherit ``env``, so the marker too) and returns
    its GCS address. Every task of every run attaches to it through the ``ray_default``
    connection instead of starting a Ray of its own (~10-20 s per task on two cores)."""
    port = free_port()
    cmd = [
        str(Path(AIRFLOW_BIN).with_name("ray")), "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}",
        "--num-gpus=0", "--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        "--object-store-memory=300000000", "--disable-usage-stats",
    ]
    proc = subprocess.run(cmd, env={**cluster.IDLE_WORKER_ENV, **env}, capture_output=True, text=True, timeout=120,
                          cwd=str(temp_dir.parent))  # as winnow's own heads: idle workers kept 30 s
    if proc.returncode != 0:
        raise LiveAirflowError(f"ray start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return f"127.0.0.1:{port}"


class LiveAirflow:
    """One ``airflow standalone`` for a test module.

    :param home: the AIRFLOW_HOME (empty folder; SQLite DB, logs and the admin password go there).
    :param extra_env: more environment for every Airflow process (and so every task process).
    """

    def __init__(self, home: Path, *, extra_env: dict[str, str] | None = None) -> None:
        self.home = Path(home)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.marker = uuid.uuid4().hex
        self.log_path = self.home / "standalone.log"
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home}/airflow.db",
            # Wait for SQLite's write lock instead of failing with "database is locked".
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "tests.airflow.sqlite_busy.CONNECT_ARGS",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            # A non-default API port: task processes must be told where the execution API is.
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base}/execution/",
            # Only triggered and backfill runs: no scheduled run for "yesterday" competes with them.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
            "RAY_USAGE_STATS_ENABLED": "0",
            # `airflow standalone` starts its components as `airflow ...` from PATH.
            "PATH": os.pathsep.join((str(Path(AIRFLOW_BIN).parent), os.environ.get("PATH", ""))),
            MARKER_VAR: self.marker,
            # Ray 2.60 authenticates drivers with a token; the head and every task share this one.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen | None = None
        self._token: str | None = None
        self.session = requests.Session()
        #: Schedulers this instance started after standalone's own died (see ``_watch_scheduler``).
        self.scheduler_restarts: list[subprocess.Popen] = []
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 240, *, ray_head: bool = True) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if ray_head:
            address = start_ray_head(Path(f"/tmp/ray-{self.marker[:8]}"), self.env)
            self.env["AIRFLOW_CONN_RAY_DEFAULT"] = json.dumps({"conn_type": "ray", "extra": {"address": address}})
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [AIRFLOW_BIN, "standalone"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(self.home),
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LiveAirflowError(f"airflow standalone exited with {self.proc.returncode}\n{self.log_tail()}")
            try:
                health = self.session.get(f"{self.base}/api/v2/monitor/health", timeout=5)
                if health.ok and health.json().get("scheduler", {}).get("status") == "healthy" \
                        and self._password_file().exists():
                    break
            except (requests.RequestException, ValueError):
                pass
            if time.monotonic() > deadline:
                raise LiveAirflowError(f"Airflow on {self.base} not healthy after {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(1)
        self._watchdog = threading.Thread(target=self._watch_scheduler, name="scheduler-watchdog", daemon=True)
        self._watchdog.start()
        self._wait_for_dag(deadline)

    def scheduler_process(self) -> psutil.Process | None:
        """The scheduler that runs now: standalone's own (a direct child running ``airflow
        scheduler``; its LocalExecutor workers are forks with the same command line, so only the
        child counts), or the last one the watchdog started. Exited children that standalone has
        not reaped yet (zombies, whose command line cannot be read) are skipped."""
        if self.scheduler_restarts:
            last = self.scheduler_restarts[-1]
            try:
                return psutil.Process(last.pid) if last.poll() is None else None
            except psutil.Error:
                return None
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return None
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE and child.cmdline()[-1:] == ["scheduler"]:
                    return child
            except psutil.Error:
                continue
        return None

    def _scheduler_alive(self) -> bool:
        return self.scheduler_process() is not None

    def _watch_scheduler(self) -> None:
        """Restarts the scheduler when it dies, as a deployment's supervisor (systemd, Kubernetes)
        does: ``airflow standalone`` starts each component once and never again. Airflow 3's
        scheduler exits on some races of its own, e.g. a ``StaleDataError`` on ``dag_run`` while it
        expands a mapped task of a run that ``backfill create`` is still writing (seen once in CI:
        the backfill then waited an hour for a scheduler that was gone). Each restart is written
        to the log and kept in ``scheduler_restarts``, so a test can say it happened."""
        missing_since: float | None = None
        while not self._stopping.wait(2.0):
            if self.proc is None or self.proc.poll() is not None:
                return
            if self._scheduler_alive():
                missing_since = None
                continue
            missing_since = missing_since or time.monotonic()
            if time.monotonic() - missing_since < 6 or self._stopping.is_set():
                continue  # a moment between checks, or standalone shutting down
            with open(self.log_path, "ab") as log:
                log.write(f"watchdog   | the scheduler is gone; starting `airflow scheduler` again "
                          f"(restart {len(self.scheduler_restarts) + 1})\n".encode())
                self.scheduler_restarts.append(subprocess.Popen(
                    [AIRFLOW_BIN, "scheduler"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(self.home)))
            missing_since = None

    def _wait_for_dag(self, deadline: float) -> None:
        """The dag-processor must have parsed the DAG before it can be unpaused or run."""
        while True:
            r = self.api("GET", f"/api/v2/dags/{DAG_ID}", ok=(200, 404))
            if r.status_code == 200:
                break
            if time.monotonic() > deadline:
                errors = self.api("GET", "/api/v2/importErrors", ok=(200,)).json()
                raise LiveAirflowError(f"DAG {DAG_ID} never appeared; import errors: {errors}\n{self.log_tail()}")
            time.sleep(1)
        self.api("PATCH", f"/api/v2/dags/{DAG_ID}", json={"is_paused": False})

    def stop(self) -> None:
        """Ends every process this instance started: its process group, then any straggler
        (a local Ray a SIGKILLed task left behind) found by the marker in its environment."""
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=10)
        for proc in self.scheduler_restarts:  # each in a session of its own: its whole group
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kill_until_gone(self.marked_processes)

    def marked_processes(self) -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["pid"]):
            try:
                if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE \
                        and p.environ().get(MARKER_VAR) == self.marker:
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def log_tail(self, chars: int = 6000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no standalone log)"
        return f"--- tail of {self.log_path} ---\n{text[-chars:]}"

    # -- REST ------------------------------------------------------------------------------
    def _password_file(self) -> Path:
        return self.home / "simple_auth_manager_passwords.json.generated"

    def token(self) -> str:
        if self._token is None:
            password = json.loads(self._password_file().read_text())["admin"]
            r = self.session.post(f"{self.base}/auth/token", json={"username": "admin", "password": password},
                                  timeout=30)
            if r.status_code not in (200, 201):
                raise LiveAirflowError(f"POST /auth/token: {r.status_code} {r.text}\n{self.log_tail()}")
            self._token = r.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, *, ok: tuple[int, ...] = (200, 201), **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token()}"}
        r = self.session.request(method, f"{self.base}{path}", headers=headers, timeout=60, **kwargs)
        if r.status_code not in ok:
            raise LiveAirflowError(f"{method} {path} -> {r.status_code}: {r.text[:2000]}")
        return r

    def trigger(self, conf: dict[str, Any], *, run_id: str, logical_date: str | None = None) -> str:
        body = {"dag_run_id": run_id, "conf": conf, "logical_date": logical_date}
        return self.api("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", json=body).json()["dag_run_id"]

    def run_state(self, run_id: str) -> str:
        return self.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}").json()["state"]

    def wait_run(self, run_id: str, *, timeout: float = 600, states: tuple[str, ...] = FINISHED) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = self.run_state(run_id)
            except requests.RequestException:  # a REST call timed out (SQLite busy on a loaded machine)
                state = None
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise LiveAirflowError(
                    f"run {run_id} still {state!r} after {timeout:.0f} s; task states: "
                    f"{self.task_states(run_id)}\n{self.log_tail()}"
                )
            time.sleep(2)

    def dag_runs(self) -> list[dict[str, Any]]:
        return self.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns", params={"limit": 100}).json()["dag_runs"]

    def task_instances(self, run_id: str) -> list[dict[str, Any]]:
        return self.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances",
                        params={"limit": 200}).json()["task_instances"]

    def task_states(self, run_id: str) -> dict[tuple[str, int], tuple[str | None, int]]:
        return {(t["task_id"], t["map_index"]): (t["state"], t["try_number"]) for t in self.task_instances(run_id)}

    def xcom(self, run_id: str, task_id: str, map_index: int = -1, key: str = "return_value") -> Any:
        r = self.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
                     params={"map_index": map_index, "deserialize": True}, ok=(200, 404))
        if r.status_code == 404:
            return None
        value = r.json()["value"]
        return json.loads(value) if isinstance(value, str) and value[:1] in "[{" else value

    def clear(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        r = self.api("POST", f"/api/v2/dags/{DAG_ID}/clearTaskInstances", json=body)
        return r.json()["task_instances"]

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        for attempt in range(3):
            proc = subprocess.run([AIRFLOW_BIN, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
            # SQLite rolls a failed write back: a command that lost the lock can simply run again.
            if proc.returncode == 0 or "database is locked" not in proc.stderr:
                break
            time.sleep(2 * (attempt + 1))
        if proc.returncode != 0:
            raise LiveAirflowError(f"airflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc
