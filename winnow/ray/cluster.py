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
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_ENV = "WINNOW_RAY_EMBEDDED"
STATE_DIR_ENV = "WINNOW_RAY_DIR"
HEAD_START_TIMEOUT_S = 120


def connect(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Make sure this process is attached to Ray.

    ``address=None`` uses an embedded local Ray (see the module docstring); ``"auto"``,
    ``"ray://host:10001"`` or ``"host:6379"`` attach to that cluster.
    """
    import ray

    if ray.is_initialized():
        return
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
        # Ray read its auth mode and token at import: make it look again (private API,
        # pinned by tests/ray/test_cluster.py).
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
        log.info("attaching to the shared local Ray at %s", head)
        kwargs.pop("include_dashboard")
        ray.init(address=head, **kwargs)
    else:
        cpus = num_cpus or os.cpu_count() or 1
        log.info("starting an embedded local Ray with %d CPUs", cpus)
        ray.init(num_cpus=cpus, **kwargs)
    _quiet_ray_data()


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


def gpu_count() -> int:
    """GPUs Ray can schedule onto (0 on a CPU-only machine)."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


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


def ensure_local_head(*, num_cpus: int | None = None) -> str:
    """Start the shared local Ray head unless one is running; return its address."""
    folder = state_dir()
    with _locked(folder):
        head = head_status()
        if head:
            return head["address"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray_bin = str(Path(sys.executable).with_name("ray"))
        cmd = [
            ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus or os.cpu_count() or 1}", "--include-dashboard=false",
            "--disable-usage-stats", f"--temp-dir={_ray_temp_dir(folder)}",
        ]
        env = {**os.environ, **_auth_env(folder)}
        with open(folder / "head.log", "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while not _port_open(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (folder / "head.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the shared local Ray head did not start (see {folder / 'head.log'}):\n{tail}")
            time.sleep(0.5)
        head = {"address": f"127.0.0.1:{port}", "pid": proc.pid, "port": port}
        (folder / "head.json").write_text(json.dumps(head))
        log.info("started the shared local Ray head at %s (pid %d)", head["address"], proc.pid)
        return head["address"]


def stop_local_head(timeout_s: float = 30) -> bool:
    """Stop the shared local head started by :func:`ensure_local_head`; True if one ran."""
    folder = state_dir()
    with _locked(folder):
        path = folder / "head.json"
        try:
            head = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return False
        pid = int(head["pid"])
        stopped = False
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)  # `ray start --block` takes its daemons down too
            deadline = time.monotonic() + timeout_s
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            stopped = True
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
