"""Runs against an S3 endpoint that misbehaves: the project's S3 test server behind
``benchmarks._s3proxy`` (seeded 503 SlowDown answers, reset connections, refused connections).

- (the image_curation DAG with 10 % of requests throttled: ``test_s3_dag.py``, whose run goes
  through the same proxy);
- 100 % throttled for 20 s in the middle of embed (the run held at a test barrier, the store
  then throttles everything, the barrier released): the run rides it out;
- the endpoint down for 10 s while the run is between steps (its next lease renewal meets the
  outage): the run goes on, or the rerun starts at once (no RunLocked);
- a pyarrow read of a few bytes never meets the AWS SDK's "Failed to flush response stream".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from benchmarks._s3proxy import ThrottlingProxy
from tests.storage._runs import SMALL, WRITE_STAGE, counts_of, output_files, parquet_rows, upload_folder
from tests.storage.conftest import BUCKET
from winnow.pipeline import CurationConfig
from winnow.rowgroups import CommitStore, RunRoot, StorageOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIX = f"s3://{BUCKET}/throttled"


@pytest.fixture(scope="module")
def proxy(s3, local_run, tmp_path_factory):
    upload_folder(local_run["shards"], f"{PREFIX}/shards")  # straight to the server: no faults yet
    folder = tmp_path_factory.mktemp("proxy")
    p = ThrottlingProxy(s3.endpoint, str(folder / "proxy.log"), str(folder / "control.json"), seed=25)
    try:
        yield p
    finally:
        p.stop()


def _cfg(proxy, run_key: str) -> CurationConfig:
    return CurationConfig(input_uri=f"{PREFIX}/shards/", output_root=f"{PREFIX}/out", run_key=run_key, **SMALL,
                          storage=StorageOptions.from_env(proxy.env()))


def _same_output(local_root: str, s3_root: str) -> None:
    local = output_files(local_root, WRITE_STAGE)
    remote = output_files(s3_root, WRITE_STAGE)
    assert sorted(local) == sorted(remote) and any(k.endswith(".tar") for k in local)
    for key in local:
        if key.endswith(".tar"):
            assert local[key] == remote[key], key
        elif key.endswith(".parquet"):
            assert parquet_rows(local[key], drop=("shard",)) == parquet_rows(remote[key], drop=("shard",)), key


def test_a_small_ranged_read_of_a_throttled_store_is_retried_not_an_sdk_internal_failure(proxy):
    root = RunRoot(f"{PREFIX}/small", StorageOptions.from_env(proxy.env()))
    fs, path = root.filesystem()
    with fs.open_output_stream(f"{path}/footer.bin") as f:
        f.write(bytes(range(200)))
    from winnow.rowgroups import retry

    before = retry.counts()
    proxy.set(throttle_until=time.time() + 1.5)
    try:
        with fs.open_input_file(f"{path}/footer.bin") as f:
            assert f.read_at(8, 100) == bytes(range(100, 108))
    finally:
        proxy.set()
    assert retry.counts_since(before)["storage_throttled"] >= 1


def _child(proxy, cfg: CurationConfig, fault: dict) -> subprocess.Popen:
    spec = {"cfg": cfg.to_dict(), "call": "run_all"}
    env = {**os.environ, **proxy.env(), "PYTHONPATH": REPO, "WINNOW_TEST_FAULTS": json.dumps(fault)}
    return subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "faults", "_child.py"), json.dumps(spec)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _held_run(proxy, cfg: CurationConfig, stage: str, row_group: int, folder) -> tuple[subprocess.Popen, str]:
    """``run_all`` in a child process, held at a test barrier just before it commits
    ``row_group`` of ``stage``; returns it (waiting there) and the file that releases it."""
    held, release = str(folder / "held"), str(folder / "release")
    proc = _child(proxy, cfg, {"stage": stage, "row_groups": [row_group], "mode": "hold", "release": release,
                               "held": held})
    _wait_held(held, proc)
    return proc, release


def _wait_held(held: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not (os.path.exists(held) and open(held).read().strip()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the run never reached its barrier"
        time.sleep(0.1)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, f"no result (exit {proc.returncode}):\n{err[-4000:]}"
    return json.loads(lines[-1]) | {"stderr": err}


def test_100_percent_throttled_for_20_s_mid_embed_the_run_rides_it_out(proxy, local_run, tmp_path):
    cfg = _cfg(proxy, "throttled20")
    proc, release = _held_run(proxy, cfg, "embed", 2, tmp_path)
    store = CommitStore(RunRoot(cfg.run_root, StorageOptions.from_env(proxy.env())))
    committed_before = {rg: store.fs.get_file_info(store.row_group_path("embed", 0, rg)).mtime
                        for rg in store.completed("embed", 0)}
    mark = proxy.mark()
    proxy.set(throttle_until=time.time() + 20)
    open(release, "w").close()  # the run goes on into 20 s of nothing but 503 SlowDown
    got = _result(proc)
    outcomes = proxy.outcomes(mark)
    print(f"proxy outcomes: {dict(outcomes)}")
    assert outcomes["throttle"] >= 5, outcomes
    if not got["ok"]:  # a run that gives up must say it was throttled; the retry then finishes
        assert "throttled" in got["error"], got
        from tests.storage._runs import run_local

        got = {"ok": True, "summary": run_local(cfg)}
    summary = got["summary"]
    assert counts_of(summary) == counts_of(local_run["summary"])
    assert summary["storage_throttled"] >= 1
    for rg, mtime in committed_before.items():  # nothing committed was written again
        assert store.fs.get_file_info(store.row_group_path("embed", 0, rg)).mtime == mtime, rg


def test_an_outage_of_10_s_at_a_lease_renewal_the_run_goes_on_or_reruns_at_once(proxy, local_run, tmp_path):
    cfg = _cfg(proxy, "outage10")
    # Held at the last row group of aesthetic's first partition: releasing it commits that row
    # group and starts the next step, whose lease renewal meets the outage.
    proc, release = _held_run(proxy, cfg, "aesthetic", 1, tmp_path)
    mark = proxy.mark()
    proxy.set(down=True)
    back = threading.Timer(10.0, proxy.set)  # the fault's length: the store comes back after 10 s
    back.start()
    try:
        open(release, "w").close()
        got = _result(proc)
    finally:
        back.join()
    outcomes = proxy.outcomes(mark)
    print(f"proxy outcomes: {dict(outcomes)}")
    assert outcomes["down"] >= 1 or outcomes["reset"] >= 1, outcomes
    if not got["ok"]:
        assert got["error_type"] != "RunLocked", got
        from tests.storage._runs import run_local

        got = {"ok": True, "summary": run_local(cfg)}  # must start at once: no RunLocked
    assert counts_of(got["summary"]) == counts_of(local_run["summary"])
