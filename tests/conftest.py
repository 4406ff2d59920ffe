"""The tests' own environment, set before any test module (or Airflow) is imported.

A shell may carry settings for another system: ``AWS_*`` for some other, maybe stopped, S3
endpoint, a Ray address or token, an ``AIRFLOW_HOME`` and ``AIRFLOW__*`` of its own, a winnow
fault spec left from a manual try. Each would change what a test talks to, so they are removed
here, once, when pytest loads this file (the first conftest, before ``tests/airflow/conftest.py``
sets the test Airflow up and before the storage fixtures point ``AWS_*`` at their own server).
What the tests set later themselves is theirs.
"""

from __future__ import annotations

import os

import pytest

#: Inherited variables removed by prefix: object-store credentials and endpoints, Airflow's
#: configuration (tests/airflow/conftest.py makes its own), Ray's auth settings.
PREFIXES = ("AWS_", "AIRFLOW__", "RAY_AUTH_")
#: Inherited variables removed by name.
NAMES = (
    "AIRFLOW_HOME", "AIRFLOW_CONFIG",
    "RAY_ADDRESS", "RAY_NAMESPACE", "RAY_API_SERVER_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR",
    "STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS",
    "WINNOW_TEST_FAULTS", "WINNOW_TEST_AIRFLOW_HOME", "WINNOW_STORAGE_SOURCE", "WINNOW_RAY_EMBEDDED", "WINNOW_RAY_DIR",
)


def clean_environment(environ: os._Environ | dict = os.environ) -> list[str]:
    """Remove the inherited settings above from ``environ``; the names removed, sorted."""
    gone = sorted(k for k in environ if k.startswith(PREFIXES) or k in NAMES)
    for key in gone:
        del environ[key]
    return gone


REMOVED = clean_environment()
if "airflow" in __import__("sys").modules:  # imported before this file: it read the old settings
    raise RuntimeError("Airflow was imported before tests/conftest.py cleaned the environment")


@pytest.fixture(scope="session")
def shared_multinode(tmp_path_factory):
    """The suite's one multi-node Ray on loopback (``tests._multinode``: a 0-CPU head with the
    dashboard's Jobs API, worker nodes of ``SHARED_WORKERS`` CPUs), started on first use and
    stopped at the end of the session. Modules take it through ``shared_multinode_fixture()``,
    which restores its shape (a node-loss test kills a worker) and detaches after each module."""
    from tests._multinode import SHARED_WORKERS, multinode_cluster

    with multinode_cluster(tmp_path_factory.mktemp("multinode"), workers=SHARED_WORKERS, dashboard=True) as c:
        yield c
