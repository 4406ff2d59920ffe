"""Two runs in one process, each with its own object store (two S3 servers holding the same
bucket and keys; and a run root on local disk beside one on S3): at once or step by step
interleaved, each run reaches only its own store. The process's AWS environment points at a dead
endpoint meanwhile, so anything that fell back to process settings would fail."""

from __future__ import annotations

import json
import os
import threading

import pyarrow as pa
import pytest

from benchmarks._s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server
from tests.storage._runs import SMALL, counts_of
from tests.storage.conftest import BUCKET, _reset_storage
from winnow import pipeline
from winnow.execution import LOCAL
from winnow.pipeline import CurationConfig
from winnow.ray.cluster import free_port
from winnow.registry import run_phases
from winnow.rowgroups import CommitStore, RunRoot, StorageOptions, lease

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Servers ``a`` and ``b``, each with bucket ``winnow``, and the settings that reach each."""
    servers = {name: S3Server(str(tmp_path_factory.mktemp(f"s3{name}") / "requests.log")) for name in "ab"}
    dead = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "AKIANOBODY",
            "AWS_SECRET_ACCESS_KEY": "nobody", "AWS_REGION": REGION}
    saved = {k: os.environ.get(k) for k in dead}
    os.environ.update(dead)
    _reset_storage()
    try:
        for server in servers.values():
            server.create_bucket(BUCKET)
        yield {name: (server, StorageOptions(endpoint_url=server.endpoint, region=REGION, access_key_id=ACCESS_KEY,
                                             secret_access_key=SECRET_KEY, source=f"test store {name}"))
               for name, server in servers.items()}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        _reset_storage()
        for server in servers.values():
            server.stop()


def test_two_run_roots_committing_at_once_each_reach_only_their_own_store(stores):
    uri = f"s3://{BUCKET}/same/run"  # the same URI on both servers: only the settings differ
    marks = {name: server.mark() for name, (server, _) in stores.items()}
    barrier = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def commit(name: str) -> None:
        try:
            store = CommitStore(RunRoot(uri, stores[name][1]))
            barrier.wait(timeout=60)
            for rg in range(8):
                store.commit_table("embed", 0, rg, pa.table({"store": [name]}))
            lease.acquire(store, f"dag/{name}")
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=(name,)) for name in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for name, (server, options) in stores.items():
        store = CommitStore(RunRoot(uri, options))
        assert store.completed("embed", 0) == set(range(8))
        assert {store.read_table("embed", 0, rg).column("store")[0].as_py() for rg in range(8)} == {name}
        assert lease.read_lease(store).owner == f"dag/{name}"
        puts = [r.key for r in server.requests(marks[name]) if r.kind == "PUT"]
        assert len(puts) >= 9 and all(k.startswith("same/run/") for k in puts), puts


def _upload(local_dir: str, root: RunRoot) -> None:
    fs, path = root.filesystem()
    for name in sorted(os.listdir(local_dir)):
        with open(os.path.join(local_dir, name), "rb") as src, fs.open_output_stream(f"{path}/{name}") as dst:
            dst.write(src.read())


@pytest.mark.slow
def test_two_runs_interleaved_step_by_step_each_use_their_own_store(stores, local_run, tmp_path):
    """Run ``a`` reads its shards from server a and writes to local disk; run ``b`` reads and
    writes on server b. Every step of ``a`` is followed by the same step of ``b``."""
    for _, options in stores.values():
        _upload(local_run["shards"], RunRoot(f"s3://{BUCKET}/shards", options))
    marks = {name: server.mark() for name, (server, _) in stores.items()}
    shards = f"s3://{BUCKET}/shards/shard-*.tar"
    cfgs = {
        "a": CurationConfig(input_uri=shards, output_root=str(tmp_path / "out"), run_key="a", **SMALL,
                            storage=stores["a"][1]),
        "b": CurationConfig(input_uri=shards, output_root=f"s3://{BUCKET}/out", run_key="b", **SMALL,
                            storage=stores["b"][1]),
    }
    partitions: dict[str, list[int]] = {}
    summaries: dict[str, list[dict]] = {name: [] for name in cfgs}
    for scope, specs in run_phases():  # the DAG's tasks in its order, each for a then for b
        for name, cfg in cfgs.items():
            step = {"owner": f"dag/{name}", "execution": LOCAL}
            if scope == "global":
                result = pipeline.run_global(cfg, specs[0].name, **step)
                partitions.setdefault(name, list(result.get("partitions", [])))
            elif scope == "bucket":
                assert not pipeline.run_buckets(cfg, specs[0].name, **step).failed
            else:
                for p in partitions[name]:
                    for spec in specs:
                        summary = pipeline.run_partition(cfg, spec.name, p, **step)
                        assert summary.ok, summary.failed
                        summaries[name].append(summary.to_dict())
    for name, cfg in cfgs.items():
        report = pipeline.run_report(cfg, summaries[name], owner=f"dag/{name}")
        assert counts_of(report) == counts_of(local_run["summary"]), name
        assert SECRET_KEY not in json.dumps(report, default=str)
    assert os.path.exists(tmp_path / "out" / "a" / pipeline.SUMMARY_FILE)
    # What each server was asked about: an object's key, or a listing's prefix.
    keys = {name: {r.key or (r.query.get("prefix") or [""])[0] for r in server.requests(marks[name])}
            for name, (server, _) in stores.items()}
    assert keys["a"] and all(k.startswith("shards/") for k in keys["a"]), keys["a"]  # a's output is local
    assert any(k.startswith("out/b/") for k in keys["b"])
    assert all(k.startswith(("shards/", "out/b/")) for k in keys["b"]), keys["b"]
