"""Commit store: one file per row group under ``<run_root>/<stage>/p<partition>/``.

Storage is the source of truth: a row group is done when its final file exists. Local writes go
to a temp name in the same folder and are renamed (atomic on POSIX); on object stores the one
whole-object upload of the final key is the commit (no temp object, no rename: an upload that
dies before it completes leaves no object). Works over any ``pyarrow.fs`` filesystem.
"""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from winnow.exceptions import StageConfigMismatch, StorageError
from winnow.rowgroups.fs import (
    RunRoot,
    StorageOptions,
    create_if_absent,
    delete_file,
    fs_error,
    is_local,
    read_small,
    resolve_filesystem,
)

STAGE_FILE = "_stage.json"
#: The run's summary, written by the report step (``winnow.pipeline.run_report``).
SUMMARY_FILE = "_summary.json"
TEMP_MARK = ".tmp-"
_ROW_GROUP_FILE = re.compile(r"^rg(\d{9})(\..+)$")
_PARTITION_FOLDER = re.compile(r"^p(\d{5})$")


def parse_row_group_name(name: str) -> tuple[int, str] | None:
    """``(row_group, suffix)`` of a row-group file's name (``rg000000012.parquet`` ->
    ``(12, ".parquet")``), None for any other name: the layout :meth:`CommitStore.row_group_path`
    writes, parsed in this one place.

    >>> parse_row_group_name("rg000000012.parquet"), parse_row_group_name("rg12.parquet")
    ((12, '.parquet'), None)
    """
    m = _ROW_GROUP_FILE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def parse_partition_folder(name: str) -> int | None:
    """The partition of a partition folder's name (``p00003`` -> 3), None for any other name."""
    m = _PARTITION_FOLDER.match(name)
    return int(m.group(1)) if m else None
#: Folders a stage had in earlier versions; a run root that still has one is read (and
#: resumed) in place. The write stage's folder was ``output`` before it was named ``write``.
LEGACY_FOLDERS = {"write": "output"}


__all__ = [
    "CommitStore", "RunRoot", "StageFingerprint", "StorageOptions", "is_local", "read_json", "resolve_filesystem",
    "stage_fingerprint", "stored_plan", "write_atomic", "write_json",
]


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Make ``path`` hold ``data`` all at once: readers see the old state or the whole file."""
    if is_local(fs):
        tmp = f"{path}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StorageError(f"could not write {path}: {exc.strerror or exc}") from exc
        return
    # Object stores: the object becomes visible only when the upload completes. The whole
    # payload is handed over in one write, so the stream is either closed (one PutObject below
    # the part size, else CompleteMultipartUpload) or, when a part fails, closing fails and the
    # upload is never completed. A killed process leaves at most an incomplete multipart upload,
    # which is not an object (a bucket lifecycle rule AbortIncompleteMultipartUpload reclaims it).
    try:
        with fs.open_output_stream(path) as out:
            out.write(data)
    except OSError as exc:
        raise fs_error(fs, path, exc) from exc


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    try:
        data = read_small(fs, path)
        return None if data is None else json.loads(data.decode("utf-8"))
    except OSError as exc:
        if is_local(fs):
            raise
        raise fs_error(fs, path, exc) from exc


def _json_bytes(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_json(fs: pafs.FileSystem, path: str, payload: dict[str, Any]) -> None:
    write_atomic(fs, path, _json_bytes(payload))


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> None:
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = obj


@dataclass(frozen=True)
class StageFingerprint:
    """What makes a stage's output what it is: change any of it and old output is stale."""

    stage: str
    config: dict[str, Any] = field(default_factory=dict)
    upstream: dict[str, str] = field(default_factory=dict)
    num_records: int = 0
    buffer_size: int = 0
    #: Written beside the fingerprint in ``_stage.json``, not part of it (nor of its digest): the
    #: index digest the chain of upstream digests starts from and the plan's partition bound, so
    #: that a partition task finds its plan and checks its chain from this one file
    #: (:func:`stored_plan`; ``run_partition``). Empty for a fingerprint built without the chain.
    run: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "config": json.loads(_canonical(self.config)),
            "upstream": dict(sorted(self.upstream.items())),
            "num_records": self.num_records,
            "buffer_size": self.buffer_size,
        }

    @property
    def digest(self) -> str:
        import hashlib

        return hashlib.sha256(_canonical(self.to_dict()).encode()).hexdigest()[:16]

    def changes_from(self, old: dict[str, Any]) -> list[tuple[str, Any, Any]]:
        """(key, old value, new value) for every key that differs from a stored fingerprint."""
        before: dict[str, Any] = {}
        after: dict[str, Any] = {}
        old = {k: v for k, v in old.items() if k not in ("digest", "run")}
        if LEGACY_FOLDERS.get(self.stage) == old.get("stage"):
            old["stage"] = self.stage  # the same stage, recorded under its earlier name
        _flatten("", old, before)
        _flatten("", self.to_dict(), after)
        missing = object()
        keys = sorted(set(before) | set(after))
        return [
            (k, before.get(k), after.get(k))
            for k in keys
            if before.get(k, missing) != after.get(k, missing)
        ]


def stage_fingerprint(
    store: CommitStore | None,
    stage: str,
    config: Any,
    plan: Any,
    *,
    upstream: Iterable[str] | None = None,
    digests: Mapping[str, str] | None = None,
    missing: type[Exception] = StorageError,
) -> StageFingerprint:
    """The one way a stage's fingerprint is built: its config's ``fingerprint_config()`` (or that
    dict), the digests of the stages it reads and the plan's N and B (``plan``: anything with
    ``num_records`` and ``buffer_size``, e.g. a :class:`~winnow.rowgroups.plan.RowGroupPlan`).

    The stages it reads are the registry's upstream of ``stage`` unless ``upstream`` names them.
    Each one's digest comes from ``digests`` when it is there (a chain checked in one go, before
    any of it is recorded), else from its ``_stage.json`` in ``store``; an upstream recorded
    nowhere is a ``missing`` error (what to run first).

    >>> from winnow.rowgroups.plan import RowGroupPlan
    >>> stage_fingerprint(None, "x", {"k": 1}, RowGroupPlan(10, 4), upstream=(), digests={}).digest
    '7ecd1b96128cea49'
    """
    if upstream is None:
        from winnow.registry import stage_spec  # the registry is import-free: cheap

        upstream = stage_spec(stage).upstream
    known = digests or {}
    chained: dict[str, str] = {}
    for name in upstream:
        if name in known:
            chained[name] = known[name]
            continue
        stored = store.read_fingerprint(name) if store is not None else None
        if stored is None or "digest" not in stored:
            where = f"{store.stage_dir(name)}/{STAGE_FILE}" if store is not None else STAGE_FILE
            raise missing(f"stage {name!r} has no {where}: run it over the whole input before {stage}")
        chained[name] = stored["digest"]
    fingerprint_config = getattr(config, "fingerprint_config", None)
    run: dict[str, Any] = {}
    if known.get("index") and getattr(plan, "max_partitions", None) is not None:
        run = {"index": known["index"], "max_partitions": plan.max_partitions}
    return StageFingerprint(
        stage=stage,
        config=fingerprint_config() if callable(fingerprint_config) else dict(config),
        upstream=chained,
        num_records=plan.num_records,
        buffer_size=plan.buffer_size,
        run=run,
    )


def stored_plan(stored: Mapping[str, Any] | None) -> Any:
    """The plan a stage's stored ``_stage.json`` was recorded with (N and B of the fingerprint, the
    partition bound of its ``run`` block), or None for a file without one (recorded before the
    block existed, or by a fingerprint built without the chain): then the index's file has it.

    >>> stored_plan({"num_records": 10, "buffer_size": 3, "run": {"index": "ab", "max_partitions": 2}})
    RowGroupPlan(num_records=10, buffer_size=3, max_partitions=2)
    >>> stored_plan({"num_records": 10, "buffer_size": 3}) is None
    True
    """
    from winnow.rowgroups.plan import RowGroupPlan

    run = (stored or {}).get("run") or {}
    if not run.get("index") or run.get("max_partitions") is None:
        return None
    return RowGroupPlan(int(stored["num_records"]), int(stored["buffer_size"]), int(run["max_partitions"]))


def list_folder(fs: pafs.FileSystem, folder: str, *, recursive: bool = False) -> list[pafs.FileInfo]:
    """One listing of ``folder`` (on an object store: one LIST of its prefix, paged), none when it
    is missing; an object-store failure is a :class:`StorageError` naming the setting to fix."""
    try:
        return fs.get_file_info(pafs.FileSelector(folder, recursive=recursive, allow_not_found=True))
    except FileNotFoundError:
        return []
    except OSError as exc:
        if is_local(fs):
            raise
        raise fs_error(fs, folder, exc) from exc


class CommitStore:
    """Row-group commits for one run root: a :class:`RunRoot` (its URI and the settings that
    reach its store, built once by the run's entry point), or a plain local path.

    >>> import tempfile, pyarrow as pa
    >>> store = CommitStore(tempfile.mkdtemp())
    >>> store.commit_table("embed", 0, 3, pa.table({"x": [1]}))
    >>> sorted(store.completed("embed", 0))
    [3]
    """

    def __init__(self, run_root: RunRoot | str, *, filesystem: pafs.FileSystem | None = None) -> None:
        #: Where the run stores (its URI and settings): what this store's callers hand on to
        #: the work they start, so that every process reaches the store the same way.
        self.run_root = RunRoot.of(run_root)
        if filesystem is None:
            self.fs, self.root = resolve_filesystem(self.run_root.uri, self.run_root.storage)
        else:
            self.fs, self.root = filesystem, self.run_root.uri.rstrip("/")
        self._folders: dict[str, str] = {}

    # ---- paths -------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> str:
        return f"{self.root}/{self._folder(stage)}"

    def _folder(self, stage: str) -> str:
        legacy = LEGACY_FOLDERS.get(stage)
        if legacy is None:
            return stage
        if stage not in self._folders:
            new = self.fs.get_file_info(f"{self.root}/{stage}").type != pafs.FileType.NotFound
            old = self.fs.get_file_info(f"{self.root}/{legacy}/{STAGE_FILE}").type == pafs.FileType.File
            self._folders[stage] = legacy if old and not new else stage
        return self._folders[stage]

    def partition_dir(self, stage: str, partition: int) -> str:
        return f"{self.stage_dir(stage)}/p{partition:05d}"

    def row_group_path(self, stage: str, partition: int, row_group: int, suffix: str = ".parquet") -> str:
        return f"{self.partition_dir(stage, partition)}/rg{row_group:09d}{suffix}"

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # ---- commits -----------------------------------------------------------------------
    def commit_bytes(self, stage: str, partition: int, row_group: int, data: bytes, suffix: str = ".parquet") -> str:
        path = self.row_group_path(stage, partition, row_group, suffix)
        write_atomic(self.fs, path, data)
        return path

    def commit_table(self, stage: str, partition: int, row_group: int, table: pa.Table) -> None:
        """Commit one row group's output. Its ``.parquet`` file is the commit marker, so any
        side files (``commit_bytes`` with another suffix) must be written before this."""
        self.commit_bytes(stage, partition, row_group, table_to_parquet_bytes(table))

    def read_table(self, stage: str, partition: int, row_group: int, columns: list[str] | None = None) -> pa.Table:
        path = self.row_group_path(stage, partition, row_group)
        try:
            with self.fs.open_input_file(path) as f:
                return pq.read_table(f, columns=columns)
        except FileNotFoundError as exc:
            raise StorageError(
                f"row group {row_group} of stage {stage!r} (partition {partition}) is not committed: "
                f"{path} is missing. Run stage {stage!r} for that partition first."
            ) from exc

    def _list(self, folder: str) -> list[pafs.FileInfo]:
        """One listing of ``folder`` (on an object store: one LIST of its prefix)."""
        return list_folder(self.fs, folder)

    def completed(self, stage: str, partition: int, *, clean_temp: bool = False) -> set[int]:
        """Committed row-group ids of one partition. Lists only that partition's prefix.

        Temp files of a crashed writer never count; with ``clean_temp`` they are removed (call
        it once when a partition's work starts, before any writer of this run is active).
        """
        done: set[int] = set()
        for info in self._list(self.partition_dir(stage, partition)):
            name = info.base_name
            if TEMP_MARK in name:
                if clean_temp:
                    try:
                        self.fs.delete_file(info.path)
                    except FileNotFoundError:
                        pass
                continue
            parsed = parse_row_group_name(name)
            if parsed and parsed[1] == ".parquet" and info.type == pafs.FileType.File:
                done.add(parsed[0])
        return done

    def missing(self, stage: str, plan: Any, partition: int, *, clean_temp: bool = True) -> list[int]:
        """The row groups of ``partition`` (a :class:`RowGroupPlan`'s) that ``stage`` has not
        committed, in order: what a run, a retry or a resume still has to compute. One listing.
        """
        done = self.completed(stage, partition, clean_temp=clean_temp)
        return [rg for rg in plan.partition_row_groups(partition) if rg not in done]

    # ---- stage fingerprints ------------------------------------------------------------
    def read_fingerprint(self, stage: str) -> dict[str, Any] | None:
        if stage in LEGACY_FOLDERS and stage not in self._folders:
            # The current folder's file, read first: when it is there the folder is the current
            # one, and the two probes for an earlier folder (:meth:`_folder`) are not needed.
            stored = read_json(self.fs, f"{self.root}/{stage}/{STAGE_FILE}")
            if stored is not None:
                self._folders[stage] = stage
                return stored
        return read_json(self.fs, f"{self.stage_dir(stage)}/{STAGE_FILE}")

    def fingerprint_digest(self, stage: str) -> str:
        """The digest in the stage's ``_stage.json`` (the index task wrote it); ``"unset"`` before."""
        return (self.read_fingerprint(stage) or {}).get("digest", "unset")

    def ensure_stage(self, fingerprint: StageFingerprint, *, overwrite: bool = False,
                     stored: Any = ...) -> str | None:
        """Check or record a stage's fingerprint before any of its row groups is computed.

        Returns the path the old stage folder was moved to when ``overwrite`` replaced it.
        Raises :class:`StageConfigMismatch` when the stored fingerprint differs and
        ``overwrite`` is false; nothing is changed on disk then. ``stored``: the stage's
        ``_stage.json`` as the caller just read it (None: absent), so it is not read again.
        """
        stage = fingerprint.stage
        if stored is ...:
            stored = self.read_fingerprint(stage)
        moved_to = None
        if stored is not None:
            changes = fingerprint.changes_from(stored)
            if not changes:
                return None
            if not overwrite:
                raise StageConfigMismatch(stage, self.stage_dir(stage), changes)
            moved_to = self.move_aside(stage)
        elif self._list(self.stage_dir(stage)) and not overwrite:
            # Output without a fingerprint: written by something else; refuse to mix.
            raise StageConfigMismatch(
                stage, self.stage_dir(stage), [("_stage.json", None, "missing while output exists")]
            )
        elif self._list(self.stage_dir(stage)):
            moved_to = self.move_aside(stage)
        payload = fingerprint.to_dict()
        payload["digest"] = fingerprint.digest
        if fingerprint.run:
            payload["run"] = dict(fingerprint.run)
        path = f"{self.stage_dir(stage)}/{STAGE_FILE}"
        # Create-if-absent (no rename on object stores): of two tasks racing to record the
        # stage, one writes it and the other checks against what the first wrote.
        if not create_if_absent(self.fs, path, _json_bytes(payload)):
            stored = self.read_fingerprint(stage) or {}
            changes = fingerprint.changes_from(stored)
            if changes:
                raise StageConfigMismatch(stage, self.stage_dir(stage), changes)
        return moved_to

    def move_aside(self, stage: str) -> str:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = f"{self.stage_dir(stage)}.replaced-{stamp}"
        if is_local(self.fs):
            self.fs.move(self.stage_dir(stage), target)
            self._folders.pop(stage, None)  # what comes next is written under the current name
            return target
        # Object stores have no folder rename: copy every object (server side), then delete.
        source = self.stage_dir(stage)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(source, recursive=True, allow_not_found=True))
            for info in infos:
                if info.type == pafs.FileType.File:
                    self.fs.copy_file(info.path, target + info.path[len(source):])
            for info in infos:
                if info.type == pafs.FileType.File:
                    delete_file(self.fs, info.path)
        except OSError as exc:
            raise fs_error(self.fs, source, exc) from exc
        self._folders.pop(stage, None)
        return target
