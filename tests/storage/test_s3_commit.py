"""The commit protocol on a real S3 endpoint: one PUT of the final key per row group, listing
per partition prefix, ``_stage.json`` and the run lease by conditional PUTs, a killed upload
that leaves no object, and clear errors for a missing bucket or an unreachable endpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from benchmarks._s3server import SECRET_KEY
from tests.storage._runs import env_root
from tests.storage.conftest import BUCKET, _reset_storage
from winnow.data.shards import list_shards
from winnow.exceptions import InputError, RunLocked, StageConfigMismatch, StorageError
from winnow.ray.cluster import free_port
from winnow.rowgroups import CommitStore, StageFingerprint, lease
from winnow.rowgroups.fs import StorageOptions, conditional_writes, create_if_absent

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _store(name: str) -> CommitStore:
    return CommitStore(env_root(f"s3://{BUCKET}/{name}"))


def _shards(uri: str) -> list[str]:
    return list_shards(uri, StorageOptions.from_env())


def test_a_row_group_commit_is_one_put_of_its_final_key(s3):
    store = _store("commit-one-put")
    mark = s3.mark()
    store.commit_table("embed", 0, 3, pa.table({"x": [1, 2]}))
    reqs = s3.requests(mark)
    assert [(r.kind, r.key) for r in reqs] == [("PUT", "commit-one-put/embed/p00000/rg000000003.parquet")]
    assert store.completed("embed", 0) == {3}
    assert store.read_table("embed", 0, 3).column("x").to_pylist() == [1, 2]


def test_listing_is_one_request_per_partition_prefix_not_per_row_group(s3):
    store = _store("listing")
    for rg in range(25):
        store.commit_table("embed", 1, rg, pa.table({"x": [rg]}))
    store.commit_table("embed", 2, 99, pa.table({"x": [0]}))
    mark = s3.mark()
    assert store.completed("embed", 1, clean_temp=True) == set(range(25))
    reqs = s3.requests(mark)
    assert [r.kind for r in reqs] == ["LIST"]
    assert reqs[0].query["prefix"] == ["listing/embed/p00001/"]


def test_stage_fingerprint_is_created_only_if_absent(s3):
    store = _store("fingerprint")
    fp = StageFingerprint("embed", {"model": "a"}, num_records=4, buffer_size=2)
    assert store.ensure_stage(fp) is None
    store.ensure_stage(fp)  # same config: checked, not rewritten
    with pytest.raises(StageConfigMismatch, match="model"):
        store.ensure_stage(StageFingerprint("embed", {"model": "b"}, num_records=4, buffer_size=2))
    # Two writers racing to record a stage: the conditional PUT lets only the first one in.
    path = f"{BUCKET}/fingerprint/other/_stage.json"
    mark = s3.mark()
    assert create_if_absent(store.fs, path, b'{"first": true}')
    assert not create_if_absent(store.fs, path, b'{"second": true}')
    assert [(r.kind, r.status) for r in s3.requests(mark)] == [("PUT", 200), ("PUT", 412)]
    with store.fs.open_input_stream(path) as f:
        assert json.loads(f.read()) == {"first": True}


def test_overwrite_moves_the_stage_aside_without_a_rename(s3):
    store = _store("overwrite")
    store.ensure_stage(StageFingerprint("embed", {"model": "a"}))
    store.commit_table("embed", 0, 0, pa.table({"x": [1]}))
    moved = store.ensure_stage(StageFingerprint("embed", {"model": "b"}), overwrite=True)
    assert moved and ".replaced-" in moved
    assert store.completed("embed", 0) == set()
    assert store.read_fingerprint("embed")["config"] == {"model": "b"}
    kept = store.fs.get_file_info(pafs.FileSelector(moved, recursive=True))
    assert sorted(i.base_name for i in kept if i.type == pafs.FileType.File) == ["_stage.json", "rg000000000.parquet"]


def test_the_lease_is_taken_by_one_run_and_taken_over_only_when_expired(s3):
    store = _store("lease")
    lease.acquire(store, "dag/run-a")
    lease.acquire(store, "dag/run-a")  # renewal by the holder
    with pytest.raises(RunLocked, match="run-a"):
        lease.acquire(store, "dag/run-b")
    lease.acquire(store, "dag/run-a", ttl_s=-1)  # the holder "died": its lease has expired
    lease.acquire(store, "dag/run-b")
    assert lease.read_lease(store).owner == "dag/run-b"
    # A takeover races with another: the If-Match of the loser no longer holds.
    cond = conditional_writes(store.fs)
    body, etag = cond.read(store.path(lease.LEASE_FILE))
    assert cond.replace(store.path(lease.LEASE_FILE), body + b"\n", etag)  # the winner (new ETag)
    assert not cond.replace(store.path(lease.LEASE_FILE), b"{}", etag)
    lease.release(store, "dag/run-b")
    assert lease.read_lease(store) is None


_UPLOADER = """
import sys, time
from winnow.rowgroups import CommitStore, RunRoot, StorageOptions

# Test-only fault injection: the commit's output stream writes its first 16 MiB (parts go out),
# then holds at a barrier the test never releases, so the upload is surely not complete when
# the test kills this process (no race on how fast the rest would upload).
class HeldStream:
    def __init__(self, inner):
        self.inner = inner
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)
    def write(self, data):
        view = memoryview(data)
        self.inner.write(view[: 16 << 20])
        self.inner.flush()
        print("held", flush=True)
        while True:
            time.sleep(1)

class HeldFS:
    def __init__(self, inner):
        self.inner = inner
    def __getattr__(self, name):
        return getattr(self.inner, name)
    def open_output_stream(self, path, *args, **kwargs):
        return HeldStream(self.inner.open_output_stream(path, *args, **kwargs))

store = CommitStore(RunRoot(sys.argv[1], StorageOptions.from_env()))
store.fs = HeldFS(store.fs)
store.commit_bytes("write", 0, 7, b"x" * (48 << 20), suffix=".tar")
print("completed", flush=True)
"""


def test_an_upload_killed_mid_way_held_at_a_barrier_leaves_no_object(s3, tmp_path):
    """SIGKILL a process inside a big row-group commit (a multipart upload whose stream a
    test-only fault holds after its first parts): nothing appears, and a retry commits."""
    root = f"s3://{BUCKET}/killed"
    mark = s3.mark()
    child = subprocess.Popen([sys.executable, "-c", _UPLOADER, root], cwd=REPO, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": REPO})
    deadline = time.monotonic() + 60
    while not any(r.kind == "PUT" and "partNumber" in r.query for r in s3.requests(mark)):
        assert child.poll() is None and time.monotonic() < deadline, "the upload never started"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    reqs = s3.requests(mark)
    assert not any(r.method == "POST" and "uploadId" in r.query for r in reqs), "upload completed before the kill"
    store = CommitStore(env_root(root))
    path = store.row_group_path("write", 0, 7, ".tar")
    assert store.fs.get_file_info(path).type == pafs.FileType.NotFound
    assert store.fs.get_file_info(pafs.FileSelector(store.root, recursive=True, allow_not_found=True)) == []
    store.commit_bytes("write", 0, 7, b"y" * 10, suffix=".tar")  # the retry commits normally
    with store.fs.open_input_stream(path) as f:
        assert f.read() == b"y" * 10


def test_a_glob_on_s3_is_one_listing(s3):
    store = _store("glob")
    for name in ("part-000.tar", "part-001.tar", "part-002.tar", "other.tar", "sub/part-003.tar"):
        with store.fs.open_output_stream(store.path("shards", name)) as f:
            f.write(b"t")
    mark = s3.mark()
    assert _shards(f"s3://{BUCKET}/glob/shards/part-*.tar") == [
        f"s3://{BUCKET}/glob/shards/part-00{i}.tar" for i in range(3)]
    assert s3.counts(mark) == {"LIST": 1}
    assert _shards(f"s3://{BUCKET}/glob/shards/part-{{001..002}}.tar") == [
        f"s3://{BUCKET}/glob/shards/part-00{i}.tar" for i in (1, 2)]
    with pytest.raises(InputError, match=r"matched nothing.*part-9\*"):
        _shards(f"s3://{BUCKET}/glob/shards/part-9*.tar")


def test_a_missing_bucket_is_named_for_input_and_output(s3):
    with pytest.raises(InputError) as err:
        _shards("s3://no-such-bucket/shards/")
    assert "bucket 'no-such-bucket' does not exist" in str(err.value) and s3.endpoint in str(err.value)
    with pytest.raises(InputError, match="bucket 'no-such-bucket' does not exist"):
        _shards("s3://no-such-bucket/shards/*.tar")
    with pytest.raises(StorageError) as err:
        lease.acquire(CommitStore(env_root("s3://no-such-bucket/out/run")), "dag/run")
    text = str(err.value)
    assert "s3://no-such-bucket/out/run/_lease.json" in text and "Create the bucket" in text
    assert SECRET_KEY not in text


def test_an_unreachable_endpoint_names_the_setting(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    _reset_storage()
    try:
        t0 = time.monotonic()
        with pytest.raises(InputError) as err:
            _shards(f"s3://{BUCKET}/shards/")
        assert "cannot reach the object store" in str(err.value) and "AWS_ENDPOINT_URL" in str(err.value)
        with pytest.raises(StorageError) as err:
            _store("unreachable").ensure_stage(StageFingerprint("embed"))
        assert f"s3://{BUCKET}/unreachable" in str(err.value) and "AWS_ENDPOINT_URL" in str(err.value)
        assert SECRET_KEY not in str(err.value)
        assert time.monotonic() - t0 < 30
    finally:
        monkeypatch.undo()
        _reset_storage()


def test_indexing_a_shard_reads_it_in_blocks_not_per_member(s3):
    """A tar-header scan walks the shard's 512-byte headers; on S3 each 8 MiB block is one GET."""
    import io
    import tarfile

    from winnow.data.tarscan import scan_shard

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(40):
            for ext, size in (("jpg", 3000), ("txt", 20), ("json", 30)):
                info = tarfile.TarInfo(f"k{i:03d}.{ext}")
                info.size = size
                tar.addfile(info, io.BytesIO(b"x" * size))
    store = _store("scan")
    with store.fs.open_output_stream(store.path("shard-0.tar")) as f:
        f.write(buf.getvalue())
    mark = s3.mark()
    scan = scan_shard(f"s3://{store.root}/shard-0.tar", storage=StorageOptions.from_env())
    assert scan.table().num_rows == 40
    counts = s3.counts(mark)
    assert counts["GET"] == 1 and counts["HEAD"] <= 1, counts


def test_an_index_rerun_that_changes_nothing_puts_nothing(s3, tmp_path):
    """``index/_index.json`` (and every other index object) is written once: a rerun on the same
    input finds it equal and leaves the committed object alone (no PUT)."""
    from winnow.data.index import IndexConfig, build_index
    from winnow.data.sample import generate_sample

    generate_sample(str(tmp_path / "in"), shards=1, per_shard=6, seed=2)
    config = IndexConfig(input_uri=str(tmp_path / "in"), buffer_size=2, max_partitions=2)
    run_root = f"s3://{BUCKET}/index-rerun"
    build_index(env_root(run_root), config)
    mark = s3.mark()
    again = build_index(env_root(run_root), config)
    assert again.row_groups_committed == 0
    puts = [r.key for r in s3.requests(mark) if r.kind in ("PUT", "POST", "DELETE")]
    assert puts == [], puts
