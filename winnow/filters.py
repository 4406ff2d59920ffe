"""The filters, declared once: what each reads, which side it keeps, its params and its words.

A filter is one :class:`FilterSpec` in :data:`FILTERS` plus its compute (the stage that writes
the column it reads). Everything else derives from this list: the thresholds step, the outcome
rule (first match wins, in list order), the status rows' columns and reasons, the summary's
counts, the gallery's outcomes and the write schema's columns, the scores view's histograms and
sliders, ``CurationConfig``'s fields and the DAG's params. Nothing outside a filter's own module,
this list and the stage registry names a filter.

>>> [f.name for f in BUILTIN]
['min_image_side', 'max_aspect_ratio', 'min_caption_words', 'aesthetic', 'nsfw', 'clip_score', 'watermark']
>>> OUTCOMES[:6], OUTCOMES[-2:]
(('exact_duplicate', 'takedown', 'corpus_duplicate', 'image_size', 'caption_length', 'undecodable'), ('duplicate', 'kept'))
>>> COUNT_NAMES["image_size"], COUNT_NAMES["no_caption"], COUNT_NAMES["kept"]
('image_size_dropped', 'no_caption', 'kept')
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from winnow.checks import number_problem

Keep = Literal[">=", "<", "<="]


@dataclass(frozen=True)
class FilterParam:
    """One knob of a filter: a DAG param and a ``CurationConfig`` field of the same name.

    :param nullable: None is a value ("unset"): keep fractions.
    :param low_open: the range excludes ``low`` (``0 < f``).
    """

    name: str
    default: float | int | None
    low: float
    high: float | None
    title: str
    description: str
    integer: bool = False
    nullable: bool = False
    low_open: bool = False

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` for this param, in words; None when it is fine (the one
        knob check, :func:`winnow.checks.number_problem`)."""
        return number_problem(self.name, value, low=self.low, high=self.high, low_open=self.low_open,
                              integer=self.integer, nullable=self.nullable)

    def json_schema(self) -> dict[str, Any]:
        """The DAG param's JSON schema keywords."""
        kind = "integer" if self.integer else "number"
        schema: dict[str, Any] = {"type": ["null", kind] if self.nullable else kind}
        schema["exclusiveMinimum" if self.low_open else "minimum"] = self.low
        if self.high is not None:
            schema["maximum"] = self.high
        return schema


@dataclass(frozen=True)
class MissingRule:
    """What happens, while the filter is on, to a record that has no value to compare: it is
    dropped with an outcome of its own (``column`` false), decided just before the filter's."""

    column: str  # a boolean column of the filter's stage: true when the record has the value
    outcome: str
    count: str
    reason: str
    label: str  # the outcome in a few words, for the gallery's menu


@dataclass(frozen=True)
class FilterSpec:
    """One filter.

    :param name: the filter's one word (its params start with it, and its outcome defaults to it).
    :param stage: the stage whose row-group files hold its columns (``index`` for values read
        from the shard headers: such a filter drops records before they are decoded).
    :param columns: the columns it reads, with their Arrow type names (``"float32"``,
        ``"int32"``: this module imports no Arrow, the DAG file reads it at parse time); status
        rows, the curated Parquet and the gallery carry them (one copy of a column two filters
        read).
    :param keep: a record is kept when ``value <keep> threshold``.
    :param threshold: the absolute threshold param.
    :param fraction: the keep-fraction param (the threshold becomes the run's quantile), if any.
    :param outcome: the outcome of a record it drops; several filters may share one.
    :param count: the summary's count of that outcome.
    :param reason: the status row's reason, a format string over ``value``, ``threshold`` (the
        threshold in words), ``param`` and the columns.
    :param label: what the value is, for people (histogram captions, slider labels).
    :param off: the threshold value that turns the filter off (None: always on).
    :param missing: what happens to a record without a value while the filter is on; None: it
        fails the comparison (NaN is never kept), unless ``unknown_passes``.
    :param unknown_passes: a record whose value is unknown (NaN: an image header no one could
        read) passes this filter and goes on to be judged by the others (the decoder, for one).
    :param value: the value from the columns (default: the first column as float).
    :param before_decode: decided from the index alone: a record it drops is never decoded nor
        embedded (its threshold has no keep fraction: that needs every score first).
    :param always_fingerprinted: its params are in the thresholds step's fingerprint even while
        it is off (the filters older than off-able filters; later ones join the fingerprint only
        when on, so an existing run root keeps its fingerprints).
    :param edges_range: fixed histogram range (e.g. a probability's 0..1); None: the data's.
    """

    name: str
    stage: str
    columns: tuple[tuple[str, str], ...]
    keep: Keep
    threshold: FilterParam
    reason: str
    label: str
    fraction: FilterParam | None = None
    outcome: str = ""
    count: str = ""
    off: float | None = None
    missing: MissingRule | None = None
    value: Callable[[Mapping[str, np.ndarray]], np.ndarray] | None = field(default=None, compare=False)
    before_decode: bool = False
    unknown_passes: bool = False
    always_fingerprinted: bool = False
    edges_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not self.outcome:
            object.__setattr__(self, "outcome", self.name)
        if not self.count:
            object.__setattr__(self, "count", f"{self.outcome}_dropped")
        if self.before_decode and (self.fraction is not None or self.stage != "index"):
            raise AssertionError(f"filter {self.name!r}: a filter decided before decode reads the index "
                                 "and has no keep fraction")

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    @property
    def params(self) -> tuple[FilterParam, ...]:
        return (self.threshold,) if self.fraction is None else (self.threshold, self.fraction)

    def enabled(self, values: Mapping[str, Any]) -> bool:
        """Whether the filter drops anything with these param values (an absent param: off)."""
        if self.off is None:
            return True
        fraction = values.get(self.fraction.name) if self.fraction else None
        return fraction is not None or values.get(self.threshold.name, self.off) != self.off

    def values_of(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """The value compared with the threshold (NaN: none), from float arrays of the columns
        (null as NaN). A stored score stays float32: compared with a Python float threshold, the
        comparison is made in float32, the precision the score was committed in."""
        if self.value is not None:
            return np.asarray(self.value(columns), dtype=np.float64)
        return np.asarray(columns[self.column_names[0]])

    def passes(self, values: np.ndarray, threshold: float | None) -> np.ndarray:
        """Keep flags (NaN: never kept, unless ``unknown_passes``; threshold None: none kept)."""
        if threshold is None:
            return np.zeros(len(values), dtype=bool)
        threshold = float(threshold)  # a Python float: compared in the values' own precision
        with np.errstate(invalid="ignore"):
            if self.keep == ">=":
                kept = values >= threshold
            elif self.keep == "<":
                kept = values < threshold
            else:
                kept = values <= threshold
        return kept | np.isnan(values) if self.unknown_passes else kept

    def reason_for(self, value: float, threshold_text: str, row: Mapping[str, Any]) -> str:
        return self.reason.format(value=value, threshold=threshold_text, param=self.threshold.name, **row)


# ---- the filters -------------------------------------------------------------------------------

def _shorter_side(c: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.minimum(np.asarray(c["width"], np.float64), np.asarray(c["height"], np.float64))


def _aspect_ratio(c: Mapping[str, np.ndarray]) -> np.ndarray:
    w, h = np.asarray(c["width"], np.float64), np.asarray(c["height"], np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.maximum(w, h) / np.minimum(w, h)


def _words(c: Mapping[str, np.ndarray]) -> np.ndarray:
    words = np.asarray(c["caption_words"], np.float64)
    return np.where(np.isnan(words), 0.0, words)  # no caption: no words


#: The image's size, from its header (the index's columns).
_SIZE = (("width", "int32"), ("height", "int32"))

#: The filters winnow ships, in the order a record's outcome checks them.
BUILTIN: tuple[FilterSpec, ...] = (
    # DataComp's basic filter: shorter side >= 200 px, aspect ratio <= 3. Decided from the
    # image header the index read: a record dropped for its size is never decoded.
    FilterSpec(
        "min_image_side", "index", _SIZE, ">=",
        FilterParam("min_image_side", 0, 0, None, "Min image side",
                    "Drop images whose shorter side has fewer pixels (from the image header: never decoded); "
                    "0 = off. DataComp's basic filter uses 200.", integer=True),
        reason="{width}x{height} px: shorter side {value:.0f} < {param} {threshold}",
        label="shorter image side (px)", outcome="image_size", off=0, value=_shorter_side, before_decode=True,
        unknown_passes=True,
    ),
    FilterSpec(
        "max_aspect_ratio", "index", _SIZE, "<=",
        FilterParam("max_aspect_ratio", 0.0, 0, None, "Max aspect ratio",
                    "Drop images whose longer side is more than this many times the shorter (from the image "
                    "header: never decoded); 0 = off. DataComp's basic filter uses 3."),
        reason="{width}x{height} px: aspect ratio {value:.3g} > {param} {threshold}",
        label="aspect ratio (longer / shorter side)", outcome="image_size", off=0.0,
        value=_aspect_ratio, before_decode=True, unknown_passes=True,
    ),
    # DataComp's basic filter keeps captions of more than 2 words. The words come from the
    # index (which read the sidecars): a record dropped for its caption is never decoded.
    FilterSpec(
        "min_caption_words", "index", (("caption_words", "int32"),), ">=",
        FilterParam("min_caption_words", 0, 0, None, "Min caption words",
                    "Drop records whose caption has fewer words (no caption: 0 words; never decoded); 0 = off. "
                    "DataComp's basic filter keeps more than 2 (3).", integer=True),
        reason="caption of {value:.0f} words < {param} {threshold}", label="caption words", outcome="caption_length",
        off=0, value=_words, before_decode=True,
    ),
    FilterSpec(
        "aesthetic", "aesthetic", (("aesthetic_score", "float32"),), ">=",
        FilterParam("aesthetic_threshold", 5.0, 0, 10, "Aesthetic threshold",
                    "Keep images whose aesthetic score (LAION scale 1-10; 5.0 is typical) is at least this."),
        fraction=FilterParam("aesthetic_keep_fraction", None, 0, 1, "Aesthetic keep fraction",
                             "Keep this fraction (0-1] of the scored images instead: the threshold becomes the run's "
                             "(1 - f) quantile.", nullable=True, low_open=True),
        reason="aesthetic_score {value:.4f} < threshold {threshold}", label="aesthetic score",
        always_fingerprinted=True,
    ),
    FilterSpec(
        "nsfw", "nsfw", (("nsfw_score", "float32"),), "<",
        FilterParam("nsfw_threshold", 0.5, 0, 1, "NSFW threshold",
                    "Drop images whose NSFW probability (0-1) is at least this."),
        reason="nsfw_score {value:.4f} >= threshold {threshold}", label="nsfw probability",
        always_fingerprinted=True, edges_range=(0.0, 1.0),
    ),
    FilterSpec(
        "clip_score", "clip_score", (("clip_score", "float32"),), ">=",
        FilterParam("clip_score_threshold", 0.0, 0, 1, "CLIP score threshold",
                    "Keep records whose CLIP score (cosine of caption and image, 0-1) is at least this; 0 = off."),
        fraction=FilterParam("clip_score_keep_fraction", None, 0, 1, "CLIP score keep fraction",
                             "Keep this fraction (0-1] of the records with a CLIP score (DataComp's baseline keeps "
                             "0.3); turns the filter on.", nullable=True, low_open=True),
        reason="clip_score {value:.4f} < threshold {threshold}", label="CLIP score (caption vs image)",
        off=0.0, always_fingerprinted=True,
        missing=MissingRule("has_caption", "no_caption", "no_caption",
                            "no caption (.txt, or the json caption field) while the CLIP-score filter is on",
                            "no caption (CLIP-score filter on)"),
    ),
    # The LAION watermark detector: a second image model the embed stage runs on the same
    # decoded images as the CLIP tower (winnow.stages.watermark), so its column is embed's.
    FilterSpec(
        "watermark", "embed", (("watermark_score", "float32"),), "<",
        FilterParam("watermark_threshold", 0.0, 0, 1, "Watermark threshold",
                    "Drop images whose watermark probability (LAION watermark detector, 0-1) is at least this; "
                    "0 = off. Turning it on runs the detector in the embed stage (param watermark_weights)."),
        fraction=FilterParam("watermark_keep_fraction", None, 0, 1, "Watermark keep fraction",
                             "Keep this fraction (0-1] of the scored images, those least likely watermarked, "
                             "instead; turns the filter on.", nullable=True, low_open=True),
        reason="watermark_score {value:.4f} >= threshold {threshold}", label="watermark probability",
        off=0.0, edges_range=(0.0, 1.0),
    ),
)

#: The entry-point group a package declares filters of its own in (each entry: a FilterSpec or
#: a tuple of them). Every process of a run imports this module, so each sees the same list when
#: the package is installed everywhere the run executes.
ENTRY_POINT_GROUP = "winnow.filters"


def _installed() -> tuple[FilterSpec, ...]:
    from importlib.metadata import entry_points

    found: list[FilterSpec] = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        loaded = ep.load()
        for spec in loaded if isinstance(loaded, (tuple, list)) else (loaded,):
            if not isinstance(spec, FilterSpec):
                raise TypeError(f"entry point {ep.name!r} ({ep.value}) of group {ENTRY_POINT_GROUP!r} is no "
                                f"winnow.filters.FilterSpec: {spec!r}")
            found.append(spec)
    return tuple(found)


def _checked(specs: tuple[FilterSpec, ...]) -> tuple[FilterSpec, ...]:
    """No two filters with one name, no param two filters declare."""
    for kind, words in (("filter", [(f.name, f) for f in specs]),
                        ("param", [(p.name, f) for f in specs for p in f.params])):
        seen: dict[str, str] = {}
        for word, f in words:
            if word in seen:
                raise ValueError(f"filter {f.name!r}: {kind} {word!r} is declared twice (also by {seen[word]!r})")
            seen[word] = f.name
    return specs


#: Every filter, in the order a record's outcome checks them: winnow's, then those installed
#: packages declare (:data:`ENTRY_POINT_GROUP`).
FILTERS: tuple[FilterSpec, ...] = _checked((*BUILTIN, *_installed()))

BY_NAME: dict[str, FilterSpec] = {f.name: f for f in FILTERS}


def _unique(items: Iterator[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _filter_outcomes(specs: tuple[FilterSpec, ...]) -> Iterator[str]:
    for spec in specs:
        if spec.missing is not None:
            yield spec.missing.outcome
        yield spec.outcome


BEFORE_DECODE = tuple(f for f in FILTERS if f.before_decode)
AFTER_DECODE = tuple(f for f in FILTERS if not f.before_decode)

#: Every outcome of an indexed record, in the order they are decided (first match wins).
#: ``takedown`` and ``corpus_duplicate`` happen only in a run with a corpus (``corpus_uri``): a
#: record a takedown lists, or whose image bytes a corpus record has, is dropped before decode; a
#: record that passes the filters but is within ``dedup_eps`` of a corpus record is a
#: ``corpus_duplicate`` too (before in-run dedup).
CORPUS_OUTCOMES: tuple[str, ...] = ("takedown", "corpus_duplicate")
OUTCOMES: tuple[str, ...] = _unique(iter(("exact_duplicate", *CORPUS_OUTCOMES, *_filter_outcomes(BEFORE_DECODE),
                                         "undecodable", *_filter_outcomes(AFTER_DECODE), "duplicate", "kept")))


def passes_before_decode(params: Mapping[str, Any], columns: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Which records every before-decode filter that ``params`` turn on keeps (``columns``: the
    index's, as floats); None when none is on."""
    keep = None
    for f in BEFORE_DECODE:
        if f.enabled(params):
            passed = f.passes(f.values_of(columns), params[f.threshold.name])
            keep = passed if keep is None else keep & passed
    return keep


def before_decode_params(values: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The params of the before-decode filters ``values`` turn on, as sorted pairs (what the
    embed stage skips records by, and fingerprints)."""
    return tuple(sorted((p.name, values[p.name]) for f in BEFORE_DECODE if f.enabled(values) for p in f.params))


#: The run summary's name for the count of each outcome. A run without a corpus has no
#: ``takedowns`` nor ``corpus_duplicates`` count (:data:`CORPUS_COUNT_NAMES`): its summary is
#: what it was before corpora existed.
ALL_COUNT_NAMES: dict[str, str] = {
    "exact_duplicate": "exact_duplicates", "undecodable": "undecodable", "duplicate": "duplicates", "kept": "kept",
    "takedown": "takedowns", "corpus_duplicate": "corpus_duplicates",
    **{f.missing.outcome: f.missing.count for f in FILTERS if f.missing is not None},
    **{f.outcome: f.count for f in FILTERS},
}
ALL_COUNT_NAMES = {o: ALL_COUNT_NAMES[o] for o in OUTCOMES}
CORPUS_COUNT_NAMES: dict[str, str] = {o: ALL_COUNT_NAMES[o] for o in CORPUS_OUTCOMES}
COUNT_NAMES: dict[str, str] = {o: n for o, n in ALL_COUNT_NAMES.items() if o not in CORPUS_OUTCOMES}


def count_names(corpus: bool) -> dict[str, str]:
    """The outcome -> count name map of a run with (or without) a corpus."""
    return ALL_COUNT_NAMES if corpus else COUNT_NAMES

#: The columns the filters read, once each, in list order: status rows, the curated Parquet and
#: the gallery carry them.
VALUE_COLUMNS: tuple[tuple[str, str], ...] = tuple(
    {name: t for f in FILTERS for name, t in f.columns}.items())

#: Every filter param, in list order (threshold, then keep fraction).
PARAMS: tuple[FilterParam, ...] = tuple(p for f in FILTERS for p in f.params)


_SIDES = {">=": "below", "<": "at or above", "<=": "above"}


def outcome_labels() -> dict[str, str]:
    """Each outcome in a few words, in :data:`OUTCOMES` order (an outcome two filters share
    names both)."""
    labels: dict[str, list[str]] = {o: [] for o in OUTCOMES}
    labels["exact_duplicate"].append("exact duplicate (same image bytes)")
    labels["takedown"].append("taken down (listed by a takedown)")
    labels["corpus_duplicate"].append("already in the corpus (same bytes or near duplicate)")
    labels["undecodable"].append("undecodable")
    labels["duplicate"].append("near duplicate")
    labels["kept"].append("kept")
    for f in FILTERS:
        if f.missing is not None:
            labels[f.missing.outcome].append(f.missing.label)
        labels[f.outcome].append(f"{f.label} {_SIDES[f.keep]} threshold")
    return {o: " or ".join(dict.fromkeys(words)) for o, words in labels.items()}


def describe() -> list[dict[str, Any]]:
    """The list as JSON for the UI (the plugin serves it; the JS never names a filter)."""
    out = []
    for f in FILTERS:
        out.append({
            "name": f.name, "stage": f.stage, "columns": list(f.column_names), "keep": f.keep, "label": f.label,
            "outcome": f.outcome, "count": f.count, "threshold_param": f.threshold.name,
            "fraction_param": f.fraction.name if f.fraction else None, "off": f.off,
            "missing": None if f.missing is None else {"outcome": f.missing.outcome, "count": f.missing.count},
            "before_decode": f.before_decode,
        })
    return out


__all__ = ["AFTER_DECODE", "ALL_COUNT_NAMES", "BEFORE_DECODE", "BUILTIN", "BY_NAME", "CORPUS_COUNT_NAMES",
           "CORPUS_OUTCOMES", "COUNT_NAMES", "count_names", "ENTRY_POINT_GROUP", "FILTERS",
           "OUTCOMES", "PARAMS", "VALUE_COLUMNS", "FilterParam", "FilterSpec", "MissingRule", "before_decode_params",
           "describe", "outcome_labels", "passes_before_decode"]
