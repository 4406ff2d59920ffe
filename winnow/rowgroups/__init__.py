"""Row-group plan and partition arithmetic, the commit store and stage fingerprints."""

from winnow.rowgroups.plan import MAX_MAP_LENGTH, RowGroupPlan
from winnow.rowgroups.store import CommitStore, RunRoot, StageFingerprint, StorageOptions, resolve_filesystem

__all__ = [
    "MAX_MAP_LENGTH",
    "CommitStore",
    "RowGroupPlan",
    "RunRoot",
    "StageFingerprint",
    "StorageOptions",
    "resolve_filesystem",
]
