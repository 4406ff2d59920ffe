"""Pipeline overhead: the image_curation DAG (dag.test, local Ray) vs a hand-written Ray Data script.

    python benchmarks/pipeline_overhead.py [--images 2000] [--shards 8] [--buffer-size 250]
        [--max-partitions 2] [--runs 3] [--workdir /tmp/winnow-bench]

Same curation both ways on the same generated shards (tiny ``winnow-tiny-vit``, random weights,
fixed thresholds and eps): (a) the production DAG through ``dag.test()`` with an embedded Ray
and a temp AIRFLOW_HOME on SQLite (migrated once, before any timing); (b) what a user would
write instead, one Ray Data pipeline with no Airflow, no index and no commits: read tars ->
decode+embed (an actor with ``EmbedStage.embed_images``) -> both heads -> materialise -> the
same ``find_duplicates`` -> write one tar per block plus Parquet. Each run is a fresh process
with a fresh run root, run in the order a, b, a, b, ...; a/b is the ratio of medians.
Both sides pay their own Ray start and model load; Python imports are outside the timing.
``--floor`` adds (c): the same DAG run with every task's ``execute`` replaced by a stub that
returns at once (the index its partition list, the centroids one bucket): what Airflow alone
costs for this DAG's shape and params under ``dag.test``, with no engine at all.
``--ray-address`` (token in ``$WINNOW_BENCH_RAY_TOKEN``) attaches both to a running head instead
(the test suite's smoke run, on its shared head): then no Ray start is timed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    RAY_TOKEN_ENV,
    REPO,
    TINY_CURATION,
    Timer,
    add_ray_head,
    add_smoke,
    airflow_cli,
    airflow_env,
    apply_smoke,
    describe,
    driver_conn,
    ensure_sample,
    machine,
    median,
    run_json_child,
    token_env,
)


def curation_params(args: argparse.Namespace, input_dir: str, output_root: str, run_key: str) -> dict:
    return {
        "input_uri": input_dir,
        "output_root": output_root,
        "run_key": run_key,
        "buffer_size": args.buffer_size,
        "max_partitions": args.max_partitions,
        "batch_size": args.batch_size,
        **TINY_CURATION,
    }


#: The ``--ray-address`` handed to the Ray Data child (the DAG child gets ``ray_default`` instead).
ATTACH_ENV = "WINNOW_BENCH_RAY_ADDRESS"


def attach_env(variant: str, address: str | None) -> dict[str, str]:
    """What a child needs to attach to a running head (``--ray-address``) instead of starting its
    own Ray: the DAG's tasks a ``ray_default`` connection in driver mode (token as its password),
    the Ray Data script the address and the token (Ray reads it when it is imported)."""
    if not address:
        return {}
    if variant == "ray":
        return {ATTACH_ENV: address, **token_env()}
    return {"AIRFLOW_CONN_RAY_DEFAULT": driver_conn(address, os.environ[RAY_TOKEN_ENV])}


# ---- (a) the DAG -----------------------------------------------------------------------------

def child_dag(params: dict) -> dict:
    """Runs in a fresh process whose environment already points at the migrated AIRFLOW_HOME."""
    _preimport()
    from winnow import pipeline
    from winnow.ray import cluster

    # Time spent inside engine calls, to split the wall time into engine work and Airflow's share.
    # A timed call inside another (Ray's start inside the index task's resource check) counts
    # only under its own name: the parts add up to the engine's time.
    engine: dict[str, float] = {}
    nested: list[float] = []

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            nested.append(0.0)
            try:
                return fn(*a, **kw)
            finally:
                spent = time.perf_counter() - t0
                inner = nested.pop()
                if nested:
                    nested[-1] += spent
                key = name if name != "run_partition" else f"run_partition:{a[1] if len(a) > 1 else kw.get('stage')}"
                engine[key] = engine.get(key, 0.0) + spent - inner
        return wrapper

    for name in ("run_index", "run_partition", "run_global", "run_buckets", "run_report"):
        setattr(pipeline, name, timed(name, getattr(pipeline, name)))
    cluster.connect = timed("ray_connect", cluster.connect)  # Ray start, inside the first task that needs Ray

    dr, seconds = _timed_dag_test(params)
    summary = json.loads((Path(params["output_root"]) / params["run_key"] / "_summary.json").read_text())
    tasks = _task_durations(dr)
    return {
        "variant": "dag",
        "seconds": seconds,
        "engine_seconds": engine,
        "tasks": tasks,
        "kept": summary["kept"],
        "counts": {k: summary[k] for k in ("records", "undecodable", "aesthetic_dropped", "nsfw_dropped", "duplicates", "kept")},
    }


def child_floor(params: dict) -> dict:
    """(c) The DAG's shape with no engine: every operator's ``execute`` returns at once."""
    from winnow_airflow.corpus import CORPUS_OPERATORS
    from winnow_airflow.stages import OPERATORS, ReportOperator

    partitions = list(range(params["max_partitions"]))
    stubs = {"index": lambda self, context: partitions, "centroids": lambda self, context: [0]}
    for name, op in {**OPERATORS, **CORPUS_OPERATORS, "report": ReportOperator}.items():
        op.execute = stubs.get(name, lambda self, context: {})
    dr, seconds = _timed_dag_test(params)
    return {"variant": "floor", "seconds": seconds, "tasks": _task_durations(dr), "kept": None}


def _timed_dag_test(params: dict):
    """The image_curation DAG's ``dag.test`` with ``params`` as its conf: (the run, seconds); a run
    that did not succeed is an error."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / "image_curation.py"))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    dag = bag.get_dag("image_curation")
    with Timer() as total:
        dr = dag.test(run_conf=params)
    state = str(getattr(dr, "state", ""))
    if not state.endswith("success"):
        raise RuntimeError(f"DAG run ended {state!r}")
    return dr, total.seconds


def _preimport() -> None:
    """Both variants import the heavy modules before their clock starts (imports are not overhead)."""
    import open_clip  # noqa: F401
    import ray.data  # noqa: F401

    import winnow.pipeline  # noqa: F401
    import winnow.stages.dedup  # noqa: F401
    import winnow.stages.embed  # noqa: F401
    import winnow.stages.heads  # noqa: F401


def _task_durations(dr) -> dict:
    """Number of task instances and the sum of their durations, from the metadata DB."""
    try:
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session

        with create_session() as session:
            tis = session.query(TaskInstance).filter(TaskInstance.run_id == dr.run_id).all()
            durations = [float(ti.duration or 0.0) for ti in tis]
        return {"count": len(durations), "sum_seconds": sum(durations)}
    except Exception as exc:  # noqa: BLE001 - only a breakdown; never fail the measurement for it
        return {"error": f"{type(exc).__name__}: {exc}"}


# ---- (b) the hand-written Ray Data script ----------------------------------------------------

def _read_shard(row: dict) -> list[dict]:
    """One WebDataset tar -> one row per sample (key, image bytes and extension, txt, json)."""
    from winnow.schemas import IMAGE_EXTENSIONS

    samples: dict[str, dict] = {}
    with tarfile.open(row["path"]) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()
            s = samples.setdefault(key, {"key": key, "ext": None, "image": None, "txt": None, "json": None})
            if ext.lower() in IMAGE_EXTENSIONS and s["image"] is None:
                s["image"], s["ext"] = data, ext
            elif ext in ("txt", "json"):
                s[ext] = data
    return [s for s in samples.values() if s["image"] is not None]


class _Embedder:
    """Ray Data actor: decode + embed with the stage's own code, model loaded once."""

    def __init__(self, embed_config) -> None:
        import torch

        from winnow.stages.embed import EmbedStage

        # Ray pins a 1-CPU actor to one OpenMP thread; use the machine, as a plain script would.
        torch.set_num_threads(os.cpu_count() or 1)
        self.stage = EmbedStage(embed_config)
        self.stage.setup()

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        embeddings, errors = self.stage.embed_images(list(batch["image"]))
        batch["embedding"] = embeddings
        batch["ok"] = np.array([e is None for e in errors])
        return batch


class _Heads:
    """Ray Data actor: aesthetic and NSFW scores and keeps."""

    def __init__(self, aesthetic_threshold: float, nsfw_threshold: float) -> None:
        from winnow.stages.aesthetic import AESTHETIC_HEAD
        from winnow.stages.heads import load_head
        from winnow.stages.nsfw import NSFW_HEAD

        self.aesthetic, _ = load_head(AESTHETIC_HEAD, None, embed_dim=768, allow_random_weights=True, device="cpu")
        self.nsfw, _ = load_head(NSFW_HEAD, None, embed_dim=768, allow_random_weights=True, device="cpu")
        self.aesthetic_threshold, self.nsfw_threshold = aesthetic_threshold, nsfw_threshold

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from winnow.stages.heads import score_embeddings

        ok = batch["ok"]
        n = len(ok)
        a = np.full(n, np.nan, np.float32)
        s = np.full(n, np.nan, np.float32)
        if ok.any():
            a[ok] = score_embeddings(self.aesthetic, batch["embedding"][ok])
            s[ok] = score_embeddings(self.nsfw, batch["embedding"][ok])
        batch["aesthetic_score"], batch["nsfw_score"] = a, s
        batch["candidate"] = ok & (a >= self.aesthetic_threshold) & ~(s >= self.nsfw_threshold)
        return batch


def _write_tar(batch: dict, out_dir: str, duplicates: frozenset) -> dict:
    import uuid

    import numpy as np

    keep = batch["candidate"] & ~np.isin(batch["key"].astype(str), list(duplicates))
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w") as tar:
        for i in np.flatnonzero(keep):
            key = str(batch["key"][i])
            for ext, data in ((batch["ext"][i], batch["image"][i]), ("txt", batch["txt"][i]), ("json", batch["json"][i])):
                if data is None:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if keep.any():
        with open(os.path.join(out_dir, f"part-{uuid.uuid4().hex}.tar"), "wb") as f:
            f.write(sink.getvalue())
    return {
        "key": batch["key"][keep],
        "caption": np.array([None if t is None else t.decode("utf-8", "replace") for t in batch["txt"][keep]], dtype=object),
        "aesthetic_score": batch["aesthetic_score"][keep],
        "nsfw_score": batch["nsfw_score"][keep],
        "embedding": batch["embedding"][keep],
    }


def child_ray(params: dict) -> dict:
    import numpy as np
    import ray
    import ray.data

    _preimport()
    from winnow.pipeline import CurationConfig, make_stage
    from winnow.stages.dedup import DedupConfig, find_duplicates

    cfg = CurationConfig.from_params(params)
    embed_config = make_stage(cfg, "embed").config
    out_dir = os.path.join(cfg.run_root, "write")
    os.makedirs(out_dir, exist_ok=True)
    phases: dict[str, float] = {}
    t_all = time.perf_counter()
    with Timer() as t:
        if os.environ.get(ATTACH_ENV):  # a running head (--ray-address; token auth set by attach_env)
            ray.init(address=os.environ[ATTACH_ENV], configure_logging=False)
        else:
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    phases["ray_start"] = t.seconds
    shards = sorted(str(p) for p in Path(cfg.input_uri).glob("*.tar"))
    with Timer() as t:
        ds = ray.data.from_items([{"path": p} for p in shards], override_num_blocks=len(shards))
        # CPU shares add up to the machine: actors hold theirs for the whole run, and a read
        # task that can never get a CPU would stall the pipeline.
        ds = ds.flat_map(_read_shard, num_cpus=0.5)
        ds = ds.map_batches(_Embedder, fn_constructor_args=(embed_config,), batch_size=cfg.buffer_size,
                            concurrency=1, num_cpus=1)
        ds = ds.map_batches(_Heads, fn_constructor_args=(cfg.aesthetic_threshold, cfg.nsfw_threshold),
                            batch_size=cfg.buffer_size, concurrency=1, num_cpus=0.5)
        ds = ds.materialize()
    phases["read_embed_heads"] = t.seconds
    with Timer() as t:
        cols = {"key": [], "embedding": [], "candidate": [], "ok": []}
        # Straight from the materialised blocks: a select_columns here would be one more execution.
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            for k in cols:
                cols[k].append(batch[k])
        keys = np.concatenate(cols["key"]).astype(str)
        emb = np.concatenate(cols["embedding"])
        cand = np.concatenate(cols["candidate"])
        ok = np.concatenate(cols["ok"])
        order = np.argsort(keys[cand], kind="stable")  # the index's record order (sample keys sort so)
        cand_keys = keys[cand][order]
        # Keys are numeric and ordered like the index, so they serve as record ids (same tie-breaks).
        record_ids = cand_keys.astype(np.int64)
        found = find_duplicates(record_ids, emb[cand][order], DedupConfig(eps=cfg.dedup_eps, n_clusters=cfg.dedup_clusters))
        duplicates = frozenset(f"{int(r):09d}" for r in found.record_id)
    phases["dedup"] = t.seconds
    with Timer() as t:
        written = ds.map_batches(_write_tar, fn_args=(out_dir, duplicates), batch_size=cfg.buffer_size)
        written.write_parquet(os.path.join(cfg.run_root, "output_parquet"))
    phases["write"] = t.seconds
    seconds = time.perf_counter() - t_all
    kept = sum(pq_rows(p) for p in Path(cfg.run_root, "output_parquet").glob("*.parquet"))
    ray.shutdown()
    return {
        "variant": "ray_script",
        "seconds": seconds,
        "phases": phases,
        "kept": kept,
        "counts": {"records": int(len(keys)), "undecodable": int((~ok).sum()), "candidates": int(cand.sum()),
                   "duplicates": int(len(duplicates)), "kept": kept},
    }


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


# ---- the harness -----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--buffer-size", type=int, default=250)
    ap.add_argument("--max-partitions", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/winnow-bench")
    ap.add_argument("--json", default=None)
    ap.add_argument("--floor", action="store_true",
                    help="also time (c): the same DAG with every task a stub (Airflow's own cost for its shape)")
    ap.add_argument("--child", choices=("dag", "ray", "floor"), help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    add_ray_head(ap)
    add_smoke(ap)
    args = ap.parse_args(argv)
    apply_smoke(args, images=16, shards=2, buffer_size=8, max_partitions=1, batch_size=8, runs=1, workdir=None,
                floor=True)
    if args.ray_address and not os.environ.get(RAY_TOKEN_ENV):
        ap.error(f"--ray-address needs ${RAY_TOKEN_ENV}")

    if args.child:
        params = json.loads(args.params)
        result = {"dag": child_dag, "ray": child_ray, "floor": child_floor}[args.child](params)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.runs < 3 and not args.smoke:
        print("warning: fewer than 3 runs is a smoke test, not a measurement", file=sys.stderr)

    start_machine = machine()
    work = Path(args.workdir)
    per_shard = args.images // args.shards
    input_dir = str(work / f"sample-{args.shards}x{per_shard}")
    ensure_sample(input_dir, shards=args.shards, per_shard=per_shard, seed=0)
    home = work / "airflow-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {**airflow_env(str(home)), "RAY_USAGE_STATS_ENABLED": "0"}
    if not (home / "airflow.db").exists():
        airflow_cli(env, "db", "migrate", timeout=600)

    runs_root = work / "overhead-runs"
    shutil.rmtree(runs_root, ignore_errors=True)
    variants = ("dag", "ray", "floor") if args.floor else ("dag", "ray")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(args.runs):
        for variant in variants:  # interleaved: a, b, (c,) a, b, ...
            params = curation_params(args, input_dir, str(runs_root), f"{variant}{i}")
            r = run_json_child([__file__, "--child", variant, "--params", json.dumps(params)],
                               env={**(env if variant != "ray" else {"RAY_USAGE_STATS_ENABLED": "0"}),
                                    **attach_env(variant, args.ray_address)})
            print(f"run {i} {variant}: {r['seconds']:.1f} s, kept {r['kept']}", flush=True)
            results[variant].append(r)
            shutil.rmtree(Path(runs_root) / params["run_key"], ignore_errors=True)
    end_machine = machine()

    a = median([r["seconds"] for r in results["dag"]])
    b = median([r["seconds"] for r in results["ray"]])
    kept = {v: sorted({r["kept"] for r in rs}) for v, rs in results.items() if v != "floor"}
    report = {
        "machine_start": start_machine,
        "machine_end": end_machine,
        "config": {k: v for k, v in vars(args).items() if k not in ("child", "params")},
        "dag_seconds": [round(r["seconds"], 2) for r in results["dag"]],
        "ray_seconds": [round(r["seconds"], 2) for r in results["ray"]],
        "median_dag": round(a, 2),
        "median_ray": round(b, 2),
        "ratio": round(a / b, 3),
        "kept": kept,
        "same_kept": kept["dag"] == kept["ray"],
        "dag_breakdown_last": {k: results["dag"][-1][k] for k in ("engine_seconds", "tasks", "counts")},
        "ray_phases_last": results["ray"][-1]["phases"],
    }
    if args.floor:
        c = median([r["seconds"] for r in results["floor"]])
        report.update({"floor_seconds": [round(r["seconds"], 2) for r in results["floor"]],
                       "median_floor": round(c, 2), "floor_tasks": results["floor"][-1]["tasks"]})
    print(json.dumps(report, indent=2))
    print(f"\nmachine at start: {describe(start_machine)}")
    print("| images | row groups x partitions | (a) DAG s (median) | (b) Ray Data script s (median) | a/b | kept a / b |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.images} | {args.buffer_size} x {args.max_partitions} | {a:.1f} | {b:.1f} | {a / b:.2f} "
          f"| {kept['dag']} / {kept['ray']} |")
    if args.floor:
        print(f"(c) the same DAG with every task a stub: {c:.1f} s (median), "
              f"{results['floor'][-1]['tasks'].get('count')} task instances")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
