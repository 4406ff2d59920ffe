"""The one result type, the summaries built from it and the one failure view with its one cap."""

from __future__ import annotations

import pytest

from winnow.exceptions import BucketsFailedError, RowGroupsFailedError
from winnow.results import (
    MAX_FAILED_SHOWN,
    PartitionSummary,
    RowGroupResult,
    UnitSummary,
    failure_view,
)


def test_failure_view_lists_the_first_ids_counts_all_and_keeps_the_lowest_ids_error():
    failed = {rg: f"E{rg}" for rg in range(MAX_FAILED_SHOWN + 7, 0, -1)}
    view = failure_view(failed)
    assert view == {"failed": list(range(1, MAX_FAILED_SHOWN + 1)), "failed_count": MAX_FAILED_SHOWN + 7,
                    "first_error": "E1"}
    assert failure_view({}) == {"failed": [], "failed_count": 0, "first_error": None}


def test_partition_summary_counts_results_and_round_trips_through_its_dict():
    s = PartitionSummary(stage="embed", partition=2, row_groups=4)
    for r in (RowGroupResult(row_group=8, records_in=10, records_out=9),
              RowGroupResult(row_group=9, records_in=10, records_out=10, skipped=True),
              RowGroupResult(row_group=10, records_in=10, error="OSError: gone")):
        s.add(r)
    d = s.to_dict()
    assert {k: d[k] for k in ("computed", "skipped", "failed", "failed_count", "first_error", "records_in",
                              "records_out", "row_groups")} == {
        "computed": 1, "skipped": 1, "failed": [10], "failed_count": 1, "first_error": "OSError: gone",
        "records_in": 10, "records_out": 9, "row_groups": 4}
    assert PartitionSummary.from_dict(d) == s  # one failure: the view keeps its error
    assert PartitionSummary.from_dict({**d, "unknown": 1}) == s


def test_summary_dict_with_errors_keeps_every_failure_beyond_the_cap():
    failed = {rg: f"E{rg}" for rg in range(MAX_FAILED_SHOWN * 2)}
    s = PartitionSummary(stage="nsfw", partition=0, row_groups=len(failed), failed=failed)
    assert len(s.to_dict()["failed"]) == MAX_FAILED_SHOWN
    assert PartitionSummary.from_dict(s.to_dict(errors=True)).failed == failed


def test_unit_summary_keeps_per_unit_results_out_of_its_dict():
    s = UnitSummary(stage="pairwise", units=3, computed=2, failed={1: "ValueError: x"}, results=[{"unit": 0}])
    d = s.to_dict()
    assert "results" not in d and d["failed_count"] == 1 and d["units"] == 3
    assert UnitSummary.from_dict(d).failed == {1: "ValueError: x"}


def test_ray_data_columns_come_back_as_the_same_results():
    import numpy as np

    results = [RowGroupResult(row_group=3, records_in=5, records_out=5, seconds=0.5),
               RowGroupResult(row_group=4, records_in=5, error="KeyError: 'x'")]
    columns = RowGroupResult.to_columns(results)
    rows = [{k: np.asarray(v)[i] for k, v in columns.items()} for i in range(2)]  # numpy scalars, as Ray gives
    assert [RowGroupResult.from_row(r) for r in rows] == results
    assert RowGroupResult.to_columns([]) == {}


def test_error_messages_use_the_same_capped_view():
    many = PartitionSummary(stage="embed", partition=1, row_groups=500,
                            failed={rg: "OSError: disk" for rg in range(200)})
    msg = str(RowGroupsFailedError([many]))
    assert "stage 'embed' partition 1: 200 of 500 row groups failed" in msg
    assert f"failed: {list(range(MAX_FAILED_SHOWN))} and {200 - MAX_FAILED_SHOWN} more;" in msg
    assert "first error (row group 0): OSError: disk" in msg and "Rerun to retry only those" in msg
    assert str(BucketsFailedError("pairwise", {2: "MemoryError: "})).startswith(
        "stage 'pairwise': 1 bucket failed: [2]; first error (bucket 2): MemoryError")


@pytest.mark.parametrize("count", [0, 1])
def test_a_summary_without_failures_is_ok(count):
    s = PartitionSummary(stage="write", partition=0, failed={0: "x"} if count else {})
    assert s.ok is (count == 0)
