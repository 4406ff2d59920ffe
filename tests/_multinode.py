"""A real multi-node Ray on loopback for tests: a head (``--num-cpus=0`` by default, the usual
production shape: no work lands on it) plus worker nodes, each its own ``ray start --address``
raylet in its own session, started and ended by pid (never ``ray stop``: it ends every Ray on
the machine, other people's too).

Every process it starts gets an environment built here: the caller's ``RAY_*`` variables
(``RAY_ADDRESS``, auth settings...) and winnow's test hooks are dropped, then only what the
cluster needs is set. Token auth is always on, with a fresh token (``cluster.token``): a head
started while ``~/.ray/auth_token`` exists requires a token anyway (Ray 2.60), and the tests
must not depend on what that file holds. Optionally the head serves the dashboard and its Jobs
API (for job-mode tests).

One cluster per test module or package::

    from tests._multinode import multinode_fixture
    cluster = multinode_fixture(workers=(2, 2))                  # module scope
    cluster = multinode_fixture(workers=(2,), dashboard=True, scope="package")

or, for the suite's multi-node modules, the one cluster of the whole session (``SHARED_WORKERS``,
dashboard and Jobs API on; started on first use by ``tests/conftest.py``, stopped at the end)::

    from tests._multinode import shared_multinode_fixture
    cluster = shared_multinode_fixture()   # module scope: its shape restored, its driver detached after

A test then attaches with ``cluster.connect()`` (or hands ``cluster.address`` /
``cluster.dashboard_url`` and ``cluster.token`` to the code under test), adds nodes with
``cluster.add_node(num_cpus=...)``, and loses one with ``cluster.kill_node(node)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from winnow.ray import cluster as ray_cluster

REPO = Path(__file__).resolve().parents[1]
#: A node's own custom resource, so a test can tell which Ray node id is which of its nodes.
NODE_TAG = "winnow_test_node_"
#: A killed node is declared dead by the GCS after period x threshold of failed health checks
#: (Ray's defaults: 3 s x 5); the cluster's tests want seconds, not a quarter of a minute.
FAST_HEALTH_CHECKS = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
#: Env prefixes of the caller's shell that never reach the cluster's processes (``AWS_``: a
#: cluster has no object-store credentials of its own; the S3 job-mode tests rely on that).
DROPPED_PREFIXES = ("RAY_", "WINNOW_TEST_", "WINNOW_RAY_", "AWS_")
NODE_START_TIMEOUT_S = 300  # seen > 120 s for a head at load 15-20 on 2 cores
#: The session's shared cluster (``shared_multinode_fixture``): a 0-CPU head and two worker
#: nodes of 2 CPUs, so the cluster's sum (4) is more than any node holds.
SHARED_WORKERS = (2, 2)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any ``RAY_*`` / winnow test / ``AWS_*`` variable, plus what the
    cluster's processes need: this venv's ``ray`` and ``python`` first on PATH, this checkout
    importable, no usage stats, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROPPED_PREFIXES)}
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(extra or {})
    return env


@dataclass
class WorkerNode:
    """One ``ray start --address ... --block`` of this cluster (its own session)."""

    name: str
    pid: int
    num_cpus: int
    num_gpus: int
    log: Path
    killed: bool = False

    @property
    def tag(self) -> str:
        return NODE_TAG + self.name


@dataclass
class MultiNodeCluster:
    """Head + worker nodes on 127.0.0.1. ``start()`` the head, ``add_node()`` workers,
    ``stop()`` everything (by pid). Use :func:`multinode_fixture` in tests."""

    root: Path
    head_cpus: int = 0
    dashboard: bool = False
    token: str = field(default_factory=lambda: secrets.token_hex(24))
    env: dict[str, str] = field(default_factory=dict)  # added to every node's environment
    object_store_bytes: int = 100_000_000
    head: ray_cluster.LocalHead | None = None
    nodes: list[WorkerNode] = field(default_factory=list)
    temp_dir: str = ""
    _saved_auth: dict[str, str | None] | None = None

    # ---- life cycle ----------------------------------------------------------------------

    def node_env(self) -> dict[str, str]:
        """The environment every process of this cluster starts with."""
        extra = {**ray_cluster.IDLE_WORKER_ENV, **FAST_HEALTH_CHECKS, **self.auth_env(),
                 "RAY_raylet_start_wait_time_s": "300", "RAY_agent_register_timeout_ms": "300000"}
        return clean_env({**extra, **self.env})

    def auth_env(self) -> dict[str, str]:
        """What a process needs to talk to this cluster (Ray's token auth)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def start(self) -> MultiNodeCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        # Short: Ray puts unix sockets under its temp dir (107-byte path limit).
        self.temp_dir = f"/tmp/wmn-{uuid.uuid4().hex[:6]}"
        self.head = ray_cluster.start_head(
            self.temp_dir, self.root / "head.log", num_cpus=self.head_cpus, base_env=self.node_env(),
            dashboard=self.dashboard, extra_args=("--num-gpus=0", f"--object-store-memory={self.object_store_bytes}"),
            timeout_s=NODE_START_TIMEOUT_S,
        )
        return self

    @property
    def address(self) -> str:
        assert self.head is not None, "start() the cluster first"
        return self.head.address

    @property
    def dashboard_url(self) -> str | None:
        return self.head.dashboard_url if self.head else None

    def add_node(self, *, num_cpus: int = 1, num_gpus: int = 0, name: str | None = None,
                 timeout_s: float = NODE_START_TIMEOUT_S) -> WorkerNode:
        """Start one more worker node (its own raylet) and wait until it runs."""
        name = name or f"w{len(self.nodes)}"
        log = self.root / f"node-{name}.log"
        cmd = [
            str(Path(sys.executable).with_name("ray")), "start", f"--address={self.address}", "--block",
            "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
            f"--resources={json.dumps({NODE_TAG + name: 1})}", f"--temp-dir={self.temp_dir}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--dashboard-agent-listen-port={ray_cluster.free_port()}",
            f"--metrics-export-port={ray_cluster.free_port()}",
            "--min-worker-port=0", "--max-worker-port=0",  # any free port: other Rays run here too
        ]
        offset = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=self.node_env())
        node = WorkerNode(name=name, pid=proc.pid, num_cpus=num_cpus, num_gpus=num_gpus, log=log)
        self.nodes.append(node)
        deadline = time.monotonic() + timeout_s
        while not _log_says(log, offset, b"Ray runtime started"):
            if proc.poll() is not None or time.monotonic() > deadline:
                self._kill_tree(node.pid)
                raise RuntimeError(f"worker node {name} did not start (see {log}):\n"
                                   f"{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        return node

    def kill_node(self, node: WorkerNode) -> None:
        """SIGKILL a worker node: its ``ray start``, raylet, object store and every worker
        process it started (a lost machine: nothing of it shuts down cleanly)."""
        self._kill_tree(node.pid)
        node.killed = True

    def restore(self, workers: tuple[int, ...]) -> list[WorkerNode]:
        """Bring the cluster back to one alive worker node of each CPU count in ``workers``: a
        node a test killed (``kill_node``) is replaced by a fresh one (a new name), and the GCS
        waited for until it lists exactly those nodes. The nodes added (none: nothing to do)."""
        missing = list(workers)
        for node in self.nodes:
            if not node.killed:
                missing.remove(node.num_cpus)  # a node of a shape not asked for: ValueError
        added = [self.add_node(num_cpus=cpus) for cpus in missing]
        if added:
            self.connect()
            try:
                self.wait_alive(len(workers))
            finally:
                self.detach()
        return added

    def detach(self) -> None:
        """End this process's driver of the cluster (if any) and put back its own Ray auth
        settings as they were before ``connect()``; the cluster keeps running."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self._saved_auth is not None:
            for key, value in self._saved_auth.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            self._saved_auth = None
            ray_cluster._reload_auth()

    def stop(self) -> None:
        """End every node this cluster started (workers first), by pid; remove its temp dir."""
        for node in self.nodes:
            if not node.killed:
                ray_cluster.stop_head(node.pid)
                self._kill_tree(node.pid)  # whatever outlived the session's SIGTERM
                node.killed = True
        if self.head is not None:
            ray_cluster.stop_head(self.head)
            self._kill_tree(self.head.pid)
            self.head = None
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.detach()  # this process's own auth settings, as before connect()

    # ---- from a driver attached to it ----------------------------------------------------

    def connect(self, **init_kwargs: Any) -> None:
        """Attach this process (a driver on the head node) to the cluster. Plain: through
        :func:`winnow.ray.cluster.connect` (what the engine does); with ``init_kwargs`` (a
        ``runtime_env``, say): ``ray.init`` with them first, then the engine's connect sees it."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self._saved_auth is None:  # put back by stop()
            self._saved_auth = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        os.environ.update(self.auth_env())
        ray_cluster._reload_auth()
        if init_kwargs:
            ray.init(address=self.address, configure_logging=False, **init_kwargs)
            ray_cluster._quiet_ray_data()  # as the engine's connect does
        ray_cluster.connect(self.address, token=self.token)

    def node_ids(self) -> dict[str, str]:
        """{Ray node id: worker node name} of the alive worker nodes (needs ``connect()``)."""
        import ray

        out = {}
        for info in ray.nodes():
            if info.get("Alive"):
                for key in info.get("Resources") or {}:
                    if key.startswith(NODE_TAG):
                        out[info["NodeID"]] = key[len(NODE_TAG):]
        return out

    def node_named(self, name: str) -> WorkerNode:
        return next(n for n in self.nodes if n.name == name)

    def wait_alive(self, count: int, timeout_s: float = 60) -> None:
        """Until the GCS lists exactly ``count`` alive worker nodes of this cluster."""
        deadline = time.monotonic() + timeout_s
        while len(self.node_ids()) != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"expected {count} alive worker nodes, the GCS lists {self.node_ids()}")
            time.sleep(0.2)

    # ---- processes -----------------------------------------------------------------------

    @staticmethod
    def _kill_tree(pid: int) -> None:
        """SIGKILL ``pid``'s process group and every descendant (workers may sit elsewhere)."""
        victims = [pid, *_descendants(pid)]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        for p in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _log_says(log: Path, offset: int, text: bytes) -> bool:
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            return text in f.read()
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@contextlib.contextmanager
def multinode_cluster(root: Path, *, workers: tuple[int, ...] = (1, 1), head_cpus: int = 0,
                      dashboard: bool = False, token: str | None = None,
                      env: dict[str, str] | None = None) -> Iterator[MultiNodeCluster]:
    """A started cluster with one worker node of each CPU count in ``workers``; stopped after.
    ``token``: the cluster's Ray auth token (default: a fresh one, ``cluster.token``)."""
    c = MultiNodeCluster(root=root, head_cpus=head_cpus, dashboard=dashboard, env=dict(env or {}),
                         **({"token": token} if token else {}))
    try:
        c.start()
        for cpus in workers:
            c.add_node(num_cpus=cpus)
        yield c
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()  # a driver of this cluster must not outlive it
        c.stop()


def multinode_fixture(*, workers: tuple[int, ...] = (1, 1), head_cpus: int = 0, dashboard: bool = False,
                      token: str | None = None, env: dict[str, str] | None = None, scope: str = "module"):
    """A pytest fixture (assign it to a name in a test module or conftest) that yields one
    :class:`MultiNodeCluster` for the whole ``scope``."""

    @pytest.fixture(scope=scope)
    def _cluster(tmp_path_factory) -> Iterator[MultiNodeCluster]:
        root = tmp_path_factory.mktemp("multinode")
        with multinode_cluster(root, workers=workers, head_cpus=head_cpus, dashboard=dashboard,
                               token=token, env=env) as c:
            yield c

    return _cluster


def shared_multinode_fixture():
    """A module-scoped pytest fixture (assign it to a name in a test module) yielding the
    session's one shared cluster (``shared_multinode`` in ``tests/conftest.py``: a 0-CPU head with
    the dashboard's Jobs API and one worker node of each size in ``SHARED_WORKERS``), so the suite
    starts one multi-node cluster, not one per module. Before the module: any worker node an
    earlier module killed is replaced (the modules may run in any order). After it: this
    process's driver ends and its Ray auth settings are put back, as a module's own cluster did."""

    @pytest.fixture(scope="module")
    def _cluster(shared_multinode) -> Iterator[MultiNodeCluster]:
        shared_multinode.restore(SHARED_WORKERS)
        try:
            yield shared_multinode
        finally:
            shared_multinode.detach()

    return _cluster
