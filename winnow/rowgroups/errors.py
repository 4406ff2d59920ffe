"""Errors of the row-group machinery, each naming the thing at fault and the way out."""

from __future__ import annotations

from typing import Any


class WinnowError(Exception):
    """Base of winnow's own errors."""


class StorageError(WinnowError):
    """Reading or writing the run root failed (missing file, full disk, read-only)."""


class StageConfigMismatch(WinnowError):
    """A stage folder holds output made with another configuration or plan."""

    def __init__(self, stage: str, stage_dir: str, changes: list[tuple[str, Any, Any]]) -> None:
        self.stage = stage
        self.stage_dir = stage_dir
        self.changes = changes
        lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)
        super().__init__(
            f"stage {stage!r} at {stage_dir} was computed with another configuration ({lines}). "
            "Use the run's original settings to resume it, pick a new run key, or set "
            "overwrite=true to move the old stage folder aside (it is kept as "
            f"{stage}.replaced-<UTC timestamp>) and recompute this stage and the ones after it."
        )


class RunLocked(WinnowError):
    """Another run holds the lease on this run root."""
