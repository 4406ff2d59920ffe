"""Test-only fault injection, so fault tests can break chosen row groups from outside.

Set ``WINNOW_TEST_FAULTS`` to JSON like ``{"stage": "embed", "row_groups": [3, 7],
"once_dir": "/tmp/x"}``: those row groups raise :class:`InjectedFault` on their first try only
(a marker file in ``once_dir`` remembers the try; ``"times": n`` fires on the first n tries,
so a run can exhaust its retries). ``"mode": "kill"`` SIGKILLs the worker
process instead, after the row group's output is computed and before it is committed;
``"mode": "kill_task"`` SIGKILLs the driver (the Airflow task process) right after that row
group committed, i.e. mid-partition. ``"release": "/path/file"`` is a barrier: the row group
waits just before its commit (in the process that commits it) until that file exists, then
goes on to its fault; ``"mode": "hold"`` is the barrier alone (no fault), so a test can keep a
job or task running until it has done what it must do while it runs (``"hold_timeout_s"``,
default 1800: a barrier never released fails the row group instead of hanging it);
``"held": "/path/file"`` gets a JSON line ``{"pid", "stage", "row_group"}`` appended as a row group
starts waiting there, so the test knows which process holds what. A value
``@/path/spec.json`` reads the spec from that file
each time a partition starts (a missing file: no faults), so tests against long-running Airflow
services can change it between DAG runs. Never set it in production: it exists for the fault tests
and the sparse-retry demo.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass

ENV_VAR = "WINNOW_TEST_FAULTS"


class InjectedFault(RuntimeError):
    """Raised by a row group chosen through WINNOW_TEST_FAULTS (test-only)."""


@dataclass(frozen=True)
class FaultSpec:
    stage: str
    row_groups: frozenset[int]
    once_dir: str | None = None
    mode: str = "raise"
    times: int = 1
    release: str | None = None
    hold_timeout_s: float = 1800.0
    held: str | None = None

    @classmethod
    def from_env(cls) -> FaultSpec | None:
        raw = os.environ.get(ENV_VAR)
        if raw and raw.startswith("@"):
            try:
                with open(raw[1:]) as f:
                    raw = f.read()
            except FileNotFoundError:
                return None
        if not raw or not raw.strip():
            return None
        spec = json.loads(raw)
        return cls(
            stage=spec["stage"],
            row_groups=frozenset(int(r) for r in spec.get("row_groups", [])),
            once_dir=spec.get("once_dir"),
            mode=spec.get("mode", "raise"),
            times=int(spec.get("times", 1)),
            release=spec.get("release"),
            hold_timeout_s=float(spec.get("hold_timeout_s", 1800.0)),
            held=spec.get("held"),
        )

    def fire(self, stage: str, row_group: int) -> None:
        """Called by the runner just before a row group's output is committed."""
        if self.mode == "kill_task" or stage != self.stage or row_group not in self.row_groups:
            return
        if self.release is not None:
            self._hold(stage, row_group)
        if self.mode == "hold":
            return
        self._fire(stage, row_group)

    def _hold(self, stage: str, row_group: int) -> None:
        """Wait until the ``release`` file exists (the test's barrier)."""
        if os.path.exists(self.release):
            return
        print(f"test fault hold: stage {stage!r} row group {row_group} waits for {self.release}",
              file=sys.stderr, flush=True)
        if self.held is not None:
            with open(self.held, "a") as f:  # one short append: a reader sees whole lines
                f.write(json.dumps({"pid": os.getpid(), "stage": stage, "row_group": row_group}) + "\n")
        deadline = time.monotonic() + self.hold_timeout_s
        while not os.path.exists(self.release):
            if time.monotonic() > deadline:
                raise InjectedFault(f"test fault hold in stage {stage!r}, row group {row_group}: "
                                    f"{self.release} not created within {self.hold_timeout_s:g} s")
            time.sleep(0.2)

    def fire_driver(self, stage: str, row_group: int) -> None:
        """Called by the runner's driver after a row group committed (mode ``kill_task``)."""
        if self.mode != "kill_task" or stage != self.stage or row_group not in self.row_groups:
            return
        self._fire(stage, row_group)

    def _fire(self, stage: str, row_group: int) -> None:
        if self.once_dir is not None:
            os.makedirs(self.once_dir, exist_ok=True)
            base = os.path.join(self.once_dir, f"{stage}-rg{row_group}")
            for k in range(self.times):
                try:
                    fd = os.open(base if k == 0 else f"{base}.{k}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    continue  # this try already fired
                os.close(fd)
                break
            else:
                return  # already fired `times` times
        if self.mode in ("kill", "kill_task"):
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFault(f"injected test fault in stage {stage!r}, row group {row_group}")
