"""What a test runs beside itself: a call in a background thread it acts on while it runs, and the
processes it started, ended by pid (never by name: other people's processes may run here)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil


class Background:
    """``fn()`` in a daemon thread, so the test can act while it runs (kill a worker held at a
    barrier, then release it); afterwards ``result``, or ``error`` (what it raised)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            self.error = exc

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the background call still runs after {timeout:g} s"

    def wait_for(self, what: str, found: Callable[[], Any], *, timeout_s: float = 600) -> Any:
        """``found()``'s first truthy value, polled while the call runs; fails when the call ended
        without it (or, against a hang, after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while not (value := found()):
            assert self.is_alive(), f"the call ended before {what} (error: {self.error!r})"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s:g} s"
            time.sleep(0.05)
        return value


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs: not gone, not a zombie waiting for its parent (e.g. a Ray worker
    SIGKILLed a moment ago, before its raylet reaped it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, *, timeout_s: float = 30) -> None:
    """Return once ``pid`` is gone (e.g. SIGKILLed a moment ago: only its teardown is left)."""
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs {timeout_s:g} s after it was killed"
        time.sleep(0.05)


def kill_until_gone(find: Callable[[], list[psutil.Process]], rounds: int = 3) -> None:
    """SIGKILL what ``find`` returns and wait for it, until it returns nothing (at most ``rounds``
    times: a process may start a child while it is being ended)."""
    for _ in range(rounds):
        left = find()
        if not left:
            return
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)
