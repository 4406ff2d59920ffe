"""Where a run executes, as one value: :class:`Execution` (backend, Ray address, compute, worker
sizes), built and checked once per call (``run_all``, an operator's try, the Ray Job entry) and
passed down to every step, runner and unit; it travels to a Ray Job as its ``--execution`` flag.

>>> Execution(backend="local")
Execution(backend='local', ray_address=None, compute=None, worker_cpus=None, worker_gpus=None)
>>> Execution(ray_address="10.0.0.5:6379").compute
'actors'
>>> Execution.from_dict(Execution(worker_cpus=2, compute="tasks").to_dict()) == Execution(worker_cpus=2, compute="tasks")
True
>>> Execution(worker_gpus=-1)
Traceback (most recent call last):
...
winnow.exceptions.ConfigError: worker_gpus must be a number >= 0, got -1
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Literal

from winnow.checks import check, choice_problem, number_problem

#: Where the engine runs a stage's row groups and units: Ray (Ray Data, Ray tasks) or a loop in
#: this process, without Ray (tests, laptops).
Backend = Literal["ray", "local"]
BACKENDS: tuple[str, ...] = ("ray", "local")
#: How a model stage's workers run on Ray Data, as in Ray Data's ``map_batches(compute=...)``.
Compute = Literal["tasks", "actors"]
COMPUTE_CHOICES: tuple[str, ...] = ("tasks", "actors")
#: ``process`` (default): an embedded Ray of this process's own; ``shared``: one local Ray head
#: every task process on this machine attaches to (see :mod:`winnow.ray.cluster`).
EMBEDDED_ENV = "WINNOW_RAY_EMBEDDED"


def default_compute(ray_address: str | None) -> Compute:
    """``"tasks"`` when this process runs its own embedded Ray (no address, and
    ``WINNOW_RAY_EMBEDDED`` is not ``shared``): no other driver competes for its workers, so a
    task's worker process stays and keeps the loaded model for the whole run. ``"actors"``
    otherwise (a cluster, the shared local head): every Airflow task is a driver of its own, a
    plain task's worker may be ended between row groups, so each partition holds its model in an
    actor instead."""
    embedded = ray_address is None and os.environ.get(EMBEDDED_ENV, "process") != "shared"
    return "tasks" if embedded else "actors"


def check_knobs(worker_cpus: float | None = None, worker_gpus: float | None = None,
                compute: str | None = None) -> None:
    """The worker knobs' own sanity, before any cluster is looked at (whether a node holds
    them is :mod:`winnow.ray.resources`' check); None is "not given"."""
    check(
        None if worker_cpus is None else number_problem("worker_cpus", worker_cpus, low=0, low_open=True),
        None if worker_gpus is None else number_problem("worker_gpus", worker_gpus, low=0),
        None if compute is None else choice_problem("compute", compute, COMPUTE_CHOICES),
    )


@dataclass(frozen=True, kw_only=True)
class Execution:
    """Where a run executes; checked when built.

    :param backend: ``"ray"`` (Ray Data and Ray tasks) or ``"local"`` (the same loops in this
        process, without Ray).
    :param ray_address: the cluster's GCS address (``"host:6379"``, ``"auto"``); None: an
        embedded local Ray (see :mod:`winnow.ray.cluster`).
    :param compute: how model workers run on Ray (``"tasks"`` or ``"actors"``); None takes
        :func:`default_compute` of ``ray_address`` when the value is built. Left None with the
        local backend (no Ray).
    :param worker_cpus: CPUs of one model worker (None: the policy of :mod:`winnow.ray.resources`).
    :param worker_gpus: GPUs of one model worker (None: 1 where a node has GPUs).
    """

    backend: Backend = "ray"
    ray_address: str | None = None
    compute: Compute | None = None
    worker_cpus: float | None = None
    worker_gpus: float | None = None

    def __post_init__(self) -> None:
        check(choice_problem("backend", self.backend, BACKENDS,
                             hint="ray: Ray Data and Ray tasks; local: the same loops in this process"))
        check_knobs(self.worker_cpus, self.worker_gpus, self.compute)
        if self.compute is None and self.backend == "ray":
            object.__setattr__(self, "compute", default_compute(self.ray_address))

    @property
    def sized(self) -> bool:
        """An explicit model-worker size was given (checked against the alive nodes up front)."""
        return self.worker_cpus is not None or self.worker_gpus is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Execution:
        return cls(**d)


#: This process, without Ray.
LOCAL = Execution(backend="local")
