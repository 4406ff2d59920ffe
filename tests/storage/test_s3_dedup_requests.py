"""Dedup's request bill on a real S3 endpoint (moto): pairwise reads each row group's batch of a
bucket with one ranged GET of exactly its bytes (no IPC footer, no HEAD), the assign markers once
for the whole run (the batch manifest), and dedup reads one gathered object per row group, not
every bucket's file for every row group (no term in partitions x buckets or row groups x buckets)."""

from __future__ import annotations

import collections
import re

import pytest

from tests._tiny import TINY_MODEL
from tests.storage._runs import upload_folder
from tests.storage.conftest import BUCKET
from winnow import pipeline
from winnow.execution import LOCAL
from winnow.pipeline import CurationConfig
from winnow.registry import run_phases
from winnow.rowgroups import CommitStore, StorageOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PREFIX = f"s3://{BUCKET}/dedupbill"
BUCKETS = 4


def _kind_and_object(req, run_prefix: str) -> str:
    key = (req.query.get("prefix") or [""])[0] if req.kind == "LIST" else req.key
    return f"{req.kind} {re.sub(r'[0-9]+', '*', key[len(run_prefix):])}"


@pytest.fixture(scope="module")
def bill(s3, tmp_path_factory):
    """A first run (12 row groups, 4 partitions, 4 buckets) step by step as the DAG runs it, with
    the requests of each pairwise and dedup call; then pairwise again (everything committed)."""
    from winnow.data.sample import generate_sample

    shards = tmp_path_factory.mktemp("dedupbill") / "shards"
    generate_sample(str(shards), shards=4, per_shard=15, seed=0, corrupt=False)
    upload_folder(str(shards), f"{PREFIX}/shards")
    cfg = CurationConfig(input_uri=f"{PREFIX}/shards/", output_root=f"{PREFIX}/out", run_key="r", buffer_size=5,
                         max_partitions=4, dedup_buckets=BUCKETS, **TINY_MODEL, aesthetic_threshold=0.0,
                         storage=StorageOptions.from_env())
    steps: dict[str, list] = collections.defaultdict(list)
    info = None
    for scope, specs in run_phases():
        name = specs[0].name
        if scope == "global":
            result = pipeline.run_global(cfg, name, owner="bill", execution=LOCAL)
            info = info or result
        elif scope == "bucket":
            mark = s3.mark()
            assert not pipeline.run_buckets(cfg, name, owner="bill", execution=LOCAL).failed
            steps[name] += s3.requests(mark)
        else:
            for p in info["partitions"]:
                for spec in specs:
                    mark = s3.mark()
                    assert pipeline.run_partition(cfg, spec.name, p, owner="bill", execution=LOCAL).ok
                    steps[spec.name] += s3.requests(mark)
    mark = s3.mark()
    assert pipeline.run_buckets(cfg, "pairwise", owner="bill", execution=LOCAL).computed == 0
    steps["pairwise rerun"] = s3.requests(mark)
    plan = pipeline.load_plan(cfg)
    store = CommitStore(cfg.root)
    markers = {rg: store.read_table("assign", plan.partition_of(rg), rg) for rg in range(plan.num_row_groups)}
    return {"steps": steps, "plan": plan, "markers": markers, "prefix": cfg.run_root[len("s3://"):].split("/", 1)[1]}


def test_pairwise_reads_each_batch_with_one_ranged_get_and_no_footer(bill):
    plan, reqs = bill["plan"], bill["steps"]["pairwise"]
    assert plan.num_row_groups == 12 and plan.num_partitions == 4
    prefix = bill["prefix"] + "/"
    arrow = [r for r in reqs if r.key.endswith(".arrow")]
    assert not [r for r in arrow if r.kind != "GET"], "a HEAD or another request on an IPC file"
    # One GET per (row group, bucket with rows there): the batch's own bytes, nothing at the file's
    # end (a footer read would be a second GET of the same file for the same bucket).
    per_file = collections.Counter(r.key[len(prefix):] for r in arrow)
    want = {f"assign/p{plan.partition_of(rg):05d}/rg{rg:09d}.arrow": m.num_rows
            for rg, m in bill["markers"].items() if m.num_rows}
    assert per_file == want
    assert sum(want.values()) > plan.num_row_groups  # several buckets per row group: not a trivial run
    # The markers are read once for the run (the manifest), not once per bucket.
    by = collections.Counter(_kind_and_object(r, prefix) for r in reqs)
    assert by["GET assign/p*/rg*.parquet"] == plan.num_row_groups
    assert by["GET assign/_batches/b*.parquet"] == BUCKETS
    print("pairwise requests:", dict(sorted(by.items())))


def test_dedup_reads_one_gathered_object_per_row_group(bill):
    plan = bill["plan"]
    prefix = bill["prefix"] + "/"
    reqs = bill["steps"]["dedup"]
    pairwise = [r for r in reqs if r.key.startswith(prefix + "pairwise/")]
    assert all(r.kind == "GET" and "/gathered/" in r.key for r in pairwise), [r.key for r in pairwise]
    assert sorted(r.key[len(prefix):] for r in pairwise) == sorted(
        f"pairwise/gathered/p{plan.partition_of(rg):05d}/rg{rg:09d}.parquet" for rg in range(plan.num_row_groups))
    # The gather (end of pairwise) read each bucket's file once and wrote one object per row group.
    by = collections.Counter(_kind_and_object(r, prefix) for r in bill["steps"]["pairwise"])
    assert by["GET pairwise/b*.parquet"] == BUCKETS
    assert by["PUT pairwise/gathered/p*/rg*.parquet"] == plan.num_row_groups
    assert not [k for k in by if k.startswith("PUT pairwise/p")]  # no per-(partition, bucket) objects
    print("dedup requests:", dict(sorted(collections.Counter(_kind_and_object(r, prefix) for r in reqs).items())))


def test_a_pairwise_rerun_reads_no_assign_output(bill):
    prefix = bill["prefix"] + "/"
    reqs = bill["steps"]["pairwise rerun"]
    assert not [r for r in reqs if r.key.startswith(prefix + "assign/p") or r.key.endswith(".arrow")]
    assert not [r for r in reqs if r.kind == "PUT" and "pairwise/" in r.key]
    assert len(reqs) <= 20, [_kind_and_object(r, prefix) for r in reqs]
