"""Connect to Ray: an embedded local Ray by default, a cluster when an address is given.

Starting a local Ray costs seconds, so an embedded Ray is started once per process and reused
by every stage that runs in it (``airflow dags test`` runs all tasks in one process).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def connect(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Make sure this process is attached to Ray.

    ``address=None`` starts an embedded local Ray (or reuses the one this process already has);
    ``"auto"``, ``"ray://host:10001"`` or ``"host:6379"`` attach to that cluster.
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
    if address:
        log.info("connecting to Ray at %s", _redact(address))
        ray.init(address=address, **kwargs)
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


def _redact(address: str) -> str:
    """Never log credentials that may sit in an address URI."""
    if "@" in address and "://" in address:
        scheme, rest = address.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return address


def gpu_count() -> int:
    """GPUs Ray can schedule onto (0 on a CPU-only machine)."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0))
