"""A filter is one declaration (winnow.filters): everything else derives from the list.

The end-to-end test installs a test-only filter the way a user's package would (an entry point of
group ``winnow.filters`` in a dist-info folder on the path) and runs the engine in a child
process: the filter shows in the status rows (outcome, reason, its column), the summary's counts,
the gallery's outcome filter, the DAG's params and the score histograms, and the records it drops
before decode are never decoded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from winnow.filters import BUILTIN, COUNT_NAMES, FILTERS, OUTCOMES, PARAMS, VALUE_COLUMNS, FilterParam, describe

REPO = Path(__file__).resolve().parents[1]

TEST_FILTER_MODULE = '''
from winnow.filters import FilterParam, FilterSpec

# Test-only: drops images of more than max_image_bytes bytes, read from the index (never decoded).
MAX_IMAGE_BYTES = FilterSpec(
    "max_image_bytes", "index", (("image_size", "int64"),), "<=",
    FilterParam("max_image_bytes", 0, 0, None, "Max image bytes", "Drop larger images; 0 = off.", integer=True),
    reason="{value:.0f} bytes > {param} {threshold}", label="image bytes", outcome="image_bytes", off=0,
    before_decode=True,
)
'''

CHILD = '''
import json, pathlib, sys
import numpy as np
import pyarrow.parquet as pq

from tests._tiny import tiny_config
from winnow.data.sample import generate_sample
from winnow.data.tarscan import scan_shard
from winnow.data.shards import list_shards
from winnow.filters import COUNT_NAMES, FILTERS, OUTCOMES
from winnow.pipeline import run_all, load_plan
from winnow.report.gallery import gallery_page
from winnow.report.scores import score_histograms
from winnow.rowgroups import CommitStore
from winnow.stages.status import iter_status
from winnow.stages.thumbnails import OUTCOMES as GALLERY_OUTCOMES

out = sys.argv[1]
generate_sample(out + "/input", shards=2, per_shard=20, seed=5, corrupt=False)
sizes = sorted(s for shard in list_shards(out + "/input") for s in scan_shard(shard).image_size)
limit = int(np.median(sizes))
cfg = tiny_config(input_uri=out + "/input", output_root=out + "/runs", run_key="t", buffer_size=8,
                  max_partitions=2, batch_size=8, max_image_bytes=limit)
summary = run_all(cfg, backend="local")
rows = [r for t in iter_status(cfg.run_root) for r in t.to_pylist() if r["record_id"] is not None]
dropped = [r for r in rows if r["outcome"] == "image_bytes"]
store = CommitStore(cfg.run_root)
plan = load_plan(cfg)
embed = {}
for p in range(plan.num_partitions):
    for rg in plan.partition_row_groups(p):
        t = store.read_table("embed", p, rg, columns=["record_id", "embedding", "error"])
        embed.update({r["record_id"]: r for r in t.to_pylist()})
page = gallery_page(cfg.run_root, plan, outcome="image_bytes", limit=1000)
h = score_histograms(cfg.run_root, plan)
sys.path.insert(0, "dags")
import image_curation
param = image_curation.PARAMS["max_image_bytes"]
print(json.dumps({
    "limit": limit, "filters": [f.name for f in FILTERS], "outcomes": list(OUTCOMES),
    "gallery_outcomes": list(GALLERY_OUTCOMES), "count_name": COUNT_NAMES["image_bytes"],
    "summary": {k: v for k, v in summary.items() if isinstance(v, int)},
    "dropped": [{"size": r["image_size"], "reason": r["reason"], "embedded": embed[r["record_id"]]["embedding"] is not None,
                 "error": embed[r["record_id"]]["error"]} for r in dropped],
    "others_max_size": max((r["image_size"] for r in rows if r["outcome"] not in ("image_bytes", "exact_duplicate")),
                           default=None),
    "gallery": [i["outcome"] for i in page["items"]],
    "histogram": next(f for f in h["filters"] if f["name"] == "max_image_bytes"),
    "param": {"default": param.value, "schema": param.schema},
    "write_columns": pq.read_schema(sorted(pathlib.Path(store.stage_dir("write")).rglob("rg*.parquet"))[0]).names,
}))
'''


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_test_only_filter_installed_by_one_declaration_shows_in_status_counts_gallery_param_and_histogram(tmp_path):
    site = tmp_path / "site"
    (site / "winnow_test_filter-0.0.0.dist-info").mkdir(parents=True)
    (site / "winnow_test_filter.py").write_text(TEST_FILTER_MODULE)
    (site / "winnow_test_filter-0.0.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: winnow-test-filter\nVersion: 0.0.0\n")
    (site / "winnow_test_filter-0.0.0.dist-info" / "entry_points.txt").write_text(
        "[winnow.filters]\nmax_image_bytes = winnow_test_filter:MAX_IMAGE_BYTES\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), str(tmp_path / "run")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["filters"][-1] == "max_image_bytes" and "image_bytes" in got["outcomes"]
    assert got["outcomes"].index("image_bytes") < got["outcomes"].index("undecodable")  # decided before decode
    assert "image_bytes" in got["gallery_outcomes"] and got["count_name"] == "image_bytes_dropped"
    dropped = got["dropped"]
    assert dropped and got["summary"]["image_bytes_dropped"] == len(dropped)
    for d in dropped:  # its status row: the column, the reason in the declared words; never decoded
        assert d["size"] > got["limit"] and d["reason"] == f"{d['size']} bytes > max_image_bytes {got['limit']}"
        assert not d["embedded"] and d["error"] is None
    assert got["others_max_size"] <= got["limit"]
    assert got["gallery"] and set(got["gallery"]) == {"image_bytes"}
    hist = got["histogram"]
    assert hist["enabled"] is True and hist["threshold"] == got["limit"] and got["limit"] in hist["edges"]
    assert sum(hist["counts"]) == hist["scored"] > 0
    assert got["param"]["default"] == 0 and got["param"]["schema"]["type"] == "integer"
    assert "image_size" in got["write_columns"]


def test_derived_lists_follow_the_declarations():
    assert FILTERS[: len(BUILTIN)] == BUILTIN
    assert [p.name for p in PARAMS] == [p.name for f in FILTERS for p in f.params]
    assert {name for name, _ in VALUE_COLUMNS} == {c for f in FILTERS for c in f.column_names}
    for f in FILTERS:
        assert f.outcome in OUTCOMES and COUNT_NAMES[f.outcome] == f.count
    listed = {d["name"]: d for d in describe()}
    assert list(listed) == [f.name for f in FILTERS]
    assert all(listed[f.name]["threshold_param"] == f.threshold.name for f in FILTERS)


@pytest.mark.parametrize("value, problem", [(0, None), (3, None), (2.5, "an integer"), (-1, ">= 0"), (True, "an integer"),
                                            ("3", "an integer"), (None, "an integer")])
def test_a_declared_param_checks_its_own_range(value, problem):
    p = FilterParam("min_x", 0, 0, None, "Min x", "x", integer=True)
    got = p.problem(value)
    assert (got is None) if problem is None else (problem in got and "min_x" in got)


def test_product_files_name_a_filter_in_at_most_three_places():
    """A filter's name is written as a string only in its module, the declaration list and the
    registry entry (where its stage is registered)."""
    import re

    product = [p for d in ("winnow", "operators", "plugins", "dags") for p in (REPO / d).rglob("*")
               if p.suffix in (".py", ".js", ".html") and "__pycache__" not in p.parts]
    for f in BUILTIN:
        pattern = re.compile(rf"""["']{re.escape(f.name)}["']""")
        holders = sorted(str(p.relative_to(REPO)) for p in product if pattern.search(p.read_text()))
        assert len(holders) <= 3, (f.name, holders)
