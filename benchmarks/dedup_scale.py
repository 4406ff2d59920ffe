"""Dedup at scale: the four distributed steps vs the single-process reference, with memory.

Synthetic L2-normalised 768-d float16 embeddings (clustered background: ``--centres`` random
centres, members at cosine ~0.5 to each other; plus ``--planted`` pairs: two copies of a
template at cosine ~0.98, placed at random positions anywhere in the run), committed as real
embed / aesthetic / nsfw row groups with stage fingerprints (about 5% of records fail a filter).
Generation works row group by row group (never the whole matrix in memory).

Then, each step in its own process (what an Airflow task process is), attached to one shared
local Ray head: ``centroids`` (one Ray task), ``assign`` (row-group stage, per partition),
``pairwise`` (one Ray task per bucket), ``dedup`` (row-group stage). Measured: wall time of each
step, peak RSS of each step's task process (``ru_maxrss``), peak RSS of the biggest Ray worker
while the step ran (psutil, sampled every 0.2 s), duplicates found vs planted pairs whose two
members both passed the filters. ``--reference`` also runs the single-process ``run_dedup`` of
``benchmarks/_reference/dedup.py`` (all candidates in one process: the tests' oracle) on the same run,
in its own process, same config.

    python benchmarks/dedup_scale.py --records 1000000 --reference --json /tmp/winnow-bench/dedup_1m.json

``--ray-address`` (token in ``$WINNOW_BENCH_RAY_TOKEN``) attaches the steps to a running head
instead of starting one (the test suite's smoke run: its shared head; worker memory is then not
sampled).

Scripts, not tests: nothing here is collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from _common import RAY_TOKEN_ENV, REPO, add_ray_head, add_smoke, apply_smoke, describe, machine, token_env  # noqa: F401  (REPO puts the repo on sys.path)

D = 768


# ---- synthetic committed stages -----------------------------------------------------------

def generate(run_root: str, n: int, buffer_size: int, max_partitions: int, centres: int, planted: int, seed: int,
             *, write: bool = True) -> dict:
    """Commit the synthetic stages (``write=False``: only recompute what was planted)."""
    import pyarrow as pa

    from winnow.rowgroups import CommitStore, RowGroupPlan, StageFingerprint
    from winnow.schemas import AESTHETIC, INDEX, NSFW, embed_schema
    from winnow.stages.clip_score import CLIP_SCORE
    from winnow.stages.embedding_io import embedding_array

    plan = RowGroupPlan(n, buffer_size, max_partitions)
    store = CommitStore(run_root)
    for stage in ("index", "embed", "aesthetic", "nsfw", "clip_score"):
        config = {"synthetic": seed}
        store.ensure_stage(StageFingerprint(stage=stage, config=config, num_records=n, buffer_size=buffer_size))
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, D)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    sigma = 1.0 / np.sqrt(D)  # member-to-member cosine ~0.5 inside a centre
    templates = c[rng.integers(0, centres, planted)] + sigma * rng.standard_normal((planted, D)).astype(np.float32)
    slots = rng.permutation(n)[: 2 * planted].reshape(planted, 2)  # where the two copies of each template go
    template_of = np.full(n, -1, np.int64)
    template_of[slots[:, 0]] = np.arange(planted)
    template_of[slots[:, 1]] = np.arange(planted)
    keep_a = rng.random(n) >= 0.03
    keep_n = rng.random(n) >= 0.02
    for rg in range(plan.num_row_groups if write else 0):
        lo, hi = plan.row_group_range(rg)
        r = np.random.default_rng([seed, rg])
        x = c[r.integers(0, centres, hi - lo)] + sigma * r.standard_normal((hi - lo, D)).astype(np.float32)
        t = template_of[lo:hi]
        copies = t >= 0
        x[copies] = templates[t[copies]] + 0.004 * r.standard_normal((int(copies.sum()), D)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = pa.array(np.arange(lo, hi), pa.int64())
        p = plan.partition_of(rg)
        store.commit_table("embed", p, rg, pa.table({
            "record_id": ids, "key": pa.array([f"{i:09d}" for i in range(lo, hi)]),
            "embedding": embedding_array(x.astype(np.float16)), "error": pa.nulls(hi - lo, pa.string())},
            schema=embed_schema(D)))
        ka, kn = keep_a[lo:hi], keep_n[lo:hi]
        # The index rows the outcome rule reads (record ids, keys, exact-duplicate marks: none).
        index_cols = {name: pa.nulls(hi - lo, INDEX.field(name).type) for name in INDEX.names}
        index_cols.update(record_id=ids, key=pa.array([f"{i:09d}" for i in range(lo, hi)]),
                          uid=pa.array([f"{i:032x}" for i in range(lo, hi)]))
        store.commit_table("index", p, rg, pa.table(index_cols, schema=INDEX))
        # Scores that pass or fail the default thresholds (aesthetic >= 5, nsfw < 0.5).
        store.commit_table("aesthetic", p, rg, pa.table({
            "record_id": ids, "aesthetic_score": pa.array(np.where(ka, 6.0, 4.0), pa.float32())}, schema=AESTHETIC))
        store.commit_table("nsfw", p, rg, pa.table({
            "record_id": ids, "nsfw_score": pa.array(np.where(kn, 0.1, 0.9), pa.float32())}, schema=NSFW))
        store.commit_table("clip_score", p, rg, pa.table({
            "record_id": ids, "clip_score": pa.nulls(hi - lo, pa.float32()),
            "has_caption": pa.array(np.zeros(hi - lo, bool))}, schema=CLIP_SCORE))
    # The thresholds step over those scores (the defaults: the CLIP-score filter off).
    from winnow.execution import LOCAL
    from winnow.rowgroups.store import stage_fingerprint
    from winnow.stages.thresholds import ThresholdsConfig, run_thresholds

    tconfig = ThresholdsConfig()
    fingerprint = stage_fingerprint(store, "thresholds", tconfig, plan)
    store.ensure_stage(fingerprint, overwrite=True)
    run_thresholds(run_root, plan, tconfig, fingerprint, execution=LOCAL)
    both = (keep_a & keep_n)[slots].all(axis=1)
    return {"plan": plan.to_dict(), "planted_pairs": planted, "findable_pairs": int(both.sum()),
            "candidates": int((keep_a & keep_n).sum()), "pairs": slots[both].tolist()}


# ---- one step in its own process -------------------------------------------------------------

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
spec = json.loads(sys.argv[2])
from winnow.rowgroups import CommitStore, RowGroupPlan
from winnow.stages.dedup import DedupConfig
from winnow.execution import Execution
plan = RowGroupPlan(**spec["plan"])
cfg = DedupConfig(**spec["config"])
run_root, step = spec["run_root"], spec["step"]
t0 = time.perf_counter()
out = {}
if step == "reference":
    from benchmarks._reference.dedup import run_dedup  # the test oracle (argv[1], the repo root, is on sys.path)
    out = run_dedup(run_root, plan, cfg)
else:
    import ray
    from winnow.ray.cluster import connect
    for attempt in range(4):  # a loaded machine can miss Ray's 30 s raylet start: the next try restarts the head
        try:
            execution = Execution(ray_address=spec.get("ray_address"))
            connect(execution.ray_address)  # attached: the token is in the environment
            break
        except Exception as exc:
            print(f"connect failed (try {attempt + 1}): {exc}", file=sys.stderr)
            ray.shutdown()
            time.sleep(5)
    t0 = time.perf_counter()  # the shared head is running: attaching is not the step's work
    from winnow.stages import dedup_steps as s
    if step == "centroids":
        fingerprint = s.ensure_step(CommitStore(run_root), plan, cfg, "centroids")
        out = s.run_centroids(run_root, plan, cfg, fingerprint, execution=execution)
    elif step == "pairwise":
        out = s.run_pairwise(run_root, plan, cfg, execution=execution).to_dict()
    else:
        from winnow.ray.runner import run_stage_partition
        stage = s.AssignStage(cfg) if step == "assign" else s.DedupFlagsStage(cfg)
        s.ensure_step(CommitStore(run_root), plan, cfg, step)
        failed = {}
        for p in range(plan.num_partitions):
            r = run_stage_partition(stage, run_root=run_root, plan=plan, partition=p, execution=execution,
                                    uses_model=step == "assign")
            failed.update(r.failed)
        out = {"failed": {str(k): v for k, v in failed.items()}}
out = {k: v for k, v in out.items() if isinstance(v, (int, float, str, list, dict, type(None)))}
print(json.dumps({"seconds": time.perf_counter() - t0, "result": out}))
"""


class TreeSampler:
    """Peak RSS of every process under a root pid (the Ray head's tree), sampled."""

    def __init__(self, root_pid: int | None):
        self.root_pid = root_pid  # re-read from the head's state file while sampling (it may restart)
        self.task_pid: int | None = None  # the step's own process, sampled too
        self.peak: dict[int, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        import psutil

        from winnow.ray.cluster import head_status

        while not self._stop.is_set():
            if self.root_pid is not None:
                self.root_pid = (head_status() or {}).get("pid", self.root_pid)
            try:
                procs = psutil.Process(self.root_pid).children(recursive=True) if self.root_pid else []
            except psutil.Error:
                procs = []
            if self.task_pid:
                try:
                    procs.append(psutil.Process(self.task_pid))
                except psutil.Error:
                    pass
            for p in procs:
                try:
                    rss = p.memory_info().rss / 2**20
                    name = " ".join(p.cmdline()[:1])[:40]
                except psutil.Error:
                    continue
                if p.pid == self.task_pid:
                    name = "task"
                if rss > self.peak.get(p.pid, (0.0, ""))[0]:
                    self.peak[p.pid] = (rss, name)
            self._stop.wait(0.2)

    def biggest_worker(self) -> float:
        return round(max([rss for rss, name in self.peak.values() if name.startswith("ray::")] or [0.0]), 1)

    def task(self) -> float:
        return round(max([rss for rss, name in self.peak.values() if name == "task"] or [0.0]), 1)


def run_step(step: str, spec: dict, env: dict, head_pid: int | None) -> dict:
    load = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    # ru_maxrss would not do: Linux keeps a forked child's maxrss across exec (the parent's peak).
    with TreeSampler(head_pid) as sampler:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(REPO), json.dumps({**spec, "step": step})],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler.task_pid = proc.pid
        stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"step {step} failed:\n{stderr[-4000:]}")
    out = json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])
    out.update(step=step, process_seconds=round(time.perf_counter() - t0, 1), load_at_start=load,
               task_peak_rss_mb=sampler.task(), worker_peak_rss_mb=sampler.biggest_worker())
    print(json.dumps({k: v for k, v in out.items() if k != "result"}), flush=True)
    return out


def found_pairs(run_root: str, plan_dict: dict, pairs: list[list[int]]) -> tuple[int, int]:
    """(planted pairs with one member flagged as duplicate of the other, duplicates flagged)."""
    import pyarrow.parquet as pq

    from winnow.rowgroups import CommitStore, RowGroupPlan

    plan = RowGroupPlan(**plan_dict)
    store = CommitStore(run_root)
    dup_of: dict[int, int] = {}
    for rg in range(plan.num_row_groups):
        t = pq.read_table(store.row_group_path("dedup", plan.partition_of(rg), rg))
        mask = t.column("duplicate").to_numpy(zero_copy_only=False)
        ids = t.column("record_id").to_numpy()[mask]
        of = t.column("duplicate_of").to_numpy(zero_copy_only=False)[mask]
        dup_of.update(zip(ids.tolist(), of.tolist()))
    hit = sum(1 for a, b in pairs if dup_of.get(a) == b or dup_of.get(b) == a)
    return hit, len(dup_of)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--buffer-size", type=int, default=20_000)
    ap.add_argument("--max-partitions", type=int, default=8)
    ap.add_argument("--centres", type=int, default=2000)
    ap.add_argument("--planted", type=int, default=0, help="planted pairs (default: 1%% of records)")
    ap.add_argument("--clusters", type=int, default=0, help="k (0: round(sqrt(candidates)))")
    ap.add_argument("--buckets", type=int, default=0)
    ap.add_argument("--max-iter", type=int, default=50)
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference", action="store_true", help="also run today's single-process dedup")
    ap.add_argument("--work", default="/tmp/winnow-bench/dedup_scale")
    ap.add_argument("--json")
    ap.add_argument("--reuse", action="store_true", help="reuse the generated stages of an earlier run with the same data params")
    add_ray_head(ap)
    add_smoke(ap)
    args = ap.parse_args()
    if args.ray_address and not os.environ.get(RAY_TOKEN_ENV):
        ap.error(f"--ray-address needs ${RAY_TOKEN_ENV}")
    apply_smoke(args, records=400, buffer_size=100, max_partitions=2, centres=8, max_iter=5, work=None)

    from winnow.ray.cluster import EMBEDDED_ENV, STATE_DIR_ENV, ensure_local_head, head_status, stop_local_head

    work = Path(args.work) / f"n{args.records}"
    run_root = str(work / "run")
    data_params = {k: getattr(args, k) for k in ("records", "buffer_size", "max_partitions", "centres", "planted", "seed")}
    stamp = work / "generated.json"
    info = {"machine_at_start": machine(), "args": vars(args)}
    print(describe(info["machine_at_start"]), flush=True)
    if args.reuse and not stamp.exists() and (Path(run_root) / "nsfw" / "_stage.json").exists():
        # Generated by an earlier run that stopped after generating: the planted pairs again.
        gen = generate(run_root, args.records, args.buffer_size, args.max_partitions, args.centres,
                       args.planted or args.records // 100, args.seed, write=False)
        stamp.write_text(json.dumps({"params": data_params, "gen": gen}))
    if args.reuse and stamp.exists() and json.loads(stamp.read_text())["params"] == data_params:
        gen = json.loads(stamp.read_text())["gen"]
        for folder in ("centroids", "assign", "pairwise", "dedup"):
            shutil.rmtree(Path(run_root) / folder, ignore_errors=True)
        shutil.rmtree(work / "reference", ignore_errors=True)
        info["generate_seconds"] = None
    else:
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        gen = generate(run_root, args.records, args.buffer_size, args.max_partitions, args.centres,
                       args.planted or args.records // 100, args.seed)
        info["generate_seconds"] = round(time.perf_counter() - t0, 1)
        info["generate_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        stamp.write_text(json.dumps({"params": data_params, "gen": gen}))
    pairs = gen.pop("pairs")
    info["data"] = gen
    print(json.dumps(info["data"]), f"generated in {info['generate_seconds']} s", flush=True)

    config = {"eps": args.eps, "n_clusters": args.clusters, "max_iter": args.max_iter, "device": "cpu",
              "buckets": args.buckets}
    spec = {"run_root": run_root, "plan": gen["plan"], "config": config}
    env = {**os.environ, EMBEDDED_ENV: "shared", STATE_DIR_ENV: "/tmp/wdd-bench",
           "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    head_pid = None
    if args.ray_address:  # a running head (the test suite's shared one): attached to, left running
        spec["ray_address"] = args.ray_address
        env.update(token_env())
    else:
        # The head's workers inherit its environment: this checkout's code, not the installed one.
        os.environ.update({STATE_DIR_ENV: "/tmp/wdd-bench", "PYTHONPATH": env["PYTHONPATH"]})
        for attempt in range(3):  # Ray gives a raylet 30 s to register: on a loaded machine, try again
            try:
                ensure_local_head()
                break
            except RuntimeError as exc:
                print(f"Ray head start failed (try {attempt + 1}): {str(exc)[-200:]}", flush=True)
        head_pid = (head_status() or {}).get("pid")
    steps = []
    try:
        for step in ("centroids", "assign", "pairwise", "dedup"):
            steps.append(run_step(step, spec, env, head_pid))
    finally:
        if not args.ray_address:
            stop_local_head()
    hit, flagged = found_pairs(run_root, gen["plan"], pairs)
    info["distributed"] = {"steps": steps, "planted_pairs_found": hit, "duplicates_flagged": flagged,
                           "seconds": round(sum(s["seconds"] for s in steps), 1)}
    print(f"distributed: {hit}/{gen['findable_pairs']} findable planted pairs found, {flagged} flagged", flush=True)

    if args.reference:
        ref_root = str(work / "reference")
        shutil.copytree(run_root, ref_root, ignore=shutil.ignore_patterns("centroids", "assign", "pairwise", "dedup"))
        ref = run_step("reference", {**spec, "run_root": ref_root}, env, None)
        rhit, rflagged = found_pairs(ref_root, gen["plan"], pairs)
        info["reference"] = {**ref, "planted_pairs_found": rhit, "duplicates_flagged": rflagged}
        print(f"reference: {rhit}/{gen['findable_pairs']} found, {rflagged} flagged", flush=True)
    info["machine_at_end"] = machine()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
