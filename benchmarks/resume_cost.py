"""Resume cost: a run SIGKILLed at ~50 % of its embed row groups and resumed vs a clean run.

    python benchmarks/resume_cost.py [--images 2000] [--shards 8] [--buffer-size 125]
        [--max-partitions 1] [--kill-at 0.5] [--runs 3] [--workdir /tmp/winnow-bench]

Each round: (1) a clean ``run_all(backend="ray")`` in a fresh process; (2) the same on a fresh
run root in a process group that is SIGKILLed (the whole group: driver, local Ray, workers)
once ``kill-at`` of the embed row groups are committed, as the commit store shows them; (3)
a fresh process resuming that run root. Compute is the wall time of the stage work, from the
moment the process is attached to Ray (imports and Ray start excluded, model load included) to
the end of ``run_all``, or to the kill. The killed run's lease is left in place: it names a
dead process, so the resume takes it over. Reported: (killed + resumed) / clean, median of the
rounds, and row groups computed per stage: committed by the killed run + computed by the resume
must equal the clean run's, so none ran twice. Output of the resumed run must equal the clean
run's (same kept records, byte-identical tars).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import TINY_CURATION, add_smoke, apply_smoke, describe, ensure_sample, machine, median, run_json_child  # noqa: E402

STAGES = ("embed", "aesthetic", "nsfw", "dedup", "write")


def child(params: dict, marker: str, backend: str = "ray") -> dict:
    from winnow.pipeline import CurationConfig, run_all
    from winnow.ray.cluster import connect

    cfg = CurationConfig.from_params(params)
    if backend == "ray":
        connect(None)
    start = time.time()
    Path(marker).write_text(json.dumps({"work_start": start, "pid": os.getpid()}))
    summary = run_all(cfg, backend=backend, log=lambda _line: None)
    return {
        "compute_seconds": time.time() - start,
        "row_groups_by_stage": summary["row_groups_by_stage"],
        "kept": summary["kept"],
        "row_groups": summary["row_groups"],
    }


def committed(run_root: str, stage: str) -> int:
    return len(glob.glob(os.path.join(run_root, stage, "p*", "rg*.parquet")))


def output_digest(run_root: str) -> str:
    """sha256 over the output tars, in path order: equal output means equal digests."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(run_root, "write", "p*", "rg*.tar"))):
        h.update(os.path.relpath(path, run_root).encode())
        h.update(Path(path).read_bytes())
    return h.hexdigest()


def killed_run(params: dict, marker: str, kill_after: int, env: dict, backend: str = "ray") -> dict:
    """Start a run, SIGKILL its process group once ``kill_after`` embed row groups committed."""
    run_root = os.path.join(params["output_root"], params["run_key"])
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", "--params", json.dumps(params), "--marker", marker, "--backend", backend],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env={**os.environ, **env},
    )
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the run to kill ended by itself (exit {proc.returncode}) before {kill_after} embed "
                    f"row groups were committed:\n{proc.stderr.read().decode()[-4000:]}"
                )
            if committed(run_root, "embed") >= kill_after:
                break
            time.sleep(0.05)
        kill_time = time.time()
        os.killpg(proc.pid, signal.SIGKILL)  # the whole run: driver, its local Ray, workers
    finally:
        proc.wait()
        proc.stderr.close()
    start = json.loads(Path(marker).read_text())["work_start"]
    return {
        "compute_seconds": kill_time - start,
        "committed_at_kill": {s: committed(run_root, s) for s in STAGES},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--buffer-size", type=int, default=125)
    ap.add_argument("--max-partitions", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--kill-at", type=float, default=0.5, help="fraction of embed row groups committed at the kill")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/winnow-bench")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ap.add_argument("--marker", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="ray", choices=("ray", "local"),
                    help="ray (the measurement) or local (the same runs without Ray)")
    add_smoke(ap)
    args = ap.parse_args(argv)
    apply_smoke(args, images=24, shards=2, buffer_size=2, batch_size=2, kill_at=0.1, runs=1, workdir=None,
                backend="local")

    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.params), args.marker, args.backend)), flush=True)
        return 0
    if args.runs < 3 and not args.smoke:
        print("warning: fewer than 3 runs is a smoke test, not a measurement", file=sys.stderr)

    start_machine = machine()
    work = Path(args.workdir)
    per_shard = args.images // args.shards
    input_dir = str(work / f"sample-{args.shards}x{per_shard}")
    ensure_sample(input_dir, shards=args.shards, per_shard=per_shard, seed=0)
    runs_root = work / "resume-runs"
    shutil.rmtree(runs_root, ignore_errors=True)
    runs_root.mkdir(parents=True)
    env = {"RAY_USAGE_STATS_ENABLED": "0"}

    def params(run_key: str) -> dict:
        return {"input_uri": input_dir, "output_root": str(runs_root), "run_key": run_key,
                "buffer_size": args.buffer_size, "max_partitions": args.max_partitions,
                "batch_size": args.batch_size, **TINY_CURATION}

    rounds = []
    for i in range(args.runs):
        clean_p, killed_p = params(f"clean{i}"), params(f"killed{i}")
        marker = str(runs_root / f"marker{i}.json")
        child_args = ["--marker", marker, "--backend", args.backend]
        clean = run_json_child([__file__, "--child", "--params", json.dumps(clean_p), *child_args], env=env)
        groups = clean["row_groups"]
        kill_after = max(1, round(args.kill_at * groups))
        killed = killed_run(killed_p, marker, kill_after, env, args.backend)
        # run_all's default lease owner is its process: the killed run's lease is left behind
        # but stale, and the resume takes it over by itself (nothing is deleted by hand).
        killed["lease_left_behind"] = (runs_root / f"killed{i}" / "_lease.json").exists()
        # A Ray worker is not in the killed process group: one busy with a row group can still
        # commit it before it notices its raylet died. Count what storage holds when the resume starts.
        time.sleep(0.0 if args.backend == "local" else 2.0)
        killed["committed_at_resume"] = {s: committed(os.path.join(killed_p["output_root"], killed_p["run_key"]), s) for s in STAGES}
        resumed = run_json_child([__file__, "--child", "--params", json.dumps(killed_p), *child_args], env=env)
        per_stage = {}
        for stage in STAGES:
            clean_n = groups if stage == "dedup" else clean["row_groups_by_stage"].get(stage, {}).get("computed", 0)
            resumed_n = (
                groups - killed["committed_at_resume"]["dedup"] if stage == "dedup"
                else resumed["row_groups_by_stage"].get(stage, {}).get("computed", 0)
            )
            per_stage[stage] = {"clean": clean_n, "committed_at_kill": killed["committed_at_kill"][stage],
                                "killed_committed": killed["committed_at_resume"][stage],
                                "resumed_computed": resumed_n}
        none_twice = all(v["killed_committed"] + v["resumed_computed"] == v["clean"] for v in per_stage.values())
        same_output = output_digest(str(runs_root / f"clean{i}")) == output_digest(str(runs_root / f"killed{i}"))
        ratio = (killed["compute_seconds"] + resumed["compute_seconds"]) / clean["compute_seconds"]
        r = {
            "clean_s": round(clean["compute_seconds"], 2),
            "killed_s": round(killed["compute_seconds"], 2),
            "resumed_s": round(resumed["compute_seconds"], 2),
            "ratio": round(ratio, 3),
            "row_groups": per_stage,
            "none_computed_twice": none_twice,
            "same_output": same_output and clean["kept"] == resumed["kept"],
            "kept": [clean["kept"], resumed["kept"]],
            "lease_left_behind": killed["lease_left_behind"],
        }
        print(f"round {i}: clean {r['clean_s']} s, killed {r['killed_s']} s + resumed {r['resumed_s']} s "
              f"-> {r['ratio']}; none twice: {none_twice}; same output: {r['same_output']}", flush=True)
        rounds.append(r)
        for key in (f"clean{i}", f"killed{i}"):
            shutil.rmtree(runs_root / key, ignore_errors=True)

    report = {
        "machine_start": start_machine,
        "machine_end": machine(),
        "config": {k: v for k, v in vars(args).items() if k not in ("child", "params", "marker")},
        "rounds": rounds,
        "median_ratio": round(median([r["ratio"] for r in rounds]), 3),
        "median_clean_s": round(median([r["clean_s"] for r in rounds]), 2),
        "median_killed_plus_resumed_s": round(median([r["killed_s"] + r["resumed_s"] for r in rounds]), 2),
    }
    print(json.dumps(report, indent=2))
    print(f"\nmachine at start: {describe(start_machine)}")
    print("| images | row groups | clean s | killed + resumed s | ratio | none twice | same output |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.images} | {rounds[0]['row_groups']['embed']['clean']} x {args.buffer_size} | "
          f"{report['median_clean_s']} | {report['median_killed_plus_resumed_s']} | {report['median_ratio']} | "
          f"{all(r['none_computed_twice'] for r in rounds)} | {all(r['same_output'] for r in rounds)} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
