"""The ``status`` stage: one row per indexed record with its outcome, the reason in words,
every score computed and the kept twin of a duplicate (``winnow.schemas.STATUS``).

``status/p<partition>/rg<id>.parquet`` covers each record of row group ``rg`` exactly once; the
members the index skipped (no image, a key already seen) are rows of ``index/_skipped/``
(:func:`iter_status` yields both). The outcome rule is :mod:`winnow.stages.kept`'s; the run's
counts (:func:`count_outcomes`) and the write stage read this, so every number agrees with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from winnow.filters import CORPUS_OUTCOMES, COUNT_NAMES, FILTERS, count_names
from winnow.rowgroups import CommitStore, RowGroupPlan, RunRoot
from winnow.rowgroups.task import RowGroupTask
from winnow.schemas import OUTCOMES, SKIPPED_OUTCOMES, STATUS, VALUE_FIELDS
from winnow.stages.corpus_matches import STATUS_FIELDS as CORPUS_FIELDS
from winnow.stages.corpus_matches import has_corpus
from winnow.stages.corpus_matches import matches as corpus_matches
from winnow.stages.corpus_matches import reason as corpus_reason
from winnow.stages.kept import row_group_filters
from winnow.stages.thresholds import load_thresholds

STAGE = "status"


@dataclass(frozen=True)
class StatusConfig:
    """The status stage has no knob of its own: its outcome follows the thresholds step and
    dedup, which its fingerprint chains to, and, in a run with a corpus (``corpus``), the run's
    corpus check."""

    corpus: bool = False


def status_config(run: Any = None, _name: str = STAGE) -> StatusConfig:
    """The registry's ``config`` factory: no knob of its own."""
    return StatusConfig(corpus=getattr(run, "corpus_uri", None) is not None)


class StatusStage:
    """Row group -> ``STATUS`` table: each record's outcome and why."""

    name: ClassVar[str] = STAGE

    def __init__(self, config: StatusConfig | None = None) -> None:
        self.config = config or StatusConfig()

    def fingerprint_config(self) -> dict[str, Any]:
        # Everything it depends on comes through the upstream digests (thresholds, dedup...).
        return {"layout": "v1", **({"corpus": True} if self.config.corpus else {})}

    def setup(self) -> None:
        pass

    def process(self, task: RowGroupTask) -> pa.Table:
        store = task.store()
        p, rg = task.partition, task.row_group
        x, outcome = row_group_filters(store, p, rg)
        index = store.read_table("index", p, rg, columns=["record_id", "key", "shard", "uid"])
        dedup = store.read_table("dedup", p, rg, columns=["record_id", "duplicate", "duplicate_of"])
        if not np.array_equal(dedup.column("record_id").to_numpy(), x["record_id"]):
            from winnow.exceptions import StorageError

            raise StorageError(f"row group {rg}: stage 'dedup' holds other records than the index; "
                               "recompute it with overwrite=true")
        near = dedup.column("duplicate").fill_null(False).to_numpy(zero_copy_only=False)
        near_of = dedup.column("duplicate_of").to_pylist()
        passed = outcome == ""
        corpus_rows = _corpus_rows(store, x["record_id"])
        if corpus_rows is not None:
            for i, rid in enumerate(x["record_id"].tolist()):
                row = corpus_rows.get(rid)
                # Takedowns and known bytes beat everything but an in-run exact duplicate (the
                # pre-check marked them already, unless a date published after it); a near
                # duplicate of a corpus record beats the run's own dedup.
                if row is not None and outcome[i] != "exact_duplicate" and (row["match"] != "near" or passed[i]):
                    outcome[i] = row["outcome"]
            passed = outcome == ""
        outcome[passed & near] = "duplicate"
        outcome[passed & ~near] = "kept"
        twins: list[int | None] = [None] * len(outcome)
        exact_of = x["exact_duplicate_of"]
        for i, o in enumerate(outcome):
            if o == "exact_duplicate":
                twins[i] = int(exact_of[i])
            elif o == "duplicate":
                twins[i] = near_of[i]
        twin_keys = _keys_of(store, task.plan, {t for t in twins if t is not None})
        thresholds = load_thresholds(store)
        reasons = [_reason(o, i, x, thresholds, twins[i], twin_keys) if o not in CORPUS_OUTCOMES
                   else corpus_reason(corpus_rows[int(x["record_id"][i])]) for i, o in enumerate(outcome)]
        twin_key_list = [twin_keys.get(t) if t is not None else None for t in twins]
        extra: dict[str, pa.Array] = {}
        if corpus_rows is not None:
            of = [corpus_rows.get(int(r)) if o in CORPUS_OUTCOMES else None
                  for r, o in zip(x["record_id"].tolist(), outcome.tolist())]
            twin_key_list = [k if row is None else row["duplicate_of_key"] for k, row in zip(twin_key_list, of)]
            extra = {name: pa.array([None if row is None else row[name] for row in of], t) for name, t in CORPUS_FIELDS}

        table = pa.table(
            {
                "record_id": index.column("record_id"),
                "key": index.column("key"),
                "shard": index.column("shard"),
                "uid": index.column("uid"),
                "outcome": pa.array(outcome.tolist(), pa.string()),
                "reason": pa.array(reasons, pa.string()),
                **{name: value_array(x[name], t) for name, t in VALUE_FIELDS},
                "duplicate_of": pa.array(twins, pa.int64()),
                "duplicate_of_key": pa.array(twin_key_list, pa.string()),
                **extra,
            },
            schema=status_schema(corpus_rows is not None),
        )
        return with_outcome_counts(table)


#: The Parquet key-value metadata of a status row group: ``{outcome: rows}`` as JSON, what
#: :func:`count_outcomes` sums from the file's footer instead of reading its outcome column.
OUTCOME_COUNTS_KEY = b"winnow.outcome_counts"


def _outcome_counts(outcome: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    values, freq = np.unique(np.asarray(outcome.to_pylist(), dtype=object), return_counts=True)
    return {str(v): int(c) for v, c in zip(values.tolist(), freq.tolist())}


def with_outcome_counts(table: pa.Table) -> pa.Table:
    """``table`` (status rows) with its outcome counts in its schema's metadata (the file's footer)."""
    counts = json.dumps(_outcome_counts(table.column("outcome")), sort_keys=True).encode()
    return table.replace_schema_metadata({**(table.schema.metadata or {}), OUTCOME_COUNTS_KEY: counts})


def _row_group_counts(store: CommitStore, partition: int, row_group: int) -> dict[str, int]:
    """``{outcome: rows}`` of one committed status row group: from its footer's metadata (one
    footer read), or, for a file written before the metadata was, from its outcome column."""
    with store.fs.open_input_file(store.row_group_path(STAGE, partition, row_group)) as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    if OUTCOME_COUNTS_KEY in meta:
        return {str(k): int(v) for k, v in json.loads(meta[OUTCOME_COUNTS_KEY]).items()}
    return _outcome_counts(store.read_table(STAGE, partition, row_group, columns=["outcome"]).column("outcome"))


def status_schema(corpus: bool) -> pa.Schema:
    """The status rows' layout: :data:`winnow.schemas.STATUS`, and in a run with a corpus the
    corpus record a ``corpus_duplicate`` names (``duplicate_of_run``, ``duplicate_of_uid``; its key
    is ``duplicate_of_key``)."""
    return pa.schema([*STATUS, *(pa.field(n, t) for n, t in CORPUS_FIELDS)]) if corpus else STATUS


def _corpus_rows(store: CommitStore, record_ids: np.ndarray) -> dict[int, dict[str, Any]] | None:
    """The run's corpus check rows of these records, by record id (None: a run without a corpus)."""
    if not has_corpus(store):
        return None
    if not len(record_ids):
        return {}
    lo, hi = int(record_ids.min()), int(record_ids.max()) + 1
    rows = {int(r["record_id"]): r for r in corpus_matches(store, "checked", lo, hi).to_pylist()}
    rows.update({int(r["record_id"]): r for r in corpus_matches(store, "near", lo, hi).to_pylist()})
    return rows


def _keys_of(store: CommitStore, plan: RowGroupPlan, record_ids: set[int]) -> dict[int, str]:
    """The keys of some records (any row group), reading only the index row groups holding them."""
    by_rg: dict[int, list[int]] = {}
    for rid in record_ids:
        by_rg.setdefault(rid // plan.buffer_size, []).append(rid)
    out: dict[int, str] = {}
    for rg, rids in by_rg.items():
        t = store.read_table("index", plan.partition_of(rg), rg, columns=["record_id", "key"])
        wanted = np.isin(t.column("record_id").to_numpy(), np.array(rids, dtype=np.int64))
        t = t.filter(pa.array(wanted))
        out.update(zip(t.column("record_id").to_pylist(), t.column("key").to_pylist()))
    return out


def value_array(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """A filter column for a status row or the curated Parquet: its type, null where NaN."""
    nan = np.isnan(values)
    if pa.types.is_integer(type_):
        values = np.where(nan, 0, values).astype(type_.to_pandas_dtype())
    return pa.array(values, type_, mask=nan)


def _row(x: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    """Record ``i``'s filter columns as Python values (integers where the column is one)."""
    row: dict[str, Any] = {}
    for name, type_ in VALUE_FIELDS:
        v = float(x[name][i])
        row[name] = None if np.isnan(v) else (int(v) if pa.types.is_integer(type_) else v)
    return row


def _reason(outcome: str, i: int, x: dict[str, np.ndarray], thresholds: dict[str, Any], twin: int | None,
            twin_keys: dict[int, str]) -> str | None:
    def t(name: str) -> str:
        entry = thresholds[name]
        source = f" ({entry['source']}={entry['keep_fraction']})" if entry.get("keep_fraction") is not None else ""
        value = "none (no record has this score)" if entry["threshold"] is None else f"{entry['threshold']:.6g}"
        return f"{value}{source}"

    if outcome == "kept":
        return None
    if outcome == "exact_duplicate":
        return f"same image bytes as record {twin} ({twin_keys.get(twin)!r}); not decoded"
    if outcome == "undecodable":
        return str(x["error"][i])
    if outcome == "duplicate":
        return f"near duplicate of record {twin} ({twin_keys.get(twin)!r})"
    for spec in FILTERS:
        entry = thresholds.get(spec.name)
        if entry is None or not entry.get("enabled", True):
            continue
        if spec.missing is not None and spec.missing.outcome == outcome and not x[spec.missing.column][i]:
            return spec.missing.reason
        if spec.outcome == outcome:
            value = spec.values_of({name: x[name][i : i + 1] for name in spec.column_names})
            if not spec.passes(value, entry["threshold"])[0]:
                return spec.reason_for(float(value[0]), t(spec.name), _row(x, i))
    raise AssertionError(f"no filter explains outcome {outcome!r} of row {i}")


def _skipped_tables(run_root: RunRoot | str, schema: pa.Schema = STATUS) -> Iterator[pa.Table]:
    """Rows for the members the index skipped, in the status layout ``schema``."""
    from winnow.data.index import read_skipped

    for t in read_skipped(run_root):
        n = t.num_rows
        nulls = {name: pa.nulls(n, schema.field(name).type) for name in schema.names}
        cols = {**nulls, **{name: t.column(name) for name in ("key", "shard", "outcome", "reason", "duplicate_of_key")
                            if name in t.column_names}}
        yield pa.table(cols).select(schema.names).cast(schema)


def iter_status(run_root: RunRoot | str, plan: RowGroupPlan | None = None, *, skipped: bool = True) -> Iterator[pa.Table]:
    """Every status row of a run: each committed row group's, then the index's skipped members."""
    store = CommitStore(run_root)
    if plan is None:
        from winnow.data.index import load_index

        plan = load_index(run_root).plan
    for p in range(plan.num_partitions):
        done = store.completed(STAGE, p)
        for rg in plan.partition_row_groups(p):
            if rg in done:
                yield store.read_table(STAGE, p, rg)
    if skipped:
        yield from _skipped_tables(run_root, status_schema(has_corpus(store)))


def count_outcomes(run_root: RunRoot | str, plan: RowGroupPlan) -> dict[str, Any]:
    """The run's counts from its committed status rows: ``records`` (every indexed record, exact
    duplicates included) is the sum of the outcome counts (:data:`COUNT_NAMES`); ``skipped``
    counts the members the index skipped by outcome; ``written`` the rows of the write stage's
    Parquet files committed so far; ``thresholds`` the thresholds actually used."""
    store = CommitStore(run_root)
    names = count_names(has_corpus(store))
    counts: dict[str, Any] = {"records": 0, **dict.fromkeys(names.values(), 0)}
    skipped = dict.fromkeys(SKIPPED_OUTCOMES, 0)
    missing = 0
    written = 0
    for p in range(plan.num_partitions):
        done = store.completed(STAGE, p)
        done_write = store.completed("write", p)
        for rg in plan.partition_row_groups(p):
            if rg not in done:
                missing += 1
                continue
            rg_counts = _row_group_counts(store, p, rg)
            for v, c in rg_counts.items():
                counts[names[v]] += c
            counts["records"] += sum(rg_counts.values())
            if rg in done_write:
                # Its own footer, not the kept count: a takedown removes rows from it later.
                with store.fs.open_input_file(store.row_group_path("write", p, rg)) as f:
                    written += pq.ParquetFile(f).metadata.num_rows
    for t in _skipped_tables(run_root):
        for v, c in zip(*np.unique(np.asarray(t.column("outcome").to_pylist(), dtype=object), return_counts=True)):
            skipped[str(v)] = skipped.get(str(v), 0) + int(c)
    counts["written"] = written
    counts["skipped_members"] = skipped
    if missing:
        counts["row_groups_without_status"] = missing
    try:
        counts["thresholds"] = {name: e["threshold"] for name, e in load_thresholds(store).items()}
    except Exception:  # noqa: BLE001 - a run stopped before its thresholds has none to show
        counts["thresholds"] = None
    assert sum(counts[n] for n in names.values()) == counts["records"]
    return counts


__all__ = ["COUNT_NAMES", "OUTCOMES", "StatusConfig", "StatusStage", "count_outcomes", "iter_status", "status_schema",
           "with_outcome_counts"]
