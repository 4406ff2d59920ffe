"""Plan scale: build time and peak memory of row-group plans, and a near-complete resume.

    python benchmarks/plan_scale.py [--runs 5] [--resume-partitions 16]

Part 1 builds plans of 10^6, 10^8 and 10^9 row groups and answers every kind of query on them
(tracemalloc peak, median wall time). Part 2 is a resume of a 10^6-row-group run with 2 row
groups missing: each partition lists only its own prefix, so the cost per partition is what
matters; we commit real (empty-table) files for a sample of partitions, including the two that
hold the missing row groups, and time each partition's "what is left to do" step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _common import add_smoke, apply_smoke  # noqa: E402

from winnow.rowgroups import CommitStore, RowGroupPlan  # noqa: E402


def plan_queries(num_row_groups: int) -> tuple[float, int]:
    tracemalloc.start()
    t0 = time.perf_counter()
    plan = RowGroupPlan(num_row_groups * 100, 100, max_partitions=1024)
    g = plan.num_row_groups
    for rg in (0, g // 7, g // 2, g - 1):
        p = plan.partition_of(rg)
        assert rg in plan.partition_row_groups(p)
        plan.row_group_range(rg)
    plan.partition_row_groups(plan.num_partitions - 1)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak


def resume(sample_partitions: int, runs: int) -> dict:
    plan = RowGroupPlan(10**6 * 10, 10, max_partitions=1024)
    missing = {123_456, 876_543}
    hot = sorted({plan.partition_of(rg) for rg in missing})
    step = max(1, plan.num_partitions // sample_partitions)
    partitions = sorted(set(range(0, plan.num_partitions, step)) | set(hot))
    with tempfile.TemporaryDirectory() as root:
        store = CommitStore(root)
        for p in partitions:
            folder = store.partition_dir("embed", p)
            os.makedirs(folder, exist_ok=True)
            for rg in plan.partition_row_groups(p):
                if rg not in missing:
                    open(store.row_group_path("embed", p, rg), "wb").close()
        times = []
        scheduled: list[int] = []
        for _ in range(runs):
            scheduled = []
            per = []
            for p in partitions:
                t0 = time.perf_counter()
                done = store.completed("embed", p, clean_temp=True)
                todo = [rg for rg in plan.partition_row_groups(p) if rg not in done]
                per.append(time.perf_counter() - t0)
                scheduled.extend(todo)
            times.append(statistics.median(per))
    assert sorted(scheduled) == sorted(missing), scheduled
    return {
        "row_groups": plan.num_row_groups,
        "partitions": plan.num_partitions,
        "row_groups_per_partition": len(plan.partition_row_groups(0)),
        "partitions_sampled": len(partitions),
        "scheduled": sorted(scheduled),
        "median_seconds_per_partition": statistics.median(times),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--resume-partitions", type=int, default=16)
    add_smoke(ap)
    args = ap.parse_args()
    apply_smoke(args, runs=1, resume_partitions=1)
    print("| row groups | median build+query time | peak memory (tracemalloc) |")
    print("|---:|---:|---:|")
    for exp in (6, 8, 9):
        results = [plan_queries(10**exp) for _ in range(args.runs)]
        t = statistics.median(r[0] for r in results)
        peak = max(r[1] for r in results)
        print(f"| 10^{exp} | {t * 1e6:.1f} µs | {peak} B |")
    r = resume(args.resume_partitions, args.runs)
    print()
    print(
        f"near-complete resume: {r['row_groups']} row groups in {r['partitions']} partitions "
        f"(~{r['row_groups_per_partition']} each), 2 missing; scheduled {r['scheduled']}; "
        f"median {r['median_seconds_per_partition'] * 1e3:.2f} ms per partition to find its work "
        f"({r['partitions_sampled']} partitions committed on disk and listed)"
    )


if __name__ == "__main__":
    main()
