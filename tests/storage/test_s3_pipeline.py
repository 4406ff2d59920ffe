"""The whole engine with shards and run root on a real S3 endpoint, against the same run on
local disk: same counts, same output keys, same tar bytes; a rerun that costs O(partitions)
LISTs and reads no data; a run killed mid-partition that resumes with only what is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.storage._runs import (
    SMALL,
    WRITE_STAGE,
    counts_of,
    output_files,
    parquet_rows,
    run_local,
    upload_folder,
)
from tests.storage.conftest import BUCKET
from winnow import pipeline
from winnow.execution import LOCAL
from winnow.pipeline import CurationConfig
from winnow.registry import partition_stages, run_phases, stage_order
from winnow.rowgroups import StorageOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIX = f"s3://{BUCKET}/pipeline"


@pytest.fixture(scope="module")
def sample(local_run, s3):
    upload_folder(local_run["shards"], f"{PREFIX}/shards")


def _cfg(input_uri: str, output_root: str, run_key: str) -> CurationConfig:
    # This test is the run's entry point: it says where the run stores (the S3 server's AWS_* environment).
    return CurationConfig(input_uri=input_uri, output_root=output_root, run_key=run_key, **SMALL,
                          storage=StorageOptions.from_env())


@pytest.fixture(scope="module")
def runs(sample, local_run):
    local = local_run["summary"]
    s3_cfg = _cfg(f"{PREFIX}/shards/shard-*.tar", f"{PREFIX}/out", "s3")
    remote = run_local(s3_cfg)
    return {"local": local, "s3": remote, "local_root": local_run["run_root"], "s3_cfg": s3_cfg}


def test_counts_on_s3_equal_the_local_run(runs):
    assert runs["s3"]["records"] >= 24 and runs["s3"]["undecodable"] > 0
    assert counts_of(runs["s3"]) == counts_of(runs["local"])
    assert runs["s3"]["row_groups_computed"] == runs["local"]["row_groups_computed"]


def test_output_objects_equal_the_local_files(runs):
    local = output_files(runs["local_root"], WRITE_STAGE)
    remote = output_files(runs["s3_cfg"].run_root, WRITE_STAGE)
    assert sorted(local) == sorted(remote) and any(k.endswith(".tar") for k in local)
    for key in local:
        if key.endswith(".tar"):
            assert local[key] == remote[key], key  # byte for byte
        elif key.endswith(".parquet"):
            # Same rows; only the shard column differs: it names where the shard was read from.
            assert parquet_rows(local[key], drop=("shard",)) == parquet_rows(remote[key], drop=("shard",)), key


def test_no_temp_objects_on_s3(runs, s3):
    assert not [r.key for r in s3.requests() if ".tmp-" in r.key]


def test_a_rerun_lists_per_partition_and_reads_no_data(runs, s3):
    """Everything committed: the index, every partition task and dedup (the DAG's tasks
    before the report) read no shard bytes and no row-group data; LISTs are per partition."""
    cfg = runs["s3_cfg"]
    plan = pipeline.load_plan(cfg)
    mark = s3.mark()
    owner = "dag/rerun"
    info = None
    summaries = []
    for scope, specs in run_phases():  # the DAG's tasks, in its order
        if scope == "global":
            result = pipeline.run_global(cfg, specs[0].name, owner=owner, execution=LOCAL)
            info = info or result
            continue
        if scope == "bucket":
            summary = pipeline.run_buckets(cfg, specs[0].name, owner=owner, execution=LOCAL)
            assert summary.computed == 0, summary
            continue
        for p in info["partitions"]:
            for spec in specs:
                summaries.append(pipeline.run_partition(cfg, spec.name, p, execution=LOCAL, owner=owner))
    assert sum(s.computed for s in summaries) == 0
    reqs = s3.requests(mark)
    run_prefix = cfg.run_root[len(f"s3://{BUCKET}/"):]
    shard_reads = [r for r in reqs if r.method in ("GET", "HEAD") and r.key.endswith(".tar")]
    data_reads = [r for r in reqs if r.kind == "GET" and "/p0" in r.key and r.key.startswith(run_prefix)]
    assert shard_reads == [] and data_reads == [], (shard_reads, data_reads)
    lists = [r for r in reqs if r.kind == "LIST"]
    per_partition = len(partition_stages()) + 1  # + the index's own row groups
    # One LIST per (stage, partition) a task looks at, plus the shard listing and the
    # stage-folder checks of the index task: no term grows with the number of row groups.
    assert len(lists) <= per_partition * plan.num_partitions * 2 + 2 * len(stage_order()) + 2, \
        [r.query.get("prefix") for r in lists]
    assert not [r for r in lists if "rg" in (r.query.get("prefix") or [""])[0]]
    pipeline.run_report(cfg, [s.to_dict() for s in summaries], owner=owner)
    print(f"rerun requests: {json.dumps(s3.counts(mark))} for {plan.num_row_groups} row groups, "
          f"{plan.num_partitions} partitions")


def test_a_run_killed_mid_partition_resumes_with_only_what_is_missing(sample, runs, s3):
    cfg = _cfg(f"{PREFIX}/shards/", f"{PREFIX}/out", "killed")
    # The task process is SIGKILLed right after embed row group 1 committed (test-only fault).
    spec = {"cfg": {k: v for k, v in cfg.to_dict().items()}, "call": "run_all"}
    fault = {"stage": "embed", "row_groups": [1], "mode": "kill_task"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "faults", "_child.py"), json.dumps(spec)],
                          env={**os.environ, "PYTHONPATH": REPO, "WINNOW_TEST_FAULTS": json.dumps(fault)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    from winnow.rowgroups import CommitStore

    store = CommitStore(cfg.root)
    assert store.completed("embed", 0) == {0, 1}
    resumed = run_local(cfg)
    by_stage = resumed["row_groups_by_stage"]
    plan = pipeline.load_plan(cfg)
    assert by_stage["embed"] == {"computed": plan.num_row_groups - 2, "skipped": 2}
    assert counts_of(resumed) == counts_of(runs["local"])
    # (a second run of a complete run key computing nothing: test_a_rerun_lists_per_partition...)


def test_member_reads_are_one_get_per_shard_of_a_row_group(runs, s3):
    """A row group's images come from its shards in one ranged GET each, not one per record."""
    from winnow.data.reader import read_members
    from winnow.rowgroups import CommitStore

    store = CommitStore(runs["s3_cfg"].root)
    index = store.read_table("index", 0, 0)
    shards = set(index.column("shard").to_pylist())
    mark = s3.mark()
    images = read_members(index, "image", storage=runs["s3_cfg"].storage)
    gets = [r for r in s3.requests(mark) if r.kind == "GET"]
    assert index.num_rows >= 4 and sum(1 for i in images if i is not None) >= 3
    assert len(gets) == len(shards), [r.key for r in gets]
