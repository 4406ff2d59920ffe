"""The README's main job: sample shards -> the image_curation DAG (dag.test, embedded Ray).

Run with ``bash .ci/demo`` (which makes the venv) or ``python -m operators.demo``. Uses the
tiny ``winnow-tiny-vit`` model with random weights, so scores are meaningless: it shows the
machinery (index, embed, filters, dedup, write, resume), not curation quality.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.environ.get("WINNOW_DEMO_DIR", str(REPO / ".winnow-demo")))
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--buffer-size", type=int, default=40)
    ap.add_argument("--run-key", default="demo")
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    home = out / "airflow-home"
    home.mkdir(parents=True, exist_ok=True)
    # Airflow reads its config at import: set it before anything imports airflow.
    os.environ["AIRFLOW_HOME"] = str(home)
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = time.perf_counter()

    from winnow.data.sample import TINY_MODEL_PARAMS, generate_sample

    input_dir = out / "input"
    if not (input_dir / "_sample_manifest.json").exists():
        generate_sample(str(input_dir), shards=args.shards, per_shard=args.per_shard, seed=args.seed, corrupt=True)
    print(f"sample shards: {input_dir}")

    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], check=True, stdout=subprocess.DEVNULL)

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / "image_curation.py"))
    if bag.import_errors:
        print(json.dumps(bag.import_errors, indent=2), file=sys.stderr)
        return 1
    dag = bag.get_dag("image_curation")
    conf = {
        "input_uri": str(input_dir),
        "output_root": str(out / "runs"),
        "run_key": args.run_key,
        "buffer_size": args.buffer_size,
        "max_partitions": 4,
        **TINY_MODEL_PARAMS,
    }
    dr = dag.test(run_conf=conf)
    state = str(getattr(dr, "state", "unknown"))
    run_root = out / "runs" / args.run_key
    summary_path = run_root / "_summary.json"
    print(f"DAG run state: {state}; {time.perf_counter() - t0:.1f} s")
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        keys = ("records", "undecodable", "aesthetic_dropped", "nsfw_dropped", "duplicates", "kept",
                "members_without_image", "row_groups", "row_groups_computed", "row_groups_skipped")
        print(json.dumps({k: summary.get(k) for k in keys}, indent=2))
        print(f"output:  {run_root / 'write'}")
        print(f"summary: {summary_path}")
    return 0 if state.endswith("success") else 1


if __name__ == "__main__":
    raise SystemExit(main())
