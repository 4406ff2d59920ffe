"""One real ``airflow standalone`` (and one local Ray head its driver-mode tasks attach to) for
every module of this package: the live REST tests, the live job-mode tests and the browser test.

Starting a standalone costs minutes on two loaded cores, so the package starts it once. The
modules run one after another and keep out of each other's way: each triggers runs with its own
run ids and run keys, writes its own fault spec to the shared fault file (``set_faults``) and
removes it when its run is over, and a module that needs another connection (job mode's
``ray_jobs``) creates it through the REST API, as a user would.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.airflow._live import LiveAirflow

#: A user with no role: no access to any DAG (the browser test's 403 case).
OUTSIDER = "outsider"


def set_faults(live: dict, spec: dict | None) -> None:
    """Writes (or, with None, removes) the test-only fault spec every Airflow task process reads."""
    path = Path(live["fault_file"])
    if spec is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(json.dumps(spec))


@pytest.fixture(scope="package")
def shared_airflow(tmp_path_factory):
    root = tmp_path_factory.mktemp("airflow-live")
    fault_file = root / "faults.json"
    af = LiveAirflow(root / "home", extra_env={
        "WINNOW_TEST_FAULTS": f"@{fault_file}",
        # The DAG retries twice with a 30 s+ backoff; the global cap makes retries exhaust in seconds.
        "AIRFLOW__CORE__MAX_TASK_RETRY_DELAY": "1",
        # Two cores: more task processes at once only contend.
        "AIRFLOW__CORE__PARALLELISM": "2",
        # The DAG's default output root. The browser test's run names none, so the view must find
        # that run through the index task's XCom, not through a server-wide setting.
        "WINNOW_OUTPUT_ROOT": str(root / "default-out"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"admin:admin,{OUTSIDER}:",
        # A loaded shared machine: give the Ray head's raylet longer to register than 10 s.
        "RAY_raylet_start_wait_time_s": "100",
    })
    t0 = time.perf_counter()
    try:
        af.start(timeout=600)
        yield {"af": af, "root": root, "fault_file": fault_file, "default_out": root / "default-out",
               "startup_s": time.perf_counter() - t0}
    finally:
        af.stop()
        print(f"\nshared live Airflow: {time.perf_counter() - t0:.0f} s in all")
        assert not af.marked_processes(), "processes started by the live fixture outlived it"
