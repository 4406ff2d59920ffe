"""The README's main job: sample shards -> the image_curation DAG (dag.test, embedded Ray).

Run with ``bash .ci/demo`` (which makes the venv) or ``python -m winnow_airflow.demo``. Uses the
tiny ``winnow-tiny-vit`` model with random weights, so scores are meaningless: it shows the
machinery (index, embed, filters, dedup, write, resume), not curation quality.

The DAG runs in a child process whose whole Airflow log goes to ``<out>/airflow.log``; this
process prints one line per finished task (read from the demo's metadata DB), the run's summary,
and the command that opens Airflow's UI on the run (its "Curation" tab).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "image_curation"
FINISHED = ("success", "failed", "skipped", "upstream_failed", "removed")


def _airflow_env(home: Path) -> dict[str, str]:
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.environ.get("WINNOW_DEMO_DIR", str(REPO / ".winnow-demo")))
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--buffer-size", type=int, default=40)
    ap.add_argument("--run-key", default="demo")
    ap.add_argument("--child-conf", help=argparse.SUPPRESS)  # internal: run the DAG in this process
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    home = out / "airflow-home"
    home.mkdir(parents=True, exist_ok=True)
    # Airflow reads its config at import: set it before anything imports airflow.
    os.environ.update(_airflow_env(home))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.child_conf:
        return _run_dag(json.loads(args.child_conf))
    t0 = time.perf_counter()

    from winnow.data.sample import TINY_MODEL_PARAMS, generate_sample

    input_dir = out / "input"
    if not (input_dir / "_sample_manifest.json").exists():
        generate_sample(str(input_dir), shards=args.shards, per_shard=args.per_shard, seed=args.seed, corrupt=True)
    print(f"sample shards: {input_dir}")

    log_path = out / "airflow.log"
    airflow = str(Path(sys.executable).with_name("airflow"))
    with open(log_path, "ab") as log:
        subprocess.run([airflow, "db", "migrate"], check=True, stdout=log, stderr=subprocess.STDOUT)
    conf = {
        "input_uri": str(input_dir),
        "output_root": str(out / "runs"),
        "run_key": args.run_key,
        "buffer_size": args.buffer_size,
        "max_partitions": 4,
        **TINY_MODEL_PARAMS,
        # The CLIP-score filter on: keep the best 80% of the captioned records by caption-image
        # cosine (records without a caption are dropped as no_caption).
        "clip_score_keep_fraction": 0.8,
    }
    db = home / "airflow.db"
    before = _last_run_pk(db)
    print(f"running the DAG (full Airflow log: {log_path})")
    with open(log_path, "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "winnow_airflow.demo", "--out", str(out), "--child-conf", json.dumps(conf)],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env={**os.environ},
        )
        run_id = _follow(db, before, child, t0)
    state = _run_state(db, run_id) if run_id else "unknown"
    run_root = out / "runs" / args.run_key
    summary_path = run_root / "_summary.json"
    print(f"DAG run {run_id}: {state}; {time.perf_counter() - t0:.1f} s")
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        from winnow.filters import COUNT_NAMES

        # Every outcome's count (the filter list's), then the run's other numbers.
        keys = ("records", *COUNT_NAMES.values(), "thresholds", "members_without_image", "row_groups",
                "row_groups_computed", "row_groups_skipped")
        print(json.dumps({k: summary.get(k) for k in keys}, indent=2))
        print(f"output:  {summary.get('write_dir')}")
        print(f"status:  {run_root / 'status'} (one row per input record: outcome, reason, scores)")
        print(f"summary: {summary_path}")
    if run_id:
        _print_ui_command(out, home, run_id)
    if child.returncode != 0 or not state.endswith("success"):
        print(f"the run did not succeed: see {log_path}", file=sys.stderr)
        return 1
    return 0


def _run_dag(conf: dict) -> int:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / "image_curation.py"))
    if bag.import_errors:
        print(json.dumps(bag.import_errors, indent=2), file=sys.stderr)
        return 1
    dr = bag.get_dag(DAG_ID).test(run_conf=conf)
    return 0 if str(getattr(dr, "state", "")).endswith("success") else 1


# ---- following the run from the metadata DB (read-only, no Airflow import) ----------------------

def _query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            return conn.execute(sql, params).fetchall()
    except sqlite3.Error:
        return []  # the DAG process holds the write lock for a moment: read on the next tick


def _last_run_pk(db: Path) -> int:
    rows = _query(db, "SELECT max(id) FROM dag_run WHERE dag_id = ?", (DAG_ID,))
    return int(rows[0][0] or 0) if rows else 0


def _run_state(db: Path, run_id: str) -> str:
    rows = _query(db, "SELECT state FROM dag_run WHERE dag_id = ? AND run_id = ?", (DAG_ID, run_id))
    return str(rows[0][0]) if rows else "unknown"


def _follow(db: Path, before: int, child: subprocess.Popen, t0: float) -> str | None:
    """Print a line per task instance as it finishes, until the DAG process exits."""
    run_id: str | None = None
    seen: set[tuple[str, int, int]] = set()
    while True:
        done = child.poll() is not None
        if run_id is None:
            rows = _query(db, "SELECT run_id FROM dag_run WHERE dag_id = ? AND id > ? ORDER BY id DESC LIMIT 1",
                          (DAG_ID, before))
            run_id = rows[0][0] if rows else None
        if run_id is not None:
            for task_id, map_index, state, label, duration, try_number in _query(
                db, "SELECT task_id, map_index, state, rendered_map_index, duration, try_number FROM task_instance "
                    "WHERE dag_id = ? AND run_id = ? ORDER BY end_date", (DAG_ID, run_id)):
                key = (task_id, map_index, try_number)
                if state in FINISHED and key not in seen:
                    seen.add(key)
                    where = f" [{label or map_index}]" if map_index >= 0 else ""
                    took = f"{duration:.1f} s" if duration else ""
                    print(f"  {time.perf_counter() - t0:6.0f} s  {state:<15} {task_id}{where} {took}", flush=True)
        if done:
            return run_id
        time.sleep(1)


def _print_ui_command(out: Path, home: Path, run_id: str) -> None:
    """Write ``<out>/open-ui.sh`` (airflow standalone on the demo's DB and plugin) and say how."""
    port = int(os.environ.get("WINNOW_DEMO_UI_PORT", "8080"))
    env = {**_airflow_env(home), "AIRFLOW__API__PORT": str(port),
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{port}/execution/",
           # Only to look at runs: no scheduled run of the DAG's defaults starts behind the view.
           "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"}
    script = out / "open-ui.sh"
    lines = ["#!/usr/bin/env bash", "# Airflow's UI on the demo's run (generated by operators/demo.py).", "set -euo pipefail"]
    lines += [f"export {k}={_sh(v)}" for k, v in env.items()]
    lines += [f"exec {_sh(str(Path(sys.executable).with_name('airflow')))} standalone"]
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    url = f"http://localhost:{port}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}/plugin/winnow-run"
    print("\nOpen the run in Airflow's UI (row-group map, gallery, score histograms):")
    print(f"  bash {script}")
    print(f"  then browse {url}")
    print(f"  (user admin; standalone prints its password and keeps it in "
          f"{home / 'simple_auth_manager_passwords.json.generated'})")


def _sh(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


if __name__ == "__main__":
    raise SystemExit(main())
