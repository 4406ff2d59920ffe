"""Wrong credentials against a real S3 endpoint that checks signatures: the error names the
URI and the setting to fix (environment or Airflow connection), never the secret."""

from __future__ import annotations

import os

import pytest

from benchmarks._s3server import SECRET_KEY, S3Server
from tests.storage.conftest import _reset_storage
from winnow.data.shards import list_shards
from winnow.exceptions import ConfigError, InputError, StorageError
from winnow.pipeline import CurationConfig
from winnow.rowgroups import CommitStore, lease
from winnow.rowgroups.fs import RunRoot, StorageOptions


@pytest.fixture(scope="module")
def strict_s3(tmp_path_factory):
    """A server that refuses every key it does not know (all of ours)."""
    server = S3Server(str(tmp_path_factory.mktemp("s3auth") / "requests.log"), auth=True)
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    _reset_storage()
    try:
        yield server
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        _reset_storage()
        server.stop()


def test_refused_credentials_from_the_environment_name_the_variables(strict_s3):
    with pytest.raises(InputError) as err:
        list_shards("s3://curation/shards/", StorageOptions.from_env())
    text = str(err.value)
    assert "s3://curation/shards/" in text and "refused the credentials" in text
    assert "AWS_ACCESS_KEY_ID" in text and "AWS_SECRET_ACCESS_KEY" in text
    assert SECRET_KEY not in text

    with pytest.raises(StorageError) as err:
        lease.acquire(CommitStore(RunRoot("s3://curation/out/run1", StorageOptions.from_env())), "dag/run")
    text = str(err.value)
    assert "s3://curation/out/run1/_lease.json" in text and "AWS_ACCESS_KEY_ID" in text
    assert SECRET_KEY not in text


def test_refused_credentials_from_a_connection_name_the_connection(strict_s3):
    secret = "conn-secret-Wx81"
    options = StorageOptions(endpoint_url=strict_s3.endpoint, region="us-east-1", access_key_id="AKIACONN",
                             secret_access_key=secret, source="the Airflow connection 's3_lake' (storage_conn_id)")
    try:
        with pytest.raises(StorageError) as err:
            CommitStore(RunRoot("s3://curation/out/run2", options)).read_fingerprint("index")
        text = str(err.value)
        assert "s3://curation/out/run2/index/_stage.json" in text
        assert "the login (access key id) and password (secret access key) of the Airflow connection 's3_lake'" in text
        assert secret not in text and secret not in repr(StorageOptions(secret_access_key=secret))
    finally:
        _reset_storage()


def test_validation_reports_the_refused_input_before_any_work(strict_s3, tmp_path):
    cfg = CurationConfig(input_uri="s3://curation/shards/*.tar", output_root=str(tmp_path), run_key="r",
                         model="winnow-tiny-vit", pretrained="random", allow_random_weights=True,
                         storage=StorageOptions.from_env())
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert "input_uri" in str(err.value) and "refused the credentials" in str(err.value)
    assert SECRET_KEY not in str(err.value)
