"""Row-group plan: pure arithmetic, O(1) memory, clear errors on bad values."""

from __future__ import annotations

import tracemalloc

import pytest

from winnow.exceptions import ConfigError
from winnow.rowgroups import MAX_MAP_LENGTH, RowGroupPlan


def test_row_groups_and_partitions_cover_every_record_exactly_once():
    for n, b, m in [(1, 1, 1), (10, 3, 2), (1000, 7, 13), (999, 1000, 5), (12345, 10, 1024)]:
        plan = RowGroupPlan(n, b, max_partitions=m)
        covered = []
        rgs = []
        for p in range(plan.num_partitions):
            r = plan.partition_row_groups(p)
            assert len(r) >= 1
            for rg in r:
                assert plan.partition_of(rg) == p
                start, stop = plan.row_group_range(rg)
                covered.extend(range(start, stop))
            rgs.extend(r)
        assert rgs == list(range(plan.num_row_groups))
        assert covered == list(range(n))
        assert plan.num_partitions == min(plan.num_row_groups, m)


def test_partition_formula_matches_design():
    plan = RowGroupPlan(10_000, 10, max_partitions=7)
    g, p = plan.num_row_groups, plan.num_partitions
    for q in range(p):
        assert plan.partition_row_groups(q) == range(q * g // p, (q + 1) * g // p)


def test_last_row_group_is_short():
    plan = RowGroupPlan(25, 10)
    assert plan.num_row_groups == 3
    assert plan.row_group_range(2) == (20, 25)
    assert plan.row_group_size(2) == 5


def test_empty_input_has_no_row_groups():
    plan = RowGroupPlan(0, 10)
    assert plan.num_row_groups == 0 and plan.num_partitions == 0
    with pytest.raises(ValueError, match="out of range"):
        plan.row_group_range(0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_records=-1, buffer_size=10), "num_records must be an integer >= 0, got -1"),
        (dict(num_records=10, buffer_size=0), "buffer_size must be an integer >= 1, got 0"),
        (dict(num_records=10, buffer_size=-5), "buffer_size must be an integer >= 1, got -5"),
        (dict(num_records=10, buffer_size=2, max_partitions=0), r"max_partitions must be an integer in \[1, 1024\]"),
        (dict(num_records=10, buffer_size=2, max_partitions=MAX_MAP_LENGTH + 1), "max_map_length"),
        (dict(num_records=10, buffer_size=2.5), "buffer_size must be an integer"),
        (dict(num_records=True, buffer_size=2), "num_records must be an integer"),
    ],
)
def test_bad_values_name_the_value_and_why(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        RowGroupPlan(**kwargs)
    # buffer_size and max_partitions are knobs (a ConfigError: no retry fixes them); N is counted.
    assert isinstance(err.value, ConfigError) == ("num_records" not in match)


def test_out_of_range_lookups_are_clear():
    plan = RowGroupPlan(100, 10, max_partitions=4)
    with pytest.raises(ValueError, match="row group 10 is out of range"):
        plan.partition_of(10)
    with pytest.raises(ValueError, match="partition 4 is out of range"):
        plan.partition_row_groups(4)


def test_billion_row_groups_answer_in_constant_memory():
    tracemalloc.start()
    try:
        plan = RowGroupPlan(10**9 * 100, 100, max_partitions=1024)
        g = plan.num_row_groups
        assert g == 10**9
        for rg in (0, 1, g // 3, g // 2, g - 2, g - 1):
            p = plan.partition_of(rg)
            assert rg in plan.partition_row_groups(p)
            start, stop = plan.row_group_range(rg)
            assert stop - start == 100
        last = plan.partition_row_groups(plan.num_partitions - 1)
        assert last.stop == g
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"peak {peak} bytes"
