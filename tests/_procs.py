"""Ending the processes a test started, by pid (never by name: other people's processes may run here)."""

from __future__ import annotations

from collections.abc import Callable

import psutil


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
