"""A whole run on an S3 endpoint that throttles, next to the same run on one that does not.

    python benchmarks/throttled_run.py [--images 256] [--throttle 0.10] [--reset 0.01] [--runs 3]
        [--workdir /tmp/winnow-bench-throttled]

The endpoint is the tests' S3 server (moto on 127.0.0.1), reached directly (unthrottled) or
through ``benchmarks/_s3proxy.py`` answering a seeded share of requests ``503 SlowDown`` and
resetting a share of connections. Each run is ``run_all`` of the same sample shards into a fresh
run key (tiny model, the engine's local backend: one process, so the figures are the storage
layer's and not Ray's), in turn: straight to the server, through the proxy with no faults (what
the proxy itself costs: it opens a connection to the server per request), and through the proxy
throttling; ``--runs`` of each. Printed: the median wall time of each, the ratios, the retried
and throttled requests the summaries count, and what the proxy answered. Every throttled run's counts must equal the unthrottled run's.

``--smoke`` runs one tiny pair (the test suite does, so the script cannot rot).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import TINY_CURATION, add_smoke, apply_smoke, describe, ensure_sample, machine, median  # noqa: E402

from benchmarks._s3proxy import ThrottlingProxy  # noqa: E402
from benchmarks._s3server import S3Server  # noqa: E402

NOT_COUNTS = {"run_root", "write_dir", "config", "seconds", "storage_retries", "storage_throttled",
              "row_groups_computed", "row_groups_skipped", "row_groups_by_stage"}


def _upload(env: dict, local_dir: str, uri: str) -> None:
    from winnow.rowgroups.fs import RunRoot, StorageOptions

    fs, root = RunRoot(uri, StorageOptions.from_env(env)).filesystem()
    for name in sorted(os.listdir(local_dir)):
        if name.endswith(".tar"):
            with open(os.path.join(local_dir, name), "rb") as src, fs.open_output_stream(f"{root}/{name}") as dst:
                dst.write(src.read())


def _run(env: dict, run_key: str, buffer_size: int) -> tuple[float, dict]:
    from winnow.pipeline import CurationConfig, run_all
    from winnow.rowgroups.fs import StorageOptions

    cfg = CurationConfig(input_uri="s3://bench/shards/", output_root="s3://bench/out", run_key=run_key,
                         buffer_size=buffer_size, max_partitions=4, **TINY_CURATION,
                         storage=StorageOptions.from_env(env))
    t0 = time.perf_counter()
    summary = run_all(cfg, backend="local")
    return time.perf_counter() - t0, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--throttle", type=float, default=0.10)
    ap.add_argument("--reset", type=float, default=0.01)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/winnow-bench-throttled")
    add_smoke(ap)
    args = ap.parse_args()
    apply_smoke(args, images=16, runs=1, workdir=None)
    os.makedirs(args.workdir, exist_ok=True)
    shards = max(2, args.images // 64)
    sample_dir = os.path.join(args.workdir, "shards")
    ensure_sample(sample_dir, shards=shards, per_shard=args.images // shards)
    logs = tempfile.mkdtemp(prefix="throttled-", dir=args.workdir)
    server = S3Server(os.path.join(logs, "s3.log"))
    proxy = None
    try:
        server.create_bucket("bench")
        direct = server.env()
        _upload(direct, sample_dir, "s3://bench/shards")
        proxy = ThrottlingProxy(server.endpoint, os.path.join(logs, "proxy.log"), os.path.join(logs, "control.json"),
                                seed=0)
        throttled_env = proxy.env()
        buffer_size = max(4, args.images // 16)
        times = {"unthrottled": [], "proxy_no_faults": [], "throttled": []}
        retries, throttled_counts, reference = [], [], None
        outcomes: collections.Counter = collections.Counter()
        for i in range(args.runs):
            seconds, summary = _run(direct, f"plain-{i}", buffer_size)
            times["unthrottled"].append(seconds)
            counts = {k: v for k, v in summary.items() if k not in NOT_COUNTS}
            reference = reference or counts
            seconds, summary = _run(throttled_env, f"proxied-{i}", buffer_size)  # the proxy's own cost
            times["proxy_no_faults"].append(seconds)
            mark = proxy.mark()
            proxy.set(throttle=args.throttle, reset=args.reset)
            try:
                seconds, summary = _run(throttled_env, f"throttled-{i}", buffer_size)
            finally:
                proxy.set()
            times["throttled"].append(seconds)
            outcomes.update(proxy.outcomes(mark))
            if {k: v for k, v in summary.items() if k not in NOT_COUNTS} != reference:
                raise SystemExit(f"the throttled run's counts differ from the unthrottled run's: {summary}")
            retries.append(summary["storage_retries"])
            throttled_counts.append(summary["storage_throttled"])
        result = {
            "images": args.images, "throttle": args.throttle, "reset": args.reset, "runs": args.runs,
            "unthrottled_s": round(median(times["unthrottled"]), 2),
            "proxy_no_faults_s": round(median(times["proxy_no_faults"]), 2),
            "throttled_s": round(median(times["throttled"]), 2),
            "ratio_to_unthrottled": round(median(times["throttled"]) / median(times["unthrottled"]), 2),
            "ratio_to_proxy_no_faults": round(median(times["throttled"]) / median(times["proxy_no_faults"]), 2),
            "storage_retries_median": median(retries), "storage_throttled_median": median(throttled_counts),
            "proxy_answers_in_the_throttled_runs": dict(outcomes), "load_average_at_start": os.getloadavg()[0],
            "machine": describe(machine()),
        }
        print(json.dumps(result, indent=2))
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()


if __name__ == "__main__":
    main()
