"""Index throughput: the serial index vs the parallel one (shard groups scanned by Ray tasks).

Writes ``--shards`` tar shards of ``--per-shard`` records each (a small jpg-named member and a
``.txt`` per record: the index reads tar headers only, so payload size does not matter), then
indexes them into fresh run roots: ``serial`` (this process: the serial reference the tests
check ``build_index`` against, ``benchmarks/_reference/index.py``) and ``ray`` (an embedded local Ray,
started before the clock; with ``WINNOW_RAY_EMBEDDED=shared`` it attaches to the shared local
head). Alternates serial, ray, serial, ray...; reports records/s per run and the median, with
the load average at the start of each run.

    python benchmarks/index_scale.py --shards 1000 --per-shard 100 --runs 3 --json /tmp/winnow-bench/index_scale.json

``--s3`` reads the shards from (and writes the run roots to) moto's S3 server on loopback, the
one the tests use: a single-process Python server, so its figures show the protocol's request
costs on this machine, not a cloud bucket's throughput.

Scripts, not tests: nothing here is collected by pytest.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path

from _common import add_smoke, apply_smoke, describe, machine


def write_shards(folder: Path, shards: int, per_shard: int, image_bytes: int = 100) -> None:
    stamp = folder / "_bench_params.json"
    params = {"shards": shards, "per_shard": per_shard, "image_bytes": image_bytes}
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:06d}.tar", "w") as tar:
            for r in range(per_shard):
                # distinct bytes per image (the index hashes them: no image is another's exact duplicate)
                image = b"\xff\xd8" + (s * per_shard + r).to_bytes(8, "little") + bytes(max(0, image_bytes - 10))
                for ext, data in (("jpg", image), ("txt", b"caption")):
                    info = tarfile.TarInfo(f"{s:06d}{r:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    stamp.write_text(json.dumps(params))


def _s3(work: Path, shards: Path):
    """moto's S3 server on loopback (the tests' one), its settings in this process's environment
    (where main reads them, once: Ray tasks get them inside their work), and the shards uploaded once."""
    from benchmarks._s3server import S3Server  # the repo root is on sys.path (_common)
    from winnow.rowgroups.fs import StorageOptions, resolve_filesystem

    server = S3Server(str(work / "s3-requests.log"))
    os.environ.update(server.env())
    server.create_bucket("bench")
    fs, root = resolve_filesystem("s3://bench/index-scale", StorageOptions.from_env())
    for tar in sorted(shards.glob("*.tar")):
        with fs.open_output_stream(f"{root}/{tar.name}") as dst:
            dst.write(tar.read_bytes())
    return server


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--per-shard", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--buffer-size", type=int, default=4096)
    ap.add_argument("--image-bytes", type=int, default=100,
                    help="bytes of each image member (the index reads and hashes them; sample images are ~60,000)")
    ap.add_argument("--work", default="/tmp/winnow-bench/index_scale")
    ap.add_argument("--backends", default="serial,ray",
                    help="comma list of: serial (the tests' serial reference), ray, local (build_index's backends; "
                         "local: the parallel algorithm in this process)")
    ap.add_argument("--json")
    ap.add_argument("--s3", action="store_true",
                    help="read the shards from, and write the run roots to, a local S3 endpoint (moto, as the tests use)")
    add_smoke(ap)
    args = ap.parse_args()
    apply_smoke(args, shards=3, per_shard=4, runs=1, buffer_size=4, work=None, backends="serial,local", image_bytes=100)

    from benchmarks._reference.index import build_index_serial  # the repo root is on sys.path (_common)
    from winnow.data.index import IndexConfig, build_index
    from winnow.execution import Execution
    from winnow.ray.cluster import connect
    from winnow.rowgroups.fs import RunRoot, StorageOptions

    work = Path(args.work)
    shards = work / "input"
    write_shards(shards, args.shards, args.per_shard, args.image_bytes)
    print(describe(machine()), flush=True)
    import ray

    backends = args.backends.split(",")
    for attempt in range(4 if "ray" in backends else 0):  # Ray's start is not the index's work; a loaded machine can miss its 30 s
        try:
            connect(None)
            break
        except Exception as exc:
            print(f"Ray start failed (try {attempt + 1}): {exc}", flush=True)
            ray.shutdown()
            time.sleep(5)
    server = None
    input_uri, out = str(shards), str(work)
    if args.s3:
        server = _s3(work, shards)
        input_uri, out = "s3://bench/index-scale/*.tar", f"s3://bench/out-{time.time_ns()}"
    config = IndexConfig(input_uri=input_uri, buffer_size=args.buffer_size, max_partitions=64)
    storage = StorageOptions.from_env()  # the S3 server's, set by _s3 (where the runs store)
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    try:
        for i in range(args.runs):
            for backend in backends:
                root = RunRoot(f"{out}/run-{backend}-{i}", storage)
                shutil.rmtree(root.uri, ignore_errors=True)
                load = [round(x, 2) for x in os.getloadavg()]
                t0 = time.perf_counter()
                if backend == "serial":
                    result = build_index_serial(root, config)
                else:
                    result = build_index(root, config, execution=Execution(backend=backend))
                seconds = time.perf_counter() - t0
                run = {"seconds": round(seconds, 2), "records_per_s": round(result.num_records / seconds),
                       "load_at_start": load}
                runs[backend].append(run)
                print(backend, json.dumps(run), flush=True)
                shutil.rmtree(root.uri, ignore_errors=True)
    finally:
        if server is not None:
            server.stop()
    summary = {b: {"median_records_per_s": statistics.median(r["records_per_s"] for r in rs), "runs": rs}
               for b, rs in runs.items()}
    summary["records"] = args.shards * args.per_shard
    summary["machine_at_end"] = machine()
    print(json.dumps({b: summary[b]["median_records_per_s"] for b in runs}), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
