"""Every error the engine raises, in one place; each message names the thing at fault (path, row
group, param), the problem and the fix.

Naming rule, shared with ``operators/exceptions.py``: one idea has one name in both layers. The
engine's class lives here and is what the engine raises and ``run_all`` callers catch; where the
operators must hand the same idea to Airflow as an ``AirflowException``, their class has the
same name (``RowGroupsFailedError``, ``BucketsFailedError``, ``RayAuthError``) and is raised
``from`` the engine's, with its message. New names end in ``Error``; ``StageConfigMismatch`` and
``RunLocked`` keep the names their messages, docs and users already know.

``winnow.faults.InjectedFault`` is not here on purpose: it stands for an arbitrary foreign error
a test injects, so it must not be a :class:`WinnowError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from winnow.results import PartitionSummary


class WinnowError(Exception):
    """Base of winnow's own errors."""


# ---- run parameters -------------------------------------------------------------------------
class ConfigError(WinnowError, ValueError):
    """A run parameter (a knob) is invalid; the message names the parameter, the value and the
    fix. Every knob check raises it, through :func:`winnow.checks.check`; a ``ValueError`` too,
    so a caller that catches bad values that way still does."""


# ---- storage and the run root ---------------------------------------------------------------
class StorageError(WinnowError):
    """Reading or writing the run root failed (missing file, full disk, read-only)."""


class StorageUnavailable(StorageError, OSError):
    """An object-store call kept failing with transient errors (throttling, connections reset
    or refused, 5xx) until its deadline: the message says how often the store throttled, and
    what to do. An ``OSError`` too, so every place that explains a storage error explains it."""


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


# ---- input data -----------------------------------------------------------------------------
class InputError(WinnowError):
    """The input URI is missing or holds no WebDataset shards."""

    def __init__(self, input_uri: str, message: str) -> None:
        self.input_uri = input_uri
        super().__init__(message)


class ShardError(WinnowError):
    """A shard is unreadable, truncated or has a broken tar header."""

    def __init__(self, shard: str, message: str) -> None:
        self.shard = shard
        super().__init__(message)


# ---- stages ---------------------------------------------------------------------------------
class ModelError(WinnowError):
    """The model name, weights or model directory given for the embed stage cannot be used."""


class HeadError(WinnowError):
    """A score head cannot be built: missing weights, wrong layout, wrong embedding width."""


class DedupError(WinnowError):
    """Dedup cannot run: upstream stages missing or inconsistent (a bad dedup knob is a
    :class:`ConfigError`)."""


class WriteError(WinnowError):
    """A row group cannot be written: upstream row groups disagree on their records."""


# ---- running units --------------------------------------------------------------------------
class RowGroupsFailedError(WinnowError):
    """Some row groups failed; the others are committed and a rerun does only these."""

    def __init__(self, summaries: list[PartitionSummary]) -> None:
        self.summaries = summaries
        parts = "; ".join(s.failure_line() for s in summaries)
        super().__init__(f"{parts}. The other row groups are committed. Rerun to retry only those.")


class BucketsFailedError(WinnowError):
    """Some buckets of a bucket stage failed; the others are committed and a rerun does only these."""

    def __init__(self, stage: str, failed: Mapping[int, str]) -> None:
        from winnow.results import failure_line

        self.stage, self.failed = stage, dict(failed)
        super().__init__(f"stage {stage!r}: {failure_line(self.failed, unit='bucket')}. "
                         "Rerun to retry only those.")


# ---- Ray ------------------------------------------------------------------------------------
class RayAuthError(WinnowError):
    """The cluster refused this process's Ray auth token (or wanted one it did not have)."""


class ResourceRequestError(WinnowError, ValueError):
    """A worker size that no alive Ray node can hold, or a cluster with no alive node (a
    malformed size is a :class:`ConfigError`: it is wrong on every cluster)."""


# ---- the curation UI's read side ------------------------------------------------------------
class GalleryError(WinnowError):
    """A gallery request names something that is not in the run (row group, offset, outcome)."""


class CorpusError(WinnowError):
    """The corpus (its head, a manifest file, a takedown list) or a run being published is not
    what the operation needs; the message names the file or identifier and the fix."""


class CorpusChanged(CorpusError):
    """Publish refused: another run published to the corpus after this run's corpus check, so the
    check is stale. Rerun the check, then publish."""
