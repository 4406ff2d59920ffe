"""UI scale: the run view on a synthetic run of 100,000 row groups (time to first paint, payload).

    python benchmarks/ui_scale.py [--row-groups 100000] [--runs 5] [--screenshot docs/img/run-map-100k.png]

Builds a run root with empty committed files (index, embed, aesthetic complete; nsfw 60%, with
failed row groups; dedup and write pending): the map reads names only, so empty files are what
a real run's listing costs. Serves the plugin's app with uvicorn (Airflow's auth and DAG-run
lookup replaced by a fixed run: this measures the view, not Airflow's login) and loads the run
page in headless Chromium: time from navigation start to the map drawn, FCP, DOM node count,
and the progress payload raw and gzipped. The first progress request and the first page load
start from an empty settled-partition cache (``winnow.report.progress``); the other runs are warm,
as a page polling a running run is. Needs chromium + chromedriver (``bash .ci/browser``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "plugins"))

from benchmarks._common import add_smoke, apply_smoke, machine  # noqa: E402


def build_run(root: Path, row_groups: int, buffer_size: int = 256) -> str:
    from winnow.rowgroups import CommitStore, RowGroupPlan, StageFingerprint
    from winnow.rowgroups.failures import record_failure

    run_root = root / "synthetic"
    plan = RowGroupPlan(row_groups * buffer_size, buffer_size, max_partitions=1024)
    store = CommitStore(str(run_root))
    done = {"index": plan.num_row_groups, "embed": plan.num_row_groups, "aesthetic": plan.num_row_groups,
            "nsfw": int(plan.num_row_groups * 0.6)}
    for stage in done:  # a stage that ran has its fingerprint file (the view's cache keys on it)
        store.ensure_stage(StageFingerprint(stage=stage, config={"synthetic": True}, num_records=plan.num_records,
                                            buffer_size=buffer_size))
    (run_root / "index" / "_index.json").write_text(json.dumps({
        "num_records": plan.num_records, "buffer_size": buffer_size, "max_partitions": 1024,
        "input_uri": "synthetic", "shards": [], "counts": {}, "fingerprint_digest": "synthetic"}))
    for stage, upto in done.items():
        for p in range(plan.num_partitions):
            rgs = [rg for rg in plan.partition_row_groups(p) if rg < upto]
            if not rgs:
                continue
            folder = Path(store.partition_dir(stage, p))
            folder.mkdir(parents=True, exist_ok=True)
            for rg in rgs:
                (folder / f"rg{rg:09d}.parquet").touch()
    first_failed = done["nsfw"] + 5
    for rg in range(first_failed, first_failed + 37):
        record_failure(store, "nsfw", plan.partition_of(rg), rg, f"RuntimeError: synthetic failure of row group {rg}")
    return str(run_root)


def serve(run_root: str) -> tuple[str, object]:
    import uvicorn

    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    plugin = importlib.import_module("winnow_plugin")
    run = {"run_id": "bench", "state": "running", "conf": {}, "logical_date": None, "start_date": None,
           "end_date": None, "index_summary": {"run_root": run_root}, "tasks": {"nsfw": {700: "running"}}}
    plugin._dag_run = lambda run_id: run  # no metadata DB here: a fixed running DAG run
    for route in plugin.app.routes:  # benchmark only: no Airflow login in front of the app
        for dep in getattr(route, "dependencies", []):
            plugin.app.dependency_overrides[dep.dependency] = lambda: None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(plugin.app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def browser(profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1400,900"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                            options=opts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--row-groups", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--screenshot", default=None)
    add_smoke(ap)
    args = ap.parse_args()
    apply_smoke(args, row_groups=200, runs=1)
    import requests
    from selenium.webdriver.support.ui import WebDriverWait

    tmp = Path(tempfile.mkdtemp(prefix="winnow-ui-scale-"))
    try:
        t0 = time.perf_counter()
        run_root = build_run(tmp, args.row_groups)
        build_s = time.perf_counter() - t0
        base, server = serve(run_root)
        api = f"{base}/api/runs/bench/progress"
        api_s, raw, zipped = [], 0, 0
        for _ in range(args.runs + 1):  # the first request lists every stage; later ones hit the cache
            t = time.perf_counter()
            r = requests.get(api, headers={"Accept-Encoding": "identity"}, timeout=300)
            api_s.append(time.perf_counter() - t)
            raw = len(r.content)
        r = requests.get(api, headers={"Accept-Encoding": "gzip"}, stream=True, timeout=300)
        zipped = len(r.raw.read(decode_content=False))
        etag = requests.get(api, headers={"If-None-Match": r.headers["ETag"]}, timeout=300)
        from winnow.report import progress

        driver = browser(str(tmp / "profile"))
        paint, fcp, nodes = [], [], 0
        try:
            for i in range(args.runs + 1):  # the first load with an empty cache, then warm ones
                if i == 0:
                    progress.clear_cache()
                driver.get("about:blank")
                driver.get(f"{base}/ui/run?dag_id=image_curation&run_id=bench")
                WebDriverWait(driver, 300, poll_frequency=0.05).until(
                    lambda d: d.execute_script("return document.body.dataset.mapDrawn === '1'"))
                paint.append(float(driver.execute_script("return Number(document.body.dataset.firstPaintMs)")))
                fcp.append(float(driver.execute_script(
                    "const e=performance.getEntriesByName('first-contentful-paint')[0];return e?e.startTime:-1")))
                nodes = int(driver.execute_script("return document.getElementsByTagName('*').length"))
            if args.screenshot:
                driver.save_screenshot(args.screenshot)
        finally:
            driver.quit()
            server.should_exit = True
        result = {
            "row_groups": args.row_groups, "files": "index/embed/aesthetic 100%, nsfw 60% + 37 failed",
            "build_s": round(build_s, 1),
            "progress_api_cold_s": round(api_s[0], 3),
            "progress_api_warm_s_median": round(statistics.median(api_s[1:]), 3),
            "progress_payload_bytes": raw, "progress_payload_gzip_bytes": zipped,
            "not_modified_status": etag.status_code,
            "map_drawn_cold_ms": round(paint[0]), "map_drawn_warm_ms_median": round(statistics.median(paint[1:])),
            "fcp_ms_median": round(statistics.median(fcp)),
            "dom_nodes": nodes, "runs": args.runs, **machine(),
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
