"""Job mode under a REAL Airflow 3.3 (the package's ``airflow standalone``: scheduler, LocalExecutor,
triggerer, api-server) and a real local Ray head with its job server and token auth, reached
through a connection in job mode that the test creates through the REST API.

One run carries the module, in order: embed of partition 0 fails one row group on every try
(test-only fault hook, in the job's Ray workers) so the task fails naming it; a REST clear
(only_failed) runs one new job computing exactly that row group; clearing the task again while
that job runs attaches to it; the triggerer is SIGKILLed mid-job and a new one started, and no
log line of the job is lost. Tasks are ``deferred`` while their jobs run. What must happen while a
job runs is made certain, not hoped for: the job's row group waits at a barrier (the fault
hook's ``release`` file) that the test creates only after it has done and seen what it must do
while the job runs. Once that embed task has succeeded, the run is marked failed (its other
stages are not what this module checks; the ``dag.test`` module runs job mode to the end).
Slow: minutes.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from benchmarks._common import job_conn, jobs_of, start_job_head
from tests.airflow._live import AIRFLOW_BIN, LiveAirflow, LiveAirflowError
from winnow.ray import cluster
from winnow.rowgroups.plan import RowGroupPlan

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

RUN_TIMEOUT = 1500
JOB_CONN = "ray_jobs"
EMBED = ("partition.embed", 0)


def _wait(what: str, check, af: LiveAirflow, timeout: float = RUN_TIMEOUT, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise LiveAirflowError(f"timed out waiting for {what}\n{af.log_tail()}")
        time.sleep(every)


@pytest.fixture(scope="module")
def live(shared_airflow, tmp_path_factory):
    """The package's Airflow, a Ray head with its job server (token auth on), and a connection
    ``ray_jobs`` in job mode created through the REST API; the runs name it in ``ray_conn_id``."""
    from winnow.data.sample import generate_sample

    af = shared_airflow["af"]
    root = tmp_path_factory.mktemp("jobl")
    manifest = generate_sample(str(root / "shards"), shards=1, per_shard=12, seed=0, corrupt=True)
    plan = RowGroupPlan(num_records=manifest["expected"]["records"], buffer_size=10, max_partitions=1)
    assert plan.num_partitions == 1 and len(plan.partition_row_groups(0)) == 2, plan
    fault_file = root / "faults.json"
    t0 = time.perf_counter()
    ray_jobs = start_job_head(root, extra_env={"WINNOW_TEST_FAULTS": f"@{fault_file}"})
    try:
        # The Airflow processes hold another Ray token (RAY_AUTH_TOKEN, for the driver-mode head):
        # job mode must send the connection's password, not fall back on the environment.
        assert af.env["RAY_AUTH_TOKEN"] != ray_jobs["token"]
        # A job per step (not the index's one job of a small run): the faults below hit embed's own job.
        conn = json.loads(job_conn(ray_jobs["url"], ray_jobs["token"], poll_interval=1, one_job_max_records=0))
        af.api("POST", "/api/v2/connections", json={
            "connection_id": JOB_CONN, "conn_type": conn["conn_type"], "host": conn["host"],
            "password": conn["password"], "extra": json.dumps(conn["extra"])})
        conf = {"input_uri": str(root / "shards"), "output_root": str(root / "out"), "run_key": "jobs",
                "buffer_size": 10, "max_partitions": 1, "model": "winnow-tiny-vit", "pretrained": "random",
                "allow_random_weights": True, "aesthetic_threshold": 0.0, "ray_conn_id": JOB_CONN}
        yield {"af": af, "root": root, "conf": conf, "fault_file": fault_file, "ray": ray_jobs,
               "faulty_rg": plan.partition_row_groups(0)[1], "row_groups": list(plan.partition_row_groups(0))}
    finally:
        af.api("DELETE", f"/api/v2/connections/{JOB_CONN}", ok=(200, 204, 404))
        cluster.stop_head(ray_jobs["head"], timeout_s=15)
        print(f"\nlive job-mode module: {time.perf_counter() - t0:.0f} s in all")


def _embed_jobs(live) -> list[dict]:
    jobs = [j for j in jobs_of(live["ray"]["url"], live["ray"]["token"])
            if j["metadata"].get("airflow_task_id") == EMBED[0] and j["metadata"].get("airflow_map_index") == "0"]
    return sorted(jobs, key=lambda j: int(j["submission_id"].rsplit("-g", 1)[1]))


def _held_job(live, run_id: str, before: set[str] = frozenset()):
    """Waits until the embed task is deferred on a new job that is running (held at the barrier);
    fails at once if that job or the run ends first (the barrier did not hold)."""
    af = live["af"]

    def check():
        jobs = [j for j in _embed_jobs(live) if j["submission_id"] not in before]
        ended = [j for j in jobs if j["status"] not in ("PENDING", "RUNNING")]
        if ended or af.run_state(run_id) in ("success", "failed"):
            raise LiveAirflowError(f"a job ended before the test released its barrier: {ended}\n{af.log_tail()}")
        state = af.task_states(run_id).get(EMBED, (None, 0))
        return state[0] == "deferred" and [j for j in jobs if j["status"] == "RUNNING"] and (state, jobs[-1])

    return _wait("the embed task deferred on its running job", check, af)


@pytest.fixture(scope="module")
def faulted(live):
    """Embed's second row group fails on every try (1 + the DAG's 2 retries): the run fails. The
    first try's job holds at a barrier until the test has seen the task deferred on it."""
    af = live["af"]
    release = live["root"] / "release-faulted"
    live["fault_file"].write_text(json.dumps({"stage": "embed", "row_groups": [live["faulty_rg"]], "times": 3,
                                              "once_dir": str(live["root"] / "once"), "release": str(release)}))
    run_id = af.trigger(live["conf"], run_id="jobs")
    try:
        (state_seen, _job) = _held_job(live, run_id)  # raises if the task never defers on its job
        seen_deferred = state_seen[0] == "deferred"
    finally:
        release.touch()
    state = af.wait_run(run_id, timeout=RUN_TIMEOUT)
    live["fault_file"].unlink()
    return {"run_id": run_id, "state": state, "states": af.task_states(run_id), "deferred": seen_deferred,
            "embed0": af.xcom(run_id, *EMBED), "jobs": _embed_jobs(live)}


def test_failing_row_group_fails_the_task_naming_it_while_tasks_defer(live, faulted):
    assert faulted["state"] == "failed", faulted["states"]
    assert faulted["deferred"], "the embed task was never seen deferred while its job ran"
    assert faulted["states"][EMBED] == ("failed", 3)
    assert faulted["embed0"]["failed"] == [live["faulty_rg"]]
    assert "injected test fault" in faulted["embed0"]["first_error"]
    # One job per try, each a new generation started after the previous one ended.
    jobs = faulted["jobs"]
    assert [j["submission_id"].rsplit("-", 1)[1] for j in jobs] == ["g0", "g1", "g2"]
    assert all(j["status"] == "FAILED" for j in jobs)
    assert all(a["end_time"] <= b["start_time"] for a, b in zip(jobs, jobs[1:]))


def _triggerer_processes(af: LiveAirflow) -> list[psutil.Process]:
    out = []
    for p in af.marked_processes():
        try:
            if "triggerer" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.fixture(scope="module")
def cleared(live, faulted):
    """REST clear only_failed; while the new job runs (held at a barrier until the triggerer is
    dead): clear the task again, then SIGKILL the triggerer and start another."""
    release = live["root"] / "release-cleared"
    # The new job's row group waits before its commit until the test has killed the triggerer.
    live["fault_file"].write_text(json.dumps({"stage": "embed", "row_groups": [live["faulty_rg"]], "mode": "hold",
                                              "release": str(release)}))
    try:
        return _cleared(live, faulted, release)
    finally:
        release.touch()
        live["fault_file"].unlink(missing_ok=True)


def _cleared(live, faulted, release: Path) -> dict:
    af, run_id = live["af"], faulted["run_id"]
    af.clear({"dry_run": False, "only_failed": True, "dag_run_id": run_id})
    (_, try_before), job = _held_job(live, run_id, before={j["submission_id"] for j in faulted["jobs"]})
    # A person clears the task while its job runs: the next try must attach, not submit.
    af.clear({"dry_run": False, "only_failed": False, "dag_run_id": run_id, "task_ids": [list(EMBED)],
              "include_downstream": False, "include_upstream": False})
    _wait("the re-cleared embed task deferred again",
          lambda: af.task_states(run_id)[EMBED] == ("deferred", try_before + 1), af, every=0.5)
    attached = _embed_jobs(live)
    # Kill the triggerer mid-job, once it has shown some of the job's lines in this try's log,
    # then start a new one (airflow standalone does not restart it).
    _wait("the triggerer to show job log lines in the new try's log",
          lambda: len(_task_log_lines(af, run_id, try_before + 1)) >= 2, af, every=0.5)
    killed = _triggerer_processes(af)
    assert killed, "no triggerer process found"
    for p in killed:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(killed, timeout=10)
    job_status_at_kill = [j for j in _embed_jobs(live) if j["submission_id"] == job["submission_id"]][0]["status"]
    release.touch()  # only now may the job commit its row group and end
    log = open(live["root"] / "triggerer2.log", "ab")
    subprocess.Popen([AIRFLOW_BIN, "triggerer"], env=af.env, stdout=log, stderr=subprocess.STDOUT,
                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(af.home))
    embed = _wait("the cleared embed task to finish",
                  lambda: af.task_states(run_id)[EMBED][0] in ("success", "failed") and af.task_states(run_id)[EMBED], af)
    states = af.task_states(run_id)
    # What this module checks ends with embed: the rest of the DAG (five more Ray Jobs) would only
    # take minutes. The run is marked failed through the REST API, which ends its other tasks.
    af.api("PATCH", f"/api/v2/dags/image_curation/dagRuns/{run_id}", json={"state": "failed"})
    af.wait_run(run_id, timeout=120)
    return {"embed": embed, "states": states, "job": job, "attached": attached,
            "jobs": _embed_jobs(live), "try": try_before + 1, "status_at_kill": job_status_at_kill,
            "embed0": af.xcom(run_id, *EMBED)}


def _job_log(live, submission_id: str) -> str:
    import requests

    r = requests.get(f"{live['ray']['url']}/api/jobs/{submission_id}/logs",
                     headers={"Authorization": f"Bearer {live['ray']['token']}"}, timeout=30)
    r.raise_for_status()
    return r.json()["logs"]


def test_rest_clear_runs_one_new_job_computing_exactly_the_failed_row_group(live, faulted, cleared):
    assert cleared["embed"][0] == "success", cleared["states"]
    new = [j for j in cleared["jobs"] if j["submission_id"] not in {f["submission_id"] for f in faulted["jobs"]}]
    assert [j["submission_id"] for j in new] == [cleared["job"]["submission_id"]]
    assert new[0]["submission_id"].endswith("-g3") and new[0]["status"] == "SUCCEEDED"
    summary = cleared["embed0"]
    assert (summary["computed"], summary["skipped"]) == (1, len(live["row_groups"]) - 1)
    assert summary["failed"] == []


def test_clearing_a_task_whose_job_runs_attaches_to_that_job(cleared):
    assert cleared["states"][EMBED] == ("success", cleared["try"])
    assert [j["submission_id"] for j in cleared["attached"]] == [j["submission_id"] for j in cleared["jobs"]]
    assert len(cleared["jobs"]) == 4  # g0-g2 from the failed tries, g3 for the clear: none for the re-clear


def _task_log_lines(af: LiveAirflow, run_id: str, try_number: int) -> list[str]:
    """Job log lines shown in that try's task log (the worker's file and each triggerer's)."""
    folder = af.home / "logs" / "dag_id=image_curation" / f"run_id={run_id}" / f"task_id={EMBED[0]}" / "map_index=0"
    lines = []
    for path in sorted(glob.glob(f"{folder}/attempt={try_number}.log*")):
        for raw in Path(path).read_text(errors="replace").splitlines():
            try:
                event = json.loads(raw).get("event", "")
            except ValueError:
                event = raw
            lines.extend(e for e in [event] if isinstance(e, str) and e.startswith("[ray job] "))
    return lines


def test_killing_the_triggerer_mid_job_loses_no_log_line(live, faulted, cleared):
    af = live["af"]
    assert cleared["status_at_kill"] in ("PENDING", "RUNNING"), "the job ended before the triggerer was killed"
    job_lines = _job_log(live, cleared["job"]["submission_id"]).rstrip("\n").split("\n")
    shown = _task_log_lines(af, faulted["run_id"], cleared["try"])
    replay = [i for i, line in enumerate(shown) if line.startswith("[ray job] replaying")]
    body = [line[len("[ray job] "):] for line in shown if not line.startswith("[ray job] replaying")]
    if not replay:
        assert len(body) == len(job_lines), (len(body), len(job_lines))
        assert all(_same(s, j) for s, j in zip(body, job_lines)), [(s, j) for s, j in zip(body, job_lines) if not _same(s, j)]
    else:  # a batch shown twice, under the marker: every line still there, in order
        assert len(job_lines) <= len(body) <= 2 * len(job_lines)


def _same(shown: str, original: str) -> bool:
    """Airflow's secrets masker may have replaced part of a line (the entrypoint's base64 config)."""
    if shown == original:
        return True
    parts = re.split(r"\*{3,}", shown)
    return len(parts) > 1 and original.startswith(parts[0]) and original.endswith(parts[-1])


def test_no_token_in_any_airflow_log(live, cleared):
    token = live["ray"]["token"]
    for path in [*glob.glob(f"{live['af'].home}/logs/**/*", recursive=True), str(live["af"].log_path),
                 str(live["root"] / "triggerer2.log")]:
        if os.path.isfile(path):
            assert token not in Path(path).read_text(errors="replace"), path
