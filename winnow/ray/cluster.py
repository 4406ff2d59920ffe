"""Connect to Ray: an embedded local Ray by default, a cluster when an address is given.

Embedded Ray comes in two kinds (``WINNOW_RAY_EMBEDDED``):

- ``process`` (default): ``ray.init()`` in this process, reused by every stage that runs in it
  (``airflow dags test`` runs all tasks in one process) and gone when the process ends.
- ``shared``: one local Ray head for every task process on this machine (Airflow's
  LocalExecutor runs each task in its own process; starting a Ray per task costs ~10 s and a
  fresh set of workers). The first task starts it (``ray start --head --block`` in its own
  session, under a file lock), later ones attach. ``python -m winnow.ray.cluster stop`` ends it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from winnow.exceptions import RayAuthError
from winnow.execution import EMBEDDED_ENV

log = logging.getLogger(__name__)

STATE_DIR_ENV = "WINNOW_RAY_DIR"
HEAD_START_TIMEOUT_S = 120


def connect(address: str | None = None, *, num_cpus: int | None = None, token: str | None = None) -> None:
    """Make sure this process is attached to Ray.

    ``address=None`` uses an embedded local Ray (see the module docstring); ``"auto"`` or
    ``"host:6379"`` (a GCS address) attach to that cluster, presenting ``token`` when given
    (Ray's token auth). A refused token fails at once with :class:`RayAuthError` instead of
    Ray's ~20 s of retries ending in a bare "Failed to connect".
    """
    import ray

    if ray.is_initialized():
        return
    if address and address.startswith("ray://"):
        raise ValueError(
            f"Ray address {redact(address)!r} is Ray Client: Ray Data's streaming executor does not run "
            "over it; give the cluster's GCS address (host:6379 or 'auto'), or submit a Ray Job instead"
        )
    if token:
        os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        _reload_auth()
    if address and address != "auto":
        check_auth(address)
    kwargs: dict = {
        "include_dashboard": False,
        "log_to_driver": True,
        "configure_logging": False,
        "ignore_reinit_error": True,
    }
    mode = os.environ.get(EMBEDDED_ENV, "process")
    if mode not in ("process", "shared"):
        raise ValueError(f"{EMBEDDED_ENV} must be 'process' or 'shared', got {mode!r}")
    if address:
        log.info("connecting to Ray at %s", redact(address))
        kwargs.pop("include_dashboard")
        ray.init(address=address, **kwargs)
    elif mode == "shared":
        head = ensure_local_head(num_cpus=num_cpus)
        os.environ.update(_auth_env(state_dir()))
        _reload_auth()
        log.info("attaching to the shared local Ray at %s", head)
        kwargs.pop("include_dashboard")
        ray.init(address=head, **kwargs)
    else:
        cpus = num_cpus or os.cpu_count() or 1
        log.info("starting an embedded local Ray with %d CPUs", cpus)
        if not os.environ.get("RAY_AUTH_MODE"):
            # Ray turns token auth on for a new local Ray and, with no token configured, writes
            # ~/.ray/auth_token, which then turns auth on for the user's own later `ray start`.
            # Ours is a token of winnow's own, in its state dir.
            os.environ.update(_auth_env(state_dir()))
            _reload_auth()
        # "local": always a Ray of this process's own. Without it ray.init() attaches to the
        # latest cluster `ray start` left on this machine (a user's own head) and then refuses
        # num_cpus ("When connecting to an existing cluster, num_cpus ... must not be provided").
        ray.init(address="local", num_cpus=cpus, **kwargs)
    _quiet_ray_data()


def _reload_auth() -> None:
    """Ray read its auth mode and token at import: make it look again (private API, pinned by
    tests/ray/test_cluster.py)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def check_auth(address: str) -> None:
    """One GCS call with this process's token: a refused token is an error now, not a timeout."""
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    try:
        GcsClient(address=address)
    except AuthenticationError as exc:
        raise RayAuthError(
            f"the Ray cluster at {redact(address)} refused this process's auth token "
            f"({'none was given' if not os.environ.get('RAY_AUTH_TOKEN') else 'wrong token'}): give the "
            "cluster's token (`ray get-auth-token` on its head)"
        ) from exc


def _quiet_ray_data() -> None:
    """Progress goes to the task log as our own lines; Ray's bars would flood it."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False


def redact(address: str) -> str:
    """Never log credentials that may sit in an address URI."""
    if "@" in address and "://" in address:
        scheme, rest = address.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return address


# ---- the shared local head ---------------------------------------------------------------

def state_dir() -> Path:
    # Short on purpose: Ray puts unix sockets under its temp dir (107-byte path limit).
    return Path(os.environ.get(STATE_DIR_ENV, f"/tmp/winnow-ray-{os.getuid()}"))


def _ray_temp_dir(folder: Path) -> str:
    """Ray's temp dir: under the state dir when that path is short enough for unix sockets."""
    inside = str(folder / "t")
    if len(inside) <= 40:
        return inside
    import hashlib

    return f"/tmp/wr-{hashlib.sha256(inside.encode()).hexdigest()[:8]}"


@contextlib.contextmanager
def _locked(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _auth_env(folder: Path) -> dict[str, str]:
    """Ray's token auth for the shared head: a token only this user can read."""
    token = folder / "auth_token"
    folder.mkdir(parents=True, exist_ok=True)
    if not token.exists():
        import secrets

        fd = os.open(token, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def head_status() -> dict | None:
    """The running shared head's ``{"address", "pid", "port"}``, or None."""
    path = state_dir() / "head.json"
    try:
        head = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if _alive(int(head["pid"])) and _port_open(int(head["port"])):
        return head
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LocalHead:
    """A ``ray start --head --block`` this process started, in its own session (end it by pid)."""

    pid: int
    address: str
    port: int
    dashboard_url: str | None = None


#: Ray ends an idle worker after 1 s once a node has more workers than CPUs, which happens as
#: soon as two Airflow tasks (two drivers) share a small head: the next row group's task then
#: starts a new process and imports torch again. Heads winnow starts keep idle workers 30 s.
IDLE_WORKER_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "30000"}


def start_head(
    temp_dir: str, log_path: Path, *, num_cpus: int | None = None, env: dict[str, str] | None = None,
    dashboard: bool = False, extra_args: tuple[str, ...] = (), timeout_s: float = HEAD_START_TIMEOUT_S,
    base_env: dict[str, str] | None = None,
) -> LocalHead:
    """Start a local Ray head on free loopback ports and wait until it answers.

    ``dashboard=True`` also serves the dashboard and its job server (the Ray Jobs API, what job
    mode submits to) on a free port. Token auth is on when ``env`` says so (``RAY_AUTH_MODE=token``
    with ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``). Stop it with :func:`stop_head`, never
    ``ray stop`` (that ends every Ray on the machine). ``base_env`` replaces this process's
    environment as the one ``env`` is added to (tests build the whole env); ``num_cpus=0`` is a
    head no work lands on.
    """
    port = free_port()
    dash_port = free_port() if dashboard else None
    cmd = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
        "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus if num_cpus is not None else (os.cpu_count() or 1)}",
        "--disable-usage-stats", f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
    ]
    if dashboard:
        cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}"]
    else:
        cmd += ["--include-dashboard=false"]
    cmd += list(extra_args)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # With ray[default] the raylet waits for its dashboard agent and aborts after Ray's default
    # timeout; on a loaded machine the agent takes longer than that to come up.
    full_env = {"RAY_raylet_start_wait_time_s": "300", "RAY_agent_register_timeout_ms": "300000",
                **IDLE_WORKER_ENV, **(os.environ if base_env is None else base_env), **(env or {})}
    offset = log_path.stat().st_size if log_path.exists() else 0  # the log is appended to
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=full_env)
    head = LocalHead(pid=proc.pid, address=f"127.0.0.1:{port}", port=port,
                     dashboard_url=f"http://127.0.0.1:{dash_port}" if dash_port else None)
    deadline = time.monotonic() + timeout_s
    # `ray start` prints this once the node registered (the ports may answer earlier, and the
    # start can still fail after that).
    while not (_started(log_path, offset, proc) and _port_open(port) and (dash_port is None or _dashboard_up(dash_port))):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_head(head)
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the local Ray head did not start (see {log_path}):\n{tail}")
        time.sleep(0.5)
    return head


def _started(log_path: Path, offset: int, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        return False
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            return b"Ray runtime started" in f.read()
    except OSError:
        return False


def _dashboard_up(port: int) -> bool:
    """The job server answers once the dashboard's modules are loaded (401 with auth on)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs/", timeout=2):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code in (401, 403)
    except OSError:
        return False


def stop_head(head: LocalHead | int, timeout_s: float = 30) -> bool:
    """End a head started by :func:`start_head` (its whole session); True if it was running."""
    pid = head if isinstance(head, int) else head.pid
    if not _alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)  # `ray start --block` takes its daemons down too
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    return True


def ensure_local_head(*, num_cpus: int | None = None) -> str:
    """Start the shared local Ray head unless one is running; return its address."""
    folder = state_dir()
    with _locked(folder):
        head = head_status()
        if head:
            return head["address"]
        started = start_head(_ray_temp_dir(folder), folder / "head.log", num_cpus=num_cpus, env=_auth_env(folder))
        info = {"address": started.address, "pid": started.pid, "port": started.port}
        (folder / "head.json").write_text(json.dumps(info))
        log.info("started the shared local Ray head at %s (pid %d)", started.address, started.pid)
        return started.address


def stop_local_head(timeout_s: float = 30) -> bool:
    """Stop the shared local head started by :func:`ensure_local_head`; True if one ran."""
    folder = state_dir()
    with _locked(folder):
        path = folder / "head.json"
        try:
            head = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return False
        stopped = stop_head(int(head["pid"]), timeout_s)
        path.unlink(missing_ok=True)
        return stopped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m winnow.ray.cluster", description="The shared local Ray head.")
    ap.add_argument("command", choices=("start", "stop", "status"))
    args = ap.parse_args(argv)
    if args.command == "start":
        print(ensure_local_head())
    elif args.command == "stop":
        print("stopped" if stop_local_head() else "no shared local Ray was running")
    else:
        head = head_status()
        print(json.dumps(head) if head else "no shared local Ray is running")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
