"""``gs://`` through pyarrow's GCS filesystem against a GCS emulator on 127.0.0.1 (the
``gcp-storage-emulator`` package), reached by ``STORAGE_EMULATOR_HOST`` like Google's own
clients: globs, commits, listing, the lease (read-then-write: no conditional writes through
pyarrow on GCS) and a whole engine run equal to the run on local disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pyarrow as pa
import pytest

from tests.storage._runs import (
    SMALL,
    WRITE_STAGE,
    counts_of,
    output_files,
    run_local,
    upload_folder,
)
from tests.storage.conftest import _reset_storage
from winnow.data.shards import list_shards
from winnow.exceptions import RunLocked
from winnow.ray.cluster import free_port
from winnow.rowgroups import CommitStore, lease
from winnow.rowgroups.fs import GCS_EMULATOR_ENV, conditional_writes

pytestmark = [pytest.mark.timeout(600)]

BUCKET = "winnow-gcs"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")
    exe = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    proc = subprocess.Popen([exe, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory",
                             "--default-bucket", BUCKET], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/storage/v1/b", timeout=2).read()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "GCS emulator did not start"
            time.sleep(0.2)
    saved = os.environ.get(GCS_EMULATOR_ENV)
    os.environ[GCS_EMULATOR_ENV] = f"http://127.0.0.1:{port}"
    _reset_storage()
    try:
        yield port
    finally:
        if saved is None:
            os.environ.pop(GCS_EMULATOR_ENV, None)
        else:
            os.environ[GCS_EMULATOR_ENV] = saved
        _reset_storage()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        log.close()


def test_commits_listing_and_lease_on_gcs(gcs):
    store = CommitStore(f"gs://{BUCKET}/store")
    assert not conditional_writes(store.fs).supported  # the documented fallback
    for rg in range(5):
        store.commit_table("embed", 0, rg, pa.table({"x": [rg]}))
    assert store.completed("embed", 0) == set(range(5))
    assert store.read_table("embed", 0, 4).column("x").to_pylist() == [4]
    lease.acquire(store, "dag/a")
    with pytest.raises(RunLocked):
        lease.acquire(store, "dag/b")
    lease.release(store, "dag/a")
    lease.acquire(store, "dag/b")


def test_a_run_on_gcs_equals_the_local_run(gcs, local_run):
    from winnow.pipeline import CurationConfig

    upload_folder(local_run["shards"], f"gs://{BUCKET}/shards")
    assert list_shards(f"gs://{BUCKET}/shards/shard-*.tar") == [
        f"gs://{BUCKET}/shards/shard-00000{i}.tar" for i in range(2)]
    remote = run_local(CurationConfig(input_uri=f"gs://{BUCKET}/shards/shard-*.tar",
                                      output_root=f"gs://{BUCKET}/out", run_key="r", **SMALL))
    assert counts_of(remote) == counts_of(local_run["summary"]) and remote["records"] >= 24
    a, b = output_files(local_run["run_root"], WRITE_STAGE), output_files(f"gs://{BUCKET}/out/r", WRITE_STAGE)
    assert sorted(a) == sorted(b)
    assert all(a[k] == b[k] for k in a if k.endswith(".tar"))


def test_commits_reads_listing_and_lease_on_a_throttling_gcs(gcs, tmp_path, monkeypatch):
    """The emulator behind the throttling proxy (20 % of requests answered 503, seeded): the
    retrying layer and GCS's own client ride it out. (A whole run here takes minutes: GCS's
    client waits seconds between its own tries; the S3 tests run whole runs throttled.)"""
    from benchmarks._s3proxy import ThrottlingProxy

    proxy = ThrottlingProxy(f"http://127.0.0.1:{gcs}", str(tmp_path / "proxy.log"), str(tmp_path / "control.json"),
                            seed=3)
    try:
        monkeypatch.setenv(GCS_EMULATOR_ENV, proxy.endpoint)
        _reset_storage()
        proxy.set(throttle=0.20)
        store = CommitStore(f"gs://{BUCKET}/throttled")
        for rg in range(8):
            store.commit_table("embed", 0, rg, pa.table({"x": [rg] * 100}))
        assert store.completed("embed", 0) == set(range(8))
        assert [store.read_table("embed", 0, rg).column("x")[0].as_py() for rg in range(8)] == list(range(8))
        lease.acquire(store, "dag/a")
        with pytest.raises(RunLocked):
            lease.acquire(store, "dag/b")
        lease.release(store, "dag/a")
        proxy.set()
        outcomes = proxy.outcomes()
    finally:
        proxy.stop()
        monkeypatch.undo()
        _reset_storage()
    assert outcomes["throttle"] >= 3, outcomes
