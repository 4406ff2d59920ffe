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


def test_a_young_job_is_polled_sooner_then_every_poll_interval_fake_jobs_api_and_clock(monkeypatch):
    """The waits between looks at a running job grow from FIRST_POLL_S by POLL_GROWTH up to
    poll_interval; once the log shows the job's last line the next look comes within
    FINISHING_POLL_S. The Jobs API and the sleeps are fakes (the trigger's own calls are real)."""
    from winnow.job import SUMMARY_MARKER
    from winnow_airflow import triggers
    from winnow_airflow.hooks import RayHook

    polls = {"n": 0}
    statuses = ["PENDING"] + ["RUNNING"] * 8 + ["SUCCEEDED"]

    async def fake_get_job(self, session, submission_id):
        polls["n"] += 1
        return {"status": statuses[polls["n"] - 1], "message": ""}

    async def fake_logs(self, session, submission_id):
        return f"line\n{SUMMARY_MARKER}{{}}\n" if polls["n"] >= 9 else "line\n"

    slept: list[float] = []

    async def fake_sleep(seconds):
        slept.append(seconds)

    monkeypatch.setattr(RayHook, "aget_job", fake_get_job)
    monkeypatch.setattr(RayHook, "aget_job_logs", fake_logs)
    monkeypatch.setattr(triggers.asyncio, "sleep", fake_sleep)

    async def events():
        return [e async for e in RayJobTrigger(conn_id="ray_x", submission_id="winnow-abc-g0", poll_interval=5).run()]

    (event,) = asyncio.run(events())
    assert event.payload["status"] == "SUCCEEDED" and polls["n"] == len(statuses)
    assert slept == [0.5, 0.75, 1.125, 1.6875, 2.53125, 3.796875, 5.0, 5.0, 0.5], slept
    assert triggers.FIRST_POLL_S == 0.5 and triggers.POLL_GROWTH == 1.5  # as the README says
