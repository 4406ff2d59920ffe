"""image_curation under ``dag.test()`` with shards and run root on a real S3 endpoint that
throttles 10 % of requests (503 SlowDown) and resets 1 % of connections, reached only through an
Airflow ``aws`` connection named by the ``storage_conn_id`` param (the AWS_* variables are unset):
every task succeeds on its first try, with the same counts and the same output objects as the
run on local disk, and the connection's secret in no XCom, summary, fingerprint or task log."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from datetime import UTC, datetime
from unittest import mock

import pyarrow.fs as pafs
import pytest

from benchmarks._s3proxy import ThrottlingProxy
from benchmarks._s3server import ACCESS_KEY, SECRET_KEY
from tests.airflow.conftest import airflow_db, curation_dag, dagbag, retries_set  # noqa: F401  (fixtures)
from tests.storage._runs import (
    SMALL,
    WRITE_STAGE,
    counts_of,
    env_root,
    output_files,
    parquet_rows,
    upload_folder,
)
from tests.storage.conftest import BUCKET, _reset_storage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RUN_DATE = datetime(2025, 4, 1, tzinfo=UTC)
PREFIX = f"s3://{BUCKET}/dag"
CONN_ID = "winnow_s3"


@pytest.fixture(scope="module")
def runs(s3, curation_dag, local_run, tmp_path_factory, pytestconfig):  # noqa: F811
    upload_folder(local_run["shards"], f"{PREFIX}/shards")
    # The store misbehaves as one at scale does: the run reaches the S3 server through a proxy
    # that answers 10 % of requests 503 SlowDown and resets 1 % of connections (seeded).
    folder = tmp_path_factory.mktemp("s3proxy")
    proxy = ThrottlingProxy(s3.endpoint, str(folder / "proxy.log"), str(folder / "control.json"), seed=25)
    proxy.set(throttle=0.10, reset=0.01)

    conn = {"conn_type": "aws", "login": ACCESS_KEY, "password": SECRET_KEY,
            "extra": {"endpoint_url": proxy.endpoint, "region_name": "us-east-1"}}
    conf = {"input_uri": f"{PREFIX}/shards/shard-{{000000..000001}}.tar", "output_root": f"{PREFIX}/out",
            "run_key": "dag", "storage_conn_id": CONN_ID, **SMALL}
    no_aws_env = {k: "" for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    log_path = tmp_path_factory.mktemp("s3daglog") / "output.log"
    with mock.patch.dict(os.environ, {f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps(conn), **no_aws_env}):
        _reset_storage()
        # dag.test prints the task logs: with pytest's capture off, fds 1 and 2 go to a file.
        capture = pytestconfig.pluginmanager.getplugin("capturemanager")
        try:
            with capture.global_and_fixture_disabled(), _output_to(str(log_path)), retries_set(curation_dag, 0):
                dr = curation_dag.test(logical_date=RUN_DATE, run_conf=conf)
        finally:
            outcomes = proxy.outcomes()
            proxy.stop()
    _reset_storage()
    return {"dr": dr, "local": local_run["summary"], "local_root": local_run["run_root"], "outcomes": outcomes,
            "s3_root": f"{PREFIX}/out/dag", "log": log_path.read_text(errors="replace")}


@contextlib.contextmanager
def _output_to(path: str):
    """Everything written to this process's stdout and stderr (file descriptors 1 and 2,
    whoever writes) goes to ``path`` meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "wb") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _xcoms(dr) -> list:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(XComModel).filter_by(dag_id=dr.dag_id, run_id=dr.run_id).all()
        return [(r.task_id, r.map_index, r.key, XComModel.deserialize_value(r)) for r in rows]


def test_the_run_on_a_throttling_s3_succeeds_first_try_with_the_local_counts(runs):
    """Every task's first try (retries are 0) succeeds although the store throttled and reset
    connections; the summary counts the retried requests of the row-group work."""
    assert runs["outcomes"]["throttle"] > 10 and runs["outcomes"]["reset"] >= 1, runs["outcomes"]
    assert runs["dr"].state == "success"
    report = next(v for t, _, k, v in _xcoms(runs["dr"]) if t == "report" and k == "return_value")
    assert report["records"] >= 24 and report["undecodable"] > 0
    assert counts_of(report) == counts_of(runs["local"])
    assert report["storage_retries"] >= report["storage_throttled"] > 0, report


def test_output_objects_equal_the_local_files(runs):
    local = output_files(runs["local_root"], WRITE_STAGE)
    remote = output_files(runs["s3_root"], WRITE_STAGE)
    assert sorted(local) == sorted(remote) and any(k.endswith(".tar") for k in local)
    for key in local:
        if key.endswith(".tar"):
            assert local[key] == remote[key], key
        elif key.endswith(".parquet"):  # _stage.json differs: it chains the input's fingerprint
            assert parquet_rows(local[key], drop=("shard",)) == parquet_rows(remote[key], drop=("shard",)), key


def test_the_secret_is_in_no_xcom_summary_or_fingerprint(runs):
    assert runs["dr"].state == "success"
    text = json.dumps(_xcoms(runs["dr"]), default=str)
    assert SECRET_KEY not in text and ACCESS_KEY not in text
    assert "storage_conn_id" not in text or CONN_ID in text  # the id may show, never its values
    fs, root = env_root(runs["s3_root"]).filesystem()
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File and info.base_name.endswith(".json"):
            with fs.open_input_stream(info.path) as f:
                body = f.read().decode()
            assert SECRET_KEY not in body and ACCESS_KEY not in body, info.path


def test_the_secret_is_in_no_task_log(runs):
    """The task logs of the run as ``dag.test`` prints them: the connection is named, its
    endpoint shown, its secret never."""
    log = runs["log"]
    assert f"object storage: connection '{CONN_ID}'" in log and "report: {'records': " in log
    assert SECRET_KEY not in log
