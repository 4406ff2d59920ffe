"""The stage contract: :class:`RowGroupTask`, one row group of a run, and :class:`Stage`, what
every row-group stage is (a plain class the runner drives row group by row group).

A stage reads its inputs from the commit store (the index, upstream stages' row groups), returns
one output table per row group, and never commits by itself: the runner does, so commit
semantics live in one place. Side files (a write stage's tar) go through
``store.commit_bytes`` *before* the table is returned, since the ``.parquet`` is the marker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import pyarrow as pa

from winnow.rowgroups.plan import RowGroupPlan
from winnow.rowgroups.store import CommitStore, RunRoot, StorageOptions


@dataclass(frozen=True)
class RowGroupTask:
    """One unit of work: a row group of a partition of a run. ``run_root`` carries where the
    run stores (a :class:`~winnow.rowgroups.fs.RunRoot`; a plain string is a local path)."""

    run_root: RunRoot | str
    plan: RowGroupPlan
    partition: int
    row_group: int

    @property
    def record_range(self) -> tuple[int, int]:
        return self.plan.row_group_range(self.row_group)

    @property
    def num_records(self) -> int:
        return self.plan.row_group_size(self.row_group)

    @property
    def storage(self) -> StorageOptions | None:
        """The settings that reach the run's store (and its input's): for the stage's reads."""
        return RunRoot.of(self.run_root).storage

    def store(self) -> CommitStore:
        return CommitStore(self.run_root)


@runtime_checkable
class Stage(Protocol):
    """What the runner needs of a stage.

    ``name`` is the stage's name in the registry (``winnow.registry``), which also
    holds what it reads and whether it uses a model.
    """

    name: ClassVar[str]

    def fingerprint_config(self) -> dict[str, Any]:
        """The config that changes output (model, weights digest, thresholds, eps)."""
        ...

    def setup(self) -> None:
        """Load models or other per-worker state; called once per worker before ``process``."""
        ...

    def process(self, task: RowGroupTask) -> pa.Table:
        """Compute one row group's output table. Record-level problems are rows with an error,
        not exceptions; an exception fails only this row group."""
        ...
