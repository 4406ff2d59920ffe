"""The ``thresholds`` step: the threshold each score filter actually uses over a whole run.

A filter keeps a record by its score against a threshold: ``aesthetic_score >= t``,
``nsfw_score < t``, ``clip_score >= t``. The threshold is either the absolute value a user
gives (``aesthetic_threshold``...) or, with a keep fraction ``f`` (``aesthetic_keep_fraction``,
``clip_score_keep_fraction``; 0 < f <= 1), the score of the ``k = max(1, round(f * n))``-th best
of the ``n`` records that have that score over the whole run: the (1 - f) quantile. Keeping every
record scoring at least it keeps ``k`` records, plus the ties of the k-th. A filter that keeps low
values (``<``, ``<=``: the watermark probability) keeps the ``k`` lowest instead: its threshold is
the k-th smallest (for ``<``, the next float32 above it), so the ties of the k-th are kept too.

The quantile is exact and its memory is bounded whatever the run's size: float32 scores map
onto order-preserving 32-bit keys, a first pass over every row group's score column counts the
top 16 bits of each key (65,536 counters), a second pass counts the low 16 bits of the keys
inside the one bin that holds the k-th best. Only score columns are read, one row group at a
time. The result is committed as ``thresholds/thresholds.json`` with the step's fingerprint
digest: a rerun finds it and computes nothing; a changed threshold or fraction changes this
step's fingerprint and so the fingerprints of every step after it (dedup, status, write),
never those of the scores.

``clip_score_threshold = 0`` with no ``clip_score_keep_fraction`` turns the CLIP-score filter
off: no record is dropped for its CLIP score or for having no caption.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from winnow.exceptions import ConfigError, StorageError
from winnow.execution import Execution
from winnow.filters import FILTERS, PARAMS, FilterSpec
from winnow.rowgroups import CommitStore, RowGroupPlan, RunRoot, StageFingerprint
from winnow.rowgroups.store import read_json, write_json

STAGE = "thresholds"
THRESHOLDS_FILE = "thresholds.json"


class ThresholdsConfig:
    """The filters' knobs (:data:`winnow.filters.PARAMS`: each filter's threshold and keep
    fraction), checked here against each param's declared range: every problem in one
    :class:`ConfigError`. Unset params take their declared defaults.

    >>> ThresholdsConfig(aesthetic_keep_fraction=0.5).aesthetic_keep_fraction
    0.5
    >>> ThresholdsConfig(nsfw_threshold=2)
    Traceback (most recent call last):
    ...
    winnow.exceptions.ConfigError: nsfw_threshold must be a number in [0, 1], got 2
    """

    __slots__ = ("values",)

    def __init__(self, **values: Any) -> None:
        known = {p.name: p for p in PARAMS}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown filter param(s) {', '.join(unknown)}; they are {', '.join(known)}")
        full = {name: values.get(name, p.default) for name, p in known.items()}
        problems = [msg for name, p in known.items() if (msg := p.problem(full[name]))]
        if problems:
            raise ConfigError("; ".join(problems))
        object.__setattr__(self, "values", full)

    def __getattr__(self, name: str) -> Any:
        try:
            return object.__getattribute__(self, "values")[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ThresholdsConfig is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ThresholdsConfig) and self.values == other.values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.values.items())))

    def __repr__(self) -> str:
        return f"ThresholdsConfig({', '.join(f'{k}={v!r}' for k, v in self.values.items())})"

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.values)

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "values", state)

    def enabled(self, spec: FilterSpec) -> bool:
        return spec.enabled(self.values)

    def fraction(self, spec: FilterSpec) -> float | None:
        return self.values[spec.fraction.name] if spec.fraction else None

    def threshold(self, spec: FilterSpec) -> float:
        return self.values[spec.threshold.name]

    def fingerprint_config(self) -> dict[str, Any]:
        # A filter newer than the first three joins the fingerprint only while it is on, so run
        # roots made before it existed keep their fingerprints.
        params = {p.name: self.values[p.name] for f in FILTERS if f.always_fingerprinted or self.enabled(f)
                  for p in f.params}
        return {**params, "selection": "exact-radix-v1"}


def thresholds_config(run: Any, _name: str = STAGE) -> ThresholdsConfig:
    """The step's config from a run's ``CurationConfig`` (the registry's ``config`` factory)."""
    return ThresholdsConfig(**{p.name: getattr(run, p.name) for p in PARAMS})


# ---- exact k-th best of float32 scores in bounded memory -------------------------------------

def _keys(scores: np.ndarray) -> np.ndarray:
    """Order-preserving uint32 keys of finite float32 scores (bigger score, bigger key)."""
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)
    negative = (bits >> 31).astype(bool)
    return np.where(negative, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def _score_of(key: int) -> float:
    bits = (key & 0x7FFFFFFF) if key & 0x80000000 else (~key & 0xFFFFFFFF)
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def kth_best(chunks: Callable[[], Any], k: int) -> float:
    """The ``k``-th largest value (1-based) of the float32 scores ``chunks()`` yields (each call a
    fresh iterator of arrays; NaN skipped), exactly, with 2 x 65,536 counters of memory.

    >>> data = [np.array([0.5, 3.0, np.nan], np.float32), np.array([-1.0, 2.0, 2.0], np.float32)]
    >>> [kth_best(lambda: iter(data), k) for k in (1, 2, 3, 4, 5)]
    [3.0, 2.0, 2.0, 0.5, -1.0]
    """
    return _select(chunks, _high_histogram(chunks), k)


def _high_histogram(chunks: Callable[[], Any]) -> np.ndarray:
    """Pass 1: how many scores have each value of their key's top 16 bits (its sum: how many
    scores there are)."""
    high = np.zeros(1 << 16, dtype=np.int64)
    for chunk in chunks():
        keys = _keys(chunk[~np.isnan(chunk)])
        high += np.bincount(keys >> 16, minlength=1 << 16)
    return high


def _select(chunks: Callable[[], Any], high: np.ndarray, k: int) -> float:
    """Pass 2: the k-th best score, from pass 1's histogram and the low 16 bits of the keys in
    the one bin that holds it."""
    above = np.cumsum(high[::-1])  # above[i]: keys in the top i+1 bins
    top = int(np.searchsorted(above, k))  # first count reaching k, from the top
    if top >= len(above):
        raise ValueError(f"asked for the {k}-th best of {int(above[-1])} scores")
    bin_hi = (1 << 16) - 1 - top
    before = int(above[top - 1]) if top else 0  # keys in bins above this one
    low = np.zeros(1 << 16, dtype=np.int64)
    for chunk in chunks():
        keys = _keys(chunk[~np.isnan(chunk)])
        keys = keys[(keys >> 16) == bin_hi]
        low += np.bincount(keys & 0xFFFF, minlength=1 << 16)
    low_above = np.cumsum(low[::-1])
    j = int(np.searchsorted(low_above, k - before))
    return _score_of((bin_hi << 16) | ((1 << 16) - 1 - j))


def keep_count(fraction: float, n: int) -> int:
    """Records a keep fraction keeps of ``n`` scored ones (ties of the last aside): ``round(f n)``,
    at least 1 when there is any.

    >>> keep_count(0.5, 7), keep_count(0.3, 10), keep_count(0.001, 10), keep_count(1.0, 0)
    (4, 3, 1, 0)
    """
    return 0 if n == 0 else max(1, min(n, math.floor(fraction * n + 0.5)))


def as_scores(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Float32 scores of an Arrow column, null as NaN (no score). An integer column (a width, a
    word count) comes as float64, exact for every integer a filter compares."""
    if pa.types.is_integer(values.type):
        return values.cast(pa.float64()).fill_null(float("nan")).to_numpy(zero_copy_only=False)
    return values.fill_null(float("nan")).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


# ---- the step ------------------------------------------------------------------------------------

def filter_values(spec: FilterSpec, table: pa.Table) -> np.ndarray:
    """A filter's float64 values (NaN: none) from a table holding its columns."""
    return spec.values_of({name: as_scores(table.column(name)) for name in spec.column_names})


def _score_chunks(store: CommitStore, plan: RowGroupPlan, spec: FilterSpec, *, negated: bool = False):
    from winnow.stages.corpus_matches import has_corpus, pre_outcomes

    # A run with a corpus: the records its corpus check dropped (listed by a takedown, or bytes the
    # corpus holds) have no score, as they have none when the pre-check found them before embed,
    # so a keep fraction is taken over the same records whichever step found them.
    corpus = has_corpus(store) and spec.stage != "index"
    for p in range(plan.num_partitions):
        for rg in plan.partition_row_groups(p):
            table = store.read_table(spec.stage, p, rg, columns=list(spec.column_names) + (["record_id"] if corpus else []))
            values = filter_values(spec, table).astype(np.float32)
            if corpus:
                marked = pre_outcomes(store, table.column("record_id").to_numpy())
                if marked is not None:
                    values[marked != ""] = np.nan
            yield -values if negated else values  # negated: the k-th best is the k-th smallest


def lowest_kept_threshold(spec: FilterSpec, kth_smallest: float) -> float:
    """The threshold with which ``spec.passes`` keeps exactly the values at most the k-th smallest
    (its ties included): the value itself for ``<=``; for ``<`` the next float32 above it (the
    scores are float32 and compared in float32, so nothing lies between the two).

    >>> t = lowest_kept_threshold(type("Spec", (), {"keep": "<"})(), 0.25)
    >>> bool(np.float32(0.25) < t), bool(np.nextafter(np.float32(0.25), np.float32(1)) < t)
    (True, False)
    """
    if spec.keep == "<=":
        return kth_smallest
    return float(np.nextafter(np.float32(kth_smallest), np.float32(np.inf)))


def resolve(store: CommitStore, plan: RowGroupPlan, config: ThresholdsConfig) -> dict[str, Any]:
    """The threshold every filter uses: the absolute one, or the one its keep fraction picks."""
    out: dict[str, Any] = {}
    for spec in FILTERS:
        fraction = config.fraction(spec)
        entry: dict[str, Any] = {"keep": spec.keep, "keep_fraction": fraction, "absolute": config.threshold(spec)}
        if spec.off is not None:
            entry["enabled"] = config.enabled(spec)
        if fraction is None:
            entry.update(threshold=entry["absolute"], source=spec.threshold.name)
        else:
            low_kept = spec.keep != ">="  # "<" / "<=": the fraction keeps the lowest values
            chunks = functools.partial(_score_chunks, store, plan, spec, negated=low_kept)
            high = _high_histogram(chunks)  # its sum counts the scores: two passes in all
            n = int(high.sum())
            k = keep_count(fraction, n)
            # No scored record at all: None, and nothing passes this filter.
            threshold = _select(chunks, high, k) if k else None
            if threshold is not None and low_kept:
                threshold = lowest_kept_threshold(spec, -threshold)
            entry.update(threshold=threshold, source=spec.fraction.name, scored=n, keep_count=k)
        out[spec.name] = entry
    return out


def _thresholds_unit(run_root: RunRoot | str, plan_dict: dict, config: ThresholdsConfig, digest: str, _unit: int) -> dict[str, Any]:
    store = CommitStore(run_root)
    plan = RowGroupPlan(**plan_dict)
    result = resolve(store, plan, config)
    write_json(store.fs, store.path(STAGE, THRESHOLDS_FILE), {"digest": digest, "filters": result})
    return {"thresholds": {name: e["threshold"] for name, e in result.items()}}


def committed(store: CommitStore, digest: str | None = None) -> dict[str, Any] | None:
    """The committed thresholds (``{"digest", "filters"}``) when they match the stage's current
    fingerprint (or ``digest``); else None."""
    digest = digest or (store.read_fingerprint(STAGE) or {}).get("digest")
    data = read_json(store.fs, store.path(STAGE, THRESHOLDS_FILE)) if digest else None
    return data if data and data.get("digest") == digest else None


def thresholds_units(store: CommitStore) -> tuple[int, set[int]]:
    """The step as units, for the UI: one unit, committed when ``thresholds.json`` matches."""
    return 1, ({0} if committed(store) is not None else set())


_CACHE: dict[str, tuple[str, dict[str, Any]]] = {}


def load_thresholds(store: CommitStore) -> dict[str, Any]:
    """The committed ``{filter: {"threshold": t, "keep": ">=" | "<", ...}}`` of the run, cached
    per process and fingerprint; a :class:`StorageError` naming the step when it has not run."""
    digest = (store.read_fingerprint(STAGE) or {}).get("digest", "")
    path = store.path(STAGE, THRESHOLDS_FILE)
    hit = _CACHE.get(path)
    if hit and hit[0] == digest:
        return hit[1]
    data = committed(store, digest)
    if data is None:
        raise StorageError(f"{path} is missing or was made for another configuration: run the thresholds step "
                           "(task 'thresholds') first")
    _CACHE[path] = (digest, data["filters"])
    return data["filters"]


def run_thresholds(
    run_root: RunRoot | str, plan: RowGroupPlan, config: ThresholdsConfig, fingerprint: StageFingerprint, *,
    execution: Execution, log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Resolve and commit the run's thresholds in one unit (a Ray task: it reads every row
    group's score columns); a no-op when committed for this fingerprint."""
    from winnow.ray.units import run_units

    say = log or (lambda _m: None)
    store = CommitStore(run_root)
    data = committed(store, fingerprint.digest)
    if data is not None:
        result = {name: e["threshold"] for name, e in data["filters"].items()}
        say(f"thresholds: committed already {result}")
        return {"thresholds": result, "computed": 0}
    needs_scores = any(config.fraction(f) is not None for f in FILTERS)
    if not needs_scores:  # absolute thresholds: nothing to read
        result = _thresholds_unit(run_root, plan.to_dict(), config, fingerprint.digest, 0)
    else:
        fn = functools.partial(_thresholds_unit, run_root, plan.to_dict(), config, fingerprint.digest)
        summary = run_units(STAGE, fn, [0], execution=execution, num_cpus=1 if execution.backend == "ray" else None,
                            log=say)
        if summary.failed:
            raise StorageError(f"thresholds failed: {summary.failed[0]}")
        result = {k: v for k, v in summary.results[0].items() if k == "thresholds"}
    say(f"thresholds: {json.dumps(result['thresholds'])}")
    return {**result, "computed": 1}


__all__ = ["ThresholdsConfig", "filter_values", "keep_count", "kth_best", "load_thresholds", "run_thresholds",
           "thresholds_units"]

