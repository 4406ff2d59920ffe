"""Light stages: one partition computed in the calling process vs in a Ray Data execution.

The registry marks the stages whose work per record is small (``light``: the score heads over
embeddings, the dedup flags, the status rows, the write of kept records). A partition of such a
stage with few records to compute runs in the calling process (``winnow.ray.runner.in_driver``),
because a Ray Data execution costs a fixed ~0.2-0.6 s before its first row group. This script
measures both ways per stage and partition size, to place the threshold
(``IN_DRIVER_MAX_RECORDS``):

    python benchmarks/in_driver.py --sizes 500,2000,8000 --runs 3 --json /tmp/winnow-bench/in_driver.json

For each size: a run of one partition (``buffer_size`` 250) is curated once (tiny model, an
embedded local Ray started before any clock); then, per light stage, its committed row groups
are removed and the partition computed again, alternately in the driver
(``WINNOW_IN_DRIVER_MAX_RECORDS`` = the size) and on Ray (``0``), with the Ray workers warm as
they are after embed in a real run. Medians of ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import TINY_CURATION, add_smoke, apply_smoke, describe, ensure_sample, machine  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="500,2000,8000", help="records in the partition, comma list")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--buffer-size", type=int, default=250)
    ap.add_argument("--workdir", default="/tmp/winnow-bench")
    ap.add_argument("--json")
    add_smoke(ap)
    args = ap.parse_args(argv)
    apply_smoke(args, sizes="16", runs=1, buffer_size=4, workdir=None)

    from winnow.execution import Execution
    from winnow.pipeline import CurationConfig, run_all, run_partition
    from winnow.ray.cluster import connect
    from winnow.ray.runner import IN_DRIVER_ENV
    from winnow.registry import STAGES

    light = [s.name for s in STAGES if s.light]
    print(describe(machine()), flush=True)
    connect(None)
    execution = Execution()
    work = Path(args.workdir)
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    for size in (int(x) for x in args.sizes.split(",")):
        shards = max(1, size // 250)
        input_dir = str(work / f"sample-{shards}x{size // shards}")
        ensure_sample(input_dir, shards=shards, per_shard=size // shards, seed=0)
        out = work / "in-driver-runs"
        shutil.rmtree(out, ignore_errors=True)
        cfg = CurationConfig.from_params({"input_uri": input_dir, "output_root": str(out), "run_key": f"s{size}",
                                          "buffer_size": args.buffer_size, "max_partitions": 1, **TINY_CURATION})
        run_all(cfg, backend="ray", log=lambda _line: None)
        root = Path(cfg.run_root)
        results[str(size)] = {}
        for stage in light:
            times: dict[str, list[float]] = {"driver": [], "ray": []}
            for _ in range(args.runs):
                for where, limit in (("driver", size), ("ray", 0)):
                    for part in (root / stage).glob("p*"):
                        shutil.rmtree(part)
                    os.environ[IN_DRIVER_ENV] = str(limit)
                    t0 = time.perf_counter()
                    summary = run_partition(cfg, stage, 0, execution=execution, log=lambda _line: None)
                    times[where].append(time.perf_counter() - t0)
                    if summary.failed or summary.computed != summary.row_groups:
                        raise RuntimeError(f"{stage} at {size}: {summary}")
            results[str(size)][stage] = times
            d, r = statistics.median(times["driver"]), statistics.median(times["ray"])
            print(f"{size:>6} records  {stage:<10} driver {d:6.2f} s  ray {r:6.2f} s  ray/driver {r / d:5.2f}  "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
        os.environ.pop(IN_DRIVER_ENV, None)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine_end": machine(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
