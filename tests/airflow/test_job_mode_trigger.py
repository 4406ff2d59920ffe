"""RayJobTrigger's log bookkeeping across a triggerer restart, with its real checkpoint file: every
job log line shown once, a half-shown batch replayed under a marker, and only plain values
(no token) in what Airflow stores of the trigger."""

from __future__ import annotations

import asyncio
import json
import re

from winnow_airflow.triggers import RayJobTrigger


def _lines(capfd) -> list[str]:
    """The trigger's log lines (Airflow's structlog writes them to stdout, one event a line)."""
    out = capfd.readouterr().out
    return [m.group(1) for m in re.finditer(r"\[ray job\] (.*?)\s+\[winnow_airflow\.triggers", out)]


def _shown(lines: list[str]) -> list[str]:
    return [line for line in lines if not line.startswith("replaying")]


def _trigger(tmp_path, **kw) -> RayJobTrigger:
    return RayJobTrigger(conn_id="ray_x", submission_id="winnow-abc-g0",
                         checkpoint_uri=str(tmp_path / "winnow-abc-g0.try1.log.json"), **kw)


def test_a_restarted_trigger_goes_on_after_the_last_line_shown(tmp_path, capfd):
    first = _trigger(tmp_path)
    shown = asyncio.run(first._show("a\nb\nc\npartial", 0, final=False))
    assert shown == 3 and _lines(capfd) == ["a", "b", "c"]  # the unfinished line waits
    # The triggerer dies; a new one rebuilds the trigger from the same stored kwargs (offset 0).
    second = _trigger(tmp_path)
    assert second.serialize()[1]["log_offset"] == 0
    offset = asyncio.run(second._resume_offset())
    assert offset == 3
    asyncio.run(second._show("a\nb\nc\npartial line\nd\n", offset, final=True))
    assert _lines(capfd) == ["partial line", "d"]  # no replay marker, nothing twice


def test_a_batch_the_dead_triggerer_may_have_half_shown_is_replayed_under_a_marker(tmp_path, capfd):
    # What a triggerer killed between "about to show lines 3-5" and "shown" leaves behind.
    (tmp_path / "winnow-abc-g0.try1.log.json").write_text(json.dumps({"shown": 2, "through": 5}))
    trigger = _trigger(tmp_path)
    offset = asyncio.run(trigger._resume_offset())
    assert offset == 2
    asyncio.run(trigger._show("1\n2\n3\n4\n5\n6\n", offset, final=True))
    lines = _lines(capfd)
    assert lines[0].startswith("replaying job log lines 3-5")
    assert _shown(lines) == ["3", "4", "5", "6"]


def test_the_stored_trigger_carries_only_plain_values_and_no_token(tmp_path):
    path, kwargs = _trigger(tmp_path, poll_interval=2, cancel_on_kill=True).serialize()
    assert path == "winnow_airflow.triggers.RayJobTrigger"
    assert set(kwargs) == {"conn_id", "submission_id", "poll_interval", "log_offset", "checkpoint_uri",
                           "cancel_on_kill", "storage_conn_id"}
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in kwargs.values())
    assert RayJobTrigger(**kwargs).serialize() == (path, kwargs)
