"""Real Airflow 3.3 for the operator and DAG tests: a temp AIRFLOW_HOME with SQLite, migrated once.

The environment is set here, before anything imports Airflow, because Airflow reads its
configuration at import time.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Tests import this module by name too; the env var keeps one AIRFLOW_HOME per session.
AIRFLOW_HOME = os.environ.setdefault("WINNOW_TEST_AIRFLOW_HOME", tempfile.mkdtemp(prefix="winnow-airflow-"))
AIRFLOW_ENV = {
    "AIRFLOW_HOME": AIRFLOW_HOME,
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME}/airflow.db",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
}
# The editable install maps ``operators`` as a namespace package (it was made before
# operators/__init__.py existed), which hides ``operators.get_provider_info`` from Airflow's
# provider discovery; putting the repo first on the path makes it the regular package.
AIRFLOW_ENV["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
if str(REPO) not in sys.path[:1]:
    sys.path.insert(0, str(REPO))
os.environ.update(AIRFLOW_ENV)
AIRFLOW_BIN = str(Path(sys.executable).with_name("airflow"))


def airflow_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the ``airflow`` CLI against this test's AIRFLOW_HOME; fail with its output."""
    proc = subprocess.run(
        [AIRFLOW_BIN, *args], env={**os.environ, **AIRFLOW_ENV}, capture_output=True, text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"airflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextlib.contextmanager
def retries_set(dag, retries: int):
    """Every task of ``dag`` retries ``retries`` times meanwhile; then as declared again, params
    included (the DAG object is shared by the session: a module must leave it as it found it, and
    a run's conf is merged into the params of the tasks it ran, so one run's conf would become the
    next run's defaults)."""
    import copy

    declared = {task.task_id: (task.retries, copy.deepcopy(task.params)) for task in dag.tasks}
    dag_params = copy.deepcopy(dag.params)
    for task in dag.tasks:
        task.retries = retries
    try:
        yield dag
    finally:
        for task in dag.tasks:
            task.retries, task.params = declared[task.task_id]
        dag.params = dag_params


@pytest.fixture(scope="session")
def airflow_db() -> str:
    """A migrated metadata DB (SQLite) in the temp AIRFLOW_HOME; about 6 s, once per session."""
    airflow_cli("db", "migrate", timeout=300)
    return AIRFLOW_HOME


@pytest.fixture(scope="session")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


@pytest.fixture(scope="session")
def curation_dag(dagbag):
    assert not dagbag.import_errors, dagbag.import_errors
    return dagbag.dags["image_curation"]
