"""The request bill of a run: every request a whole ``run_all`` makes to an S3 endpoint, by step
(the DAG's task that made it), by object (what it touched) and by kind, for a first run and for
a rerun of the same run key with everything committed; checked against the formula in
``docs/request_bill.md`` for two run sizes.

    python benchmarks/request_bill.py [--workdir /tmp/winnow-bench-bill] [--json bill.json]

The endpoint is moto's standalone server on 127.0.0.1 (the one the tests use); its own log counts
every request, whichever client sent it (pyarrow's S3 filesystem or botocore's conditional
writes). The run is ``run_all`` with the local backend (no Ray: the requests are the same, Ray only
moves where they are sent from); each engine call ``run_all`` makes (``run_global``,
``run_partition``, ``run_buckets``, ``run_report``) is wrapped to mark the log before and after it,
so each request belongs to one step. The two sizes differ in records N, row groups G, partitions P,
dedup buckets B and shards S.

``--smoke`` runs the smaller size only (the test suite does, so the script cannot rot).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import TINY_CURATION, add_smoke, apply_smoke, describe, ensure_sample, machine  # noqa: E402

from benchmarks._s3server import S3Server  # noqa: E402  (the tests' server; _common put the repo on sys.path)

BUCKET = "bill"
KINDS = ("LIST", "HEAD", "GET", "PUT", "POST", "DELETE")

#: The two run sizes: sample shards (S shards of ``per_shard`` records) and the plan's knobs.
SIZES = {
    "small": {"shards": 2, "per_shard": 12, "buffer_size": 4, "max_partitions": 3, "dedup_buckets": 2},
    "large": {"shards": 3, "per_shard": 16, "buffer_size": 5, "max_partitions": 4, "dedup_buckets": 3},
}


# ---- attribution ------------------------------------------------------------------------------

def object_class(req, run_prefix: str, input_prefix: str) -> str:
    """What a request touched, from its key (a LIST: its ``prefix`` query): ``shard``, ``lease``,
    ``summary``, ``<stage>/_stage.json``, ``<stage>/rg`` (a row group's file), ``<stage>/failed``
    (a failure record), ``<stage>/list`` (a listing under the stage folder), ``<stage>/other``
    (any other file of the stage: the index's metadata, centroids, thresholds, markers...)."""
    if req.kind == "LIST":
        key = (req.query.get("prefix") or [""])[0]
    else:
        key = req.key
    if key.startswith(input_prefix):
        return "shard/list" if req.kind == "LIST" else "shard"
    if not key.startswith(run_prefix):
        return "other"
    rel = key[len(run_prefix):].lstrip("/")
    if rel in ("_lease.json",):
        return "lease"
    if rel == "_summary.json":
        return "summary"
    stage, _, rest = rel.partition("/")
    if not stage:
        return "run/list"
    if req.kind == "LIST":
        return f"{stage}/list"
    if rest == "_stage.json":
        return f"{stage}/_stage.json"
    name = rest.rsplit("/", 1)[-1]
    if name.endswith(".failed.json"):
        return f"{stage}/failed"
    if rest.startswith("p") and name.startswith("rg"):
        return f"{stage}/rg"
    return f"{stage}/other"


def kinds(reqs) -> dict[str, int]:
    c = collections.Counter(r.kind for r in reqs)
    return {k: c[k] for k in KINDS if c[k]}


@contextlib.contextmanager
def steps_recorded(server: S3Server, record: list):
    """While inside: every engine call ``run_all`` makes appends ``(step, partition, requests)``
    to ``record`` (the requests the server logged during that call)."""
    from winnow import pipeline

    saved = {name: getattr(pipeline, name) for name in ("run_global", "run_partition", "run_buckets", "run_report")}

    def wrap(name, fn):
        def call(*args, **kwargs):
            if name in ("run_global", "run_partition", "run_buckets"):
                step = args[1]
            else:
                step = "report"
            partition = args[2] if name == "run_partition" else None
            mark = server.mark()
            try:
                return fn(*args, **kwargs)
            finally:
                record.append((step, partition, server.requests(mark)))
        return call

    for name, fn in saved.items():
        setattr(pipeline, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(pipeline, name, fn)


def measure_run(server: S3Server, cfg, label: str) -> dict:
    """One ``run_all`` of ``cfg`` (local backend), its requests by step, object and kind."""
    from winnow.pipeline import run_all

    record: list = []
    start = server.mark()
    with steps_recorded(server, record):
        run_all(cfg, backend="local", owner=f"bill/{label}")
    everything = server.requests(start)
    run_prefix = cfg.run_root[len(f"s3://{BUCKET}/"):]
    input_prefix = cfg.input_uri[len(f"s3://{BUCKET}/"):].split("*")[0]
    by_step: dict[str, dict] = {}
    per_task: dict[str, list[dict]] = {}  # partition steps: requests of each task, by kind
    for step, partition, reqs in record:
        entry = by_step.setdefault(step, {"tasks": 0, "kinds": collections.Counter(), "objects": {}})
        entry["tasks"] += 1
        entry["kinds"].update(kinds(reqs))
        for r in reqs:
            cls = object_class(r, run_prefix, input_prefix)
            entry["objects"].setdefault(cls, collections.Counter())[r.kind] += 1
        if partition is not None:
            per_task.setdefault(step, []).append(kinds(reqs))
    inside = sum(len(reqs) for _, _, reqs in record)
    rest = everything[inside:] if len(everything) >= inside else []
    # run_all's own requests outside the steps: its final lease release.
    entry = {"tasks": 1, "kinds": collections.Counter(kinds(rest)), "objects": {}}
    for r in rest:
        entry["objects"].setdefault(object_class(r, run_prefix, input_prefix), collections.Counter())[r.kind] += 1
    by_step["run_all"] = entry
    out = {}
    for step, e in by_step.items():
        out[step] = {"tasks": e["tasks"], "kinds": dict(e["kinds"]),
                     "objects": {cls: dict(c) for cls, c in sorted(e["objects"].items())}}
        if step in per_task:
            out[step]["per_task"] = per_task[step]
    return {"steps": out, "total": kinds(everything), "requests": len(everything)}


# ---- the formula ------------------------------------------------------------------------------

#: The partition stages (one task per partition each) and the global steps between them.
PARTITION_STEPS = ("embed", "aesthetic", "nsfw", "clip_score", "assign", "dedup", "status", "write")


def rerun_bill(*, g: int, p: int, s: int) -> dict[str, dict[str, int]]:
    """The requests of a rerun with everything committed, per step and kind (docs/request_bill.md
    derives each term). Exact on this code: every term is a listing or a small file per stage,
    partition, row group or shard; the shard terms were measured with one scan group (S <= 64)."""
    bill = {
        "index": {"LIST": p + 4, "GET": 3 * s + 17, "PUT": 1},
        "thresholds": {"LIST": 3 * p, "GET": 5},
        "centroids": {"LIST": 5 * p, "GET": 5},
        "pairwise": {"LIST": 1, "GET": 8},
        # (+19 GETs and 2 PUTs: the dataset card, built from the stored files and written beside
        # the summary)
        "report": {"LIST": 2 * p + 5, "HEAD": 4, "GET": 2 * g + s + 25, "PUT": 3, "DELETE": 1},
        "run_all": {"GET": 1},
    }
    for step in PARTITION_STEPS:  # per task: the lease and the stage's _stage.json, its listing
        bill[step] = {"LIST": p, "GET": 2 * p}
    return bill


def check_rerun(measured: dict, plan: dict) -> list[str]:
    """Where a measured rerun differs from :func:`rerun_bill` (empty: it matches exactly)."""
    want = rerun_bill(g=plan["G"], p=plan["P"], s=plan["S"])
    out = []
    for step in sorted(set(want) | set(measured["steps"])):
        got = measured["steps"].get(step, {}).get("kinds", {})
        if got != want.get(step, {}):
            out.append(f"{step}: measured {got}, formula {want.get(step, {})}")
    return out


# ---- the runs ---------------------------------------------------------------------------------

def run_size(server: S3Server, workdir: str, name: str, size: dict) -> dict:
    from winnow.pipeline import CurationConfig
    from winnow.rowgroups.fs import RunRoot, StorageOptions

    local = os.path.join(workdir, f"shards-{name}")
    ensure_sample(local, shards=size["shards"], per_shard=size["per_shard"])
    input_prefix = f"s3://{BUCKET}/{name}/shards"
    fs, root = RunRoot(input_prefix, StorageOptions.from_env()).filesystem()
    for fname in sorted(os.listdir(local)):
        if fname.endswith(".tar"):
            with open(os.path.join(local, fname), "rb") as src, fs.open_output_stream(f"{root}/{fname}") as dst:
                dst.write(src.read())
    params = {k: v for k, v in TINY_CURATION.items() if k in CurationConfig.__dataclass_fields__}
    params.update(buffer_size=size["buffer_size"], max_partitions=size["max_partitions"],
                  dedup_buckets=size["dedup_buckets"])
    cfg = CurationConfig(input_uri=f"{input_prefix}/*.tar", output_root=f"s3://{BUCKET}/{name}/out",
                         run_key=f"run-{time.time_ns()}", storage=StorageOptions.from_env(), **params)
    out = {"size": size}
    t0 = time.perf_counter()
    out["first"] = measure_run(server, cfg, "first")
    out["first_seconds"] = round(time.perf_counter() - t0, 1)
    out["rerun"] = measure_run(server, cfg, "rerun")
    from winnow.pipeline import load_plan

    plan = load_plan(cfg)
    out["plan"] = {"N": plan.num_records, "G": plan.num_row_groups, "P": plan.num_partitions,
                   "B": size["dedup_buckets"], "S": size["shards"]}
    return out


def table(result: dict) -> str:
    lines = []
    for label in ("first", "rerun"):
        run = result[label]
        lines.append(f"  {label}: {run['requests']} requests {run['total']}")
        lines.append(f"    {'step':<12} {'tasks':>5} " + " ".join(f"{k:>6}" for k in KINDS) + "  per task")
        for step, e in run["steps"].items():
            lines.append(f"    {step:<12} {e['tasks']:>5} " + " ".join(f"{e['kinds'].get(k, 0):>6}" for k in KINDS)
                         + (f"  {[sum(t.values()) for t in e['per_task']]}" if "per_task" in e else ""))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/winnow-bench-bill")
    ap.add_argument("--json", help="write the result here too")
    ap.add_argument("--sizes", default="small,large", help="which run sizes (comma separated)")
    add_smoke(ap)
    args = ap.parse_args()
    apply_smoke(args, workdir=None, sizes="small")

    os.makedirs(args.workdir, exist_ok=True)
    server = S3Server(os.path.join(args.workdir, "s3-requests.log"))
    result: dict = {"machine": machine(), "sizes": {}}
    try:
        os.environ.update(server.env())
        server.create_bucket(BUCKET)
        for name in args.sizes.split(","):
            result["sizes"][name] = run_size(server, args.workdir, name, SIZES[name])
            one = result["sizes"][name]
            print(f"{name}: {one['plan']}")
            print(table(one))
            one["rerun_formula"] = rerun_bill(g=one["plan"]["G"], p=one["plan"]["P"], s=one["plan"]["S"])
            one["rerun_differs"] = check_rerun(one["rerun"], one["plan"])
            print("  rerun vs formula: " + ("exact" if not one["rerun_differs"] else "; ".join(one["rerun_differs"])))
    finally:
        server.stop()
        if args.smoke:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(f"machine: {describe(result['machine'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
