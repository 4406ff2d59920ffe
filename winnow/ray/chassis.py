"""What the two runners share (:mod:`winnow.ray.runner` over a partition's row groups,
:mod:`winnow.ray.units` over other units): where the work runs, a worker's setup, and the
driver's side of each finished unit (the progress line, test faults).

Where the work runs is the run's :class:`~winnow.execution.Execution`: a loop in this process
(``backend="local"``), or this process attached to its Ray. Where the work stores travels inside
the work itself (its :class:`~winnow.rowgroups.fs.RunRoot` is a task argument, never in the
runtime env: secrets stay out of Ray's job metadata), so a worker installs nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sized
from typing import TypeVar

from winnow.execution import Execution
from winnow.faults import FaultSpec
from winnow.ray.resources import match_torch_threads

logger = logging.getLogger(__name__)

R = TypeVar("R")
#: Seconds between two progress lines of one call (the last line is always written).
PROGRESS_EVERY_S = 2.0


def dispatch(execution: Execution, todo: Sized, *, local: Callable[[], Iterable[R]],
             remote: Callable[[], Iterable[R]]) -> Iterable[R]:
    """The results of ``todo`` as its units finish: ``local()`` runs them in this process (the
    local backend); else this process attaches to the execution's Ray and ``remote()`` runs them
    there. Nothing to do attaches to nothing."""
    if not len(todo):
        return ()
    if execution.backend == "local":
        return local()
    from winnow.ray.cluster import connect

    connect(execution.ray_address)
    return remote()


def set_up_worker() -> None:
    """In a worker, before its units: torch threads = the CPUs Ray gave the task or actor."""
    match_torch_threads()


class Driver:
    """The driver's side of one runner call: each finished unit, as it comes back, is counted
    into a progress line (at most every :data:`PROGRESS_EVERY_S`, and the last one) and may fire
    a test fault that acts right after a commit (``WINNOW_TEST_FAULTS``, test-only).

    :param label: what the line is about (``"embed partition 3"``, ``"pairwise"``).
    :param noun: the units counted (``"row groups"``, ``"units"``).
    :param total: units of the call, ``skipped`` of them found committed before it started.
    :param rate: add the records/s of the computed units to the line.
    """

    def __init__(self, stage: str, label: str, noun: str, *, total: int, skipped: int,
                 log: Callable[[str], None], rate: bool = False) -> None:
        self.stage, self.label, self.noun, self.log, self.rate = stage, label, noun, log, rate
        self.total, self.skipped = total, skipped
        self.done = self.failed = self.records = 0
        self.faults = FaultSpec.from_env()
        self.t0 = time.perf_counter()
        self.last = 0.0

    def finished(self, unit: int, *, error: str = "", committed_before: bool = False, records: int = 0) -> None:
        """Count one unit: failed (``error``), or done (``committed_before``: by an earlier try
        of the same Ray task, which then died before replying)."""
        if error:
            self.failed += 1
        else:
            self.done += 1
            self.records += records
        now = time.perf_counter()
        finished = self.done + self.failed + self.skipped
        if now - self.last >= PROGRESS_EVERY_S or finished == self.total:
            self.last = now
            line = (f"{self.label}: {finished}/{self.total} {self.noun} "
                    f"({self.done} computed, {self.skipped} skipped, {self.failed} failed)")
            if self.rate:
                line += f", {self.records / max(now - self.t0, 1e-9):.1f} records/s"
            self.log(line)
        if not error and not committed_before and self.faults is not None:
            self.faults.fire_driver(self.stage, unit)
