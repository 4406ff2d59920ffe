"""The request bill of a run (docs/request_bill.md), counted on the S3 test server: a whole
``run_all`` and its rerun with everything committed, each request attributed to the step that
made it (benchmarks/request_bill.py). The rerun matches the formula exactly, and each of its
partition tasks makes at most 2 bookkeeping requests besides the listing of its partition."""

from __future__ import annotations

import pytest

from benchmarks import request_bill

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def bill(s3, tmp_path_factory):
    s3.create_bucket(request_bill.BUCKET)
    size = request_bill.SIZES["small"]
    return request_bill.run_size(s3, str(tmp_path_factory.mktemp("bill")), "small", size)


def test_the_rerun_bill_is_the_formula(bill):
    """Every step, every kind: exact (the benchmark checks the larger size the same way)."""
    plan = bill["plan"]
    assert plan == {"N": 24, "G": 6, "P": 3, "B": 2, "S": 2}
    assert request_bill.check_rerun(bill["rerun"], plan) == []


def test_a_rerun_partition_task_makes_at_most_two_bookkeeping_requests(bill):
    steps = bill["rerun"]["steps"]
    for step in request_bill.PARTITION_STEPS:
        tasks = steps[step]["per_task"]
        assert len(tasks) == bill["plan"]["P"], step
        for kinds in tasks:
            # One LIST of its own partition (what is committed), then the lease and the stage's
            # _stage.json (plan and fingerprint): nothing is written, no row group is read.
            assert kinds.get("LIST", 0) == 1, (step, kinds)
            assert sum(kinds.values()) - 1 <= 2, (step, kinds)
        objects = steps[step]["objects"]
        assert set(objects) == {"lease", f"{step}/_stage.json", f"{step}/list"}, (step, objects)


def test_the_first_run_writes_each_row_group_once_and_renews_no_held_lease(bill):
    steps = bill["first"]["steps"]
    g = bill["plan"]["G"]
    for step in ("embed", "aesthetic", "nsfw", "clip_score", "dedup", "status"):
        assert steps[step]["objects"][f"{step}/rg"].get("PUT") == g, (step, steps[step]["objects"])
        assert steps[step]["objects"]["lease"] == {"GET": bill["plan"]["P"]}, step


def test_the_report_reads_no_outcome_column(bill):
    # Per status row group one footer read (its counts are in the footer's metadata).
    objects = bill["rerun"]["steps"]["report"]["objects"]
    g = bill["plan"]["G"]
    assert objects["status/rg"].get("GET", 0) == g, objects
