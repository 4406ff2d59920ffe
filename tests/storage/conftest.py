"""One S3-compatible server per test module, reached through the standard AWS environment."""

from __future__ import annotations

import os

import pytest

from benchmarks._s3server import S3Server

BUCKET = "winnow"


def _reset_storage() -> None:
    from winnow.rowgroups import fs

    fs._FS_CACHE.clear()
    fs._COND_CACHE.clear()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto server with bucket ``winnow``, the AWS_* variables pointing at it for the module."""
    server = S3Server(str(tmp_path_factory.mktemp("s3log") / "requests.log"))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    _reset_storage()
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _reset_storage()
        server.stop()


@pytest.fixture(scope="session")
def local_run(tmp_path_factory):
    """The reference: sample shards curated on local disk (every S3/GCS run is compared to it)."""
    from tests.storage._runs import SMALL, run_local
    from winnow.data.sample import generate_sample
    from winnow.pipeline import CurationConfig

    root = tmp_path_factory.mktemp("reference")
    generate_sample(str(root / "shards"), shards=2, per_shard=12, seed=0, corrupt=True)
    summary = run_local(CurationConfig(input_uri=str(root / "shards"), output_root=str(root / "out"),
                                       run_key="local", **SMALL))
    return {"shards": str(root / "shards"), "summary": summary, "run_root": str(root / "out" / "local")}
