"""Row-group plan: record ranges, partitions and their arithmetic.

Nothing is stored per row group or per partition, so a plan of 10^9 row groups costs the
same few hundred bytes as a plan of ten.
"""

from __future__ import annotations

from dataclasses import dataclass

from winnow.checks import DEFAULT_MAX_PARTITIONS, MAX_MAP_LENGTH, check, int_problem


@dataclass(frozen=True, slots=True)
class RowGroupPlan:
    """Records ``[i*B, min((i+1)*B, N))`` form row group ``i``; partition ``p`` covers row groups
    ``[p*G//P, (p+1)*G//P)`` with ``P = min(G, max_partitions)``.

    >>> plan = RowGroupPlan(10, 3, max_partitions=2)
    >>> plan.num_row_groups, plan.num_partitions
    (4, 2)
    >>> plan.row_group_range(3)
    (9, 10)
    >>> list(plan.partition_row_groups(1))
    [2, 3]
    >>> plan.partition_of(2)
    1
    """

    num_records: int
    buffer_size: int
    max_partitions: int = DEFAULT_MAX_PARTITIONS

    def __post_init__(self) -> None:
        # The one check of the knobs ``buffer_size`` and ``max_partitions`` (the index config
        # makes an empty plan to check them); N is counted, not given, so it is no knob.
        if problem := int_problem("num_records", self.num_records, low=0):
            raise ValueError(problem)
        check(
            int_problem("buffer_size", self.buffer_size, low=1),
            int_problem("max_partitions", self.max_partitions, low=1, high=MAX_MAP_LENGTH,
                        hint="one partition is one mapped task instance and Airflow's default [core] "
                             "max_map_length is the most; a larger buffer_size makes fewer, bigger row groups"),
        )

    @property
    def num_row_groups(self) -> int:
        """G = ceil(N / B); zero for an empty input."""
        return -(-self.num_records // self.buffer_size)

    @property
    def num_partitions(self) -> int:
        """P = min(G, max_partitions); zero for an empty input."""
        return min(self.num_row_groups, self.max_partitions)

    def _check_row_group(self, row_group: int) -> None:
        if isinstance(row_group, bool) or not isinstance(row_group, int):
            raise ValueError(f"row group must be an integer, got {row_group!r}")
        if not 0 <= row_group < self.num_row_groups:
            raise ValueError(
                f"row group {row_group} is out of range: this plan has {self.num_row_groups} "
                f"row groups (N={self.num_records}, B={self.buffer_size})"
            )

    def _check_partition(self, partition: int) -> None:
        if isinstance(partition, bool) or not isinstance(partition, int):
            raise ValueError(f"partition must be an integer, got {partition!r}")
        if not 0 <= partition < self.num_partitions:
            raise ValueError(
                f"partition {partition} is out of range: this plan has {self.num_partitions} "
                f"partitions"
            )

    def row_group_range(self, row_group: int) -> tuple[int, int]:
        """(start, stop) record offsets of a row group."""
        self._check_row_group(row_group)
        start = row_group * self.buffer_size
        return start, min(start + self.buffer_size, self.num_records)

    def row_group_size(self, row_group: int) -> int:
        start, stop = self.row_group_range(row_group)
        return stop - start

    def partition_row_groups(self, partition: int) -> range:
        """The row groups of one partition, as a lazy range."""
        self._check_partition(partition)
        g, p = self.num_row_groups, self.num_partitions
        return range(partition * g // p, (partition + 1) * g // p)

    def partition_of(self, row_group: int) -> int:
        """The partition holding a row group (inverse of ``partition_row_groups``)."""
        self._check_row_group(row_group)
        g, p = self.num_row_groups, self.num_partitions
        # Start from the floor estimate and correct by at most one step either way.
        q = (row_group * p) // g
        while q + 1 < p and (q + 1) * g // p <= row_group:
            q += 1
        while q > 0 and q * g // p > row_group:
            q -= 1
        return q

    def partition_record_range(self, partition: int) -> tuple[int, int]:
        rgs = self.partition_row_groups(partition)
        return rgs.start * self.buffer_size, min(rgs.stop * self.buffer_size, self.num_records)

    def describe_partition(self, partition: int) -> str:
        """Human label used for Airflow's map_index_template."""
        rgs = self.partition_row_groups(partition)
        return f"p{partition}: row groups {rgs.start}-{rgs.stop - 1}"

    def to_dict(self) -> dict[str, int]:
        return {
            "num_records": self.num_records,
            "buffer_size": self.buffer_size,
            "max_partitions": self.max_partitions,
        }
