"""Storage: index and commit throughput and the request bill, local disk vs an S3 endpoint.

    python benchmarks/storage_throughput.py [--images 2000] [--shards 8] [--commits 64]
        [--runs 3] [--workdir /tmp/winnow-bench-storage]

The S3 endpoint is moto's standalone server on 127.0.0.1 (the one the tests use), so the S3
figures are this machine's loopback plus a single-process Python server, not a cloud bucket:
they show what the protocol costs in requests and how the code behaves, and bound the
throughput from below. Measured, each the median of ``--runs``:

- index: ``build_index`` of the same shards into a fresh run root, records/s (the S3 run reads
  its shards from the bucket, by a glob);
- commit: ``commit_table`` of ``--commits`` embed-sized row groups (256 rows of 768-d float16,
  ~0.4 MB of Parquet each) and ``commit_bytes`` of 8 MB tars, commits/s and MB/s;
- requests (S3 only, from the server's own log): a whole run (tiny model, the engine calls of
  ``run_all`` in its order, without Ray) and a rerun of it, split by the DAG's tasks.

``--smoke`` runs it all on tiny data in seconds (the test suite does, so the script cannot rot).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import TINY_CURATION, Timer, add_smoke, apply_smoke, describe, ensure_sample, machine, median  # noqa: E402

from benchmarks._s3server import S3Server  # noqa: E402  (the tests' server, same settings; _common put the repo on sys.path)


def _root(uri: str):
    """``uri`` as a run root reached with the AWS_* environment main set (the S3 server's), or
    a local folder: this benchmark is the run's entry point."""
    from winnow.rowgroups.fs import RunRoot, StorageOptions

    return RunRoot(uri, StorageOptions.from_env())


def _upload(local_dir: str, uri: str) -> None:
    fs, root = _root(uri).filesystem()
    for name in sorted(os.listdir(local_dir)):
        if name.endswith(".tar"):
            with open(os.path.join(local_dir, name), "rb") as src, fs.open_output_stream(f"{root}/{name}") as dst:
                dst.write(src.read())


def bench_index(input_uri: str, out_root: str, runs: int) -> dict:
    from winnow.data.index import IndexConfig, build_index

    rates, records = [], 0
    for i in range(runs):
        with Timer() as t:
            result = build_index(_root(f"{out_root}/index-{i}-{time.time_ns()}"),
                                 IndexConfig(input_uri=input_uri, buffer_size=256, max_partitions=8))
        records = result.num_records
        rates.append(records / t.seconds)
    return {"records": records, "records_per_s": round(median(rates), 1)}


def bench_commits(run_root: str, commits: int, runs: int, tar_mb: int = 8) -> dict:
    import numpy as np
    import pyarrow as pa

    from winnow.rowgroups import CommitStore

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((256, 768)).astype(np.float16)
    table = pa.table({"record_id": pa.array(range(256), pa.int64()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 768)})
    from winnow.rowgroups.store import table_to_parquet_bytes

    parquet_mb = len(table_to_parquet_bytes(table)) / 2**20
    tar = rng.integers(0, 255, tar_mb << 20, dtype=np.uint8).tobytes()
    small, big = [], []
    for i in range(runs):
        store = CommitStore(_root(f"{run_root}/commit-{i}-{time.time_ns()}"))
        with Timer() as t:
            for rg in range(commits):
                store.commit_table("embed", rg // 16, rg, table)
        small.append(t.seconds)
        with Timer() as t:
            for rg in range(8):
                store.commit_bytes("write", 0, rg, tar, suffix=".tar")
        big.append(t.seconds)
    s, b = median(small), median(big)
    return {
        "parquet_commits_per_s": round(commits / s, 1), "parquet_mb_per_s": round(commits * parquet_mb / s, 1),
        "parquet_mb_each": round(parquet_mb, 2), f"tar_{tar_mb}mb_commits_per_s": round(8 / b, 2),
        "tar_mb_per_s": round(8 * tar_mb / b, 1),
    }


def _kinds(reqs) -> dict:
    return dict(collections.Counter(r.kind for r in reqs))


def bench_requests(server: S3Server, input_uri: str, output_root: str) -> dict:
    """A whole run and its rerun, requests split by the DAG's tasks: the registry's phases (as
    ``run_all`` walks them), each engine call with the local backend."""
    from winnow import pipeline
    from winnow.exceptions import BucketsFailedError, RowGroupsFailedError
    from winnow.execution import LOCAL
    from winnow.pipeline import CurationConfig
    from winnow.registry import run_phases

    params = {k: v for k, v in TINY_CURATION.items() if k in {f for f in CurationConfig.__dataclass_fields__}}
    params.update(buffer_size=25, max_partitions=4)
    cfg = CurationConfig(input_uri=input_uri, output_root=output_root, run_key=f"run-{time.time_ns()}", **params,
                         storage=_root(output_root).storage)
    out = {}
    for label in ("first run", "rerun"):
        owner = f"bench/{label}"
        split: dict[str, dict] = {}
        summaries: list[dict] = []
        partitions: list[int] = []
        for scope, specs in run_phases():
            names = [s.name for s in specs]
            mark = server.mark()
            if scope == "global":
                result = pipeline.run_global(cfg, names[0], owner=owner, execution=LOCAL)
                if names[0] == "index":
                    partitions = list(result["partitions"])
            elif scope == "bucket":
                failed = pipeline.run_buckets(cfg, names[0], owner=owner, execution=LOCAL).failed
                if failed:
                    raise BucketsFailedError(names[0], failed)
            else:
                for p in partitions:
                    for name in names:
                        s = pipeline.run_partition(cfg, name, p, execution=LOCAL, owner=owner)
                        if not s.ok:
                            raise RowGroupsFailedError([s])
                        summaries.append(s.to_dict())
            split[f"{'/'.join(names)} task{'s' if scope != 'global' else ''}"] = _kinds(server.requests(mark))
        mark = server.mark()
        pipeline.run_report(cfg, summaries, owner=owner)
        split["report"] = _kinds(server.requests(mark))
        out[label] = split
    plan = pipeline.load_plan(cfg)
    out["plan"] = {"records": plan.num_records, "row_groups": plan.num_row_groups, "partitions": plan.num_partitions}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--commits", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/winnow-bench-storage")
    add_smoke(ap)
    args = ap.parse_args()
    apply_smoke(args, images=8, shards=2, commits=4, runs=1, workdir=None)

    os.makedirs(args.workdir, exist_ok=True)
    shards = os.path.join(args.workdir, "shards")
    ensure_sample(shards, shards=args.shards, per_shard=args.images // args.shards)
    small = os.path.join(args.workdir, "shards-small")
    ensure_sample(small, shards=2, per_shard=6 if args.smoke else 100)
    tar_mb = 1 if args.smoke else 8
    local_out = os.path.join(args.workdir, "out")
    shutil.rmtree(local_out, ignore_errors=True)

    server = S3Server(os.path.join(args.workdir, "s3-requests.log"))
    try:
        os.environ.update(server.env())
        server.create_bucket("bench")
        _upload(shards, "s3://bench/shards")
        _upload(small, "s3://bench/shards-small")
        before = machine()
        result = {
            "index": {"local": bench_index(shards, local_out, args.runs),
                      "s3": bench_index("s3://bench/shards/*.tar", "s3://bench/out", args.runs)},
            "commit": {"local": bench_commits(local_out, args.commits, args.runs, tar_mb),
                       "s3": bench_commits("s3://bench/out", args.commits, args.runs, tar_mb)},
        }
        mark = server.mark()
        bench_index("s3://bench/shards/*.tar", "s3://bench/out", 1)
        result["index"]["s3_requests"] = _kinds(server.requests(mark))
        mark = server.mark()
        bench_commits("s3://bench/out", args.commits, 1, tar_mb)
        result["commit"]["s3_requests"] = _kinds(server.requests(mark))
        result["requests"] = bench_requests(server, "s3://bench/shards-small/*.tar", "s3://bench/out")
        after = machine()
    finally:
        server.stop()
    result["machine_before"], result["machine_after"] = before, after
    print(json.dumps(result, indent=2))
    print(f"machine: {describe(before)} (before), {describe(after)} (after)")


if __name__ == "__main__":
    main()
