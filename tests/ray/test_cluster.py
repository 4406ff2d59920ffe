"""The shared embedded Ray: task processes on one machine attach to one local head."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from winnow.ray import cluster

pytestmark = pytest.mark.timeout(300)

ATTACH = """
import ray
from winnow.ray.cluster import connect
connect(None)
print(ray.get_runtime_context().gcs_address)
"""


def test_shared_mode_task_processes_attach_to_one_head_and_stop_ends_it(tmp_path, monkeypatch):
    state = tmp_path / "r"
    monkeypatch.setenv(cluster.STATE_DIR_ENV, str(state))
    env = dict(os.environ, **{cluster.EMBEDDED_ENV: "shared", cluster.STATE_DIR_ENV: str(state)})
    try:
        first = subprocess.run([sys.executable, "-c", ATTACH], env=env, capture_output=True, text=True, timeout=240)
        assert first.returncode == 0, first.stderr[-3000:]
        head = cluster.head_status()
        assert head is not None
        second = subprocess.run([sys.executable, "-c", ATTACH], env=env, capture_output=True, text=True, timeout=240)
        assert second.returncode == 0, second.stderr[-3000:]
        # Both "tasks" saw the same cluster (GCS port; Ray may report the node's own IP), and
        # the head outlived them.
        port = lambda out: out.split()[-1].rsplit(":", 1)[1]  # noqa: E731
        assert port(first.stdout) == port(second.stdout) == str(head["port"])
        assert cluster.head_status() == head
    finally:
        stopped = cluster.stop_local_head()
    assert stopped
    assert cluster.head_status() is None


def test_unknown_embedded_mode_is_a_clear_error(monkeypatch):
    import ray

    if ray.is_initialized():
        pytest.skip("this process is already attached to Ray")
    monkeypatch.setenv(cluster.EMBEDDED_ENV, "bogus")
    with pytest.raises(ValueError, match="WINNOW_RAY_EMBEDDED must be 'process' or 'shared'"):
        cluster.connect(None)


def test_addresses_with_credentials_are_redacted():
    assert cluster.redact("ray://user:secret@head:10001") == "ray://***@head:10001"
    assert cluster.redact("head:6379") == "head:6379"


def test_ray_client_addresses_are_refused_because_ray_data_does_not_run_over_them():
    import ray

    if ray.is_initialized():
        pytest.skip("this process is already attached to Ray")
    with pytest.raises(ValueError, match="streaming executor does not run over it") as err:
        cluster.connect("ray://user:secret@head:10001")
    assert "secret" not in str(err.value)
