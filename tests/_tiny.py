"""The tiny test run: open_clip's registered ``winnow-tiny-vit`` config with random weights, and the
thresholds under which dedup is the only filter that drops records.

Random-weight scores carry no meaning (aesthetic ~5 +- 1), so the score filters keep everything
and dedup, at an eps fit for this model (it puts distinct images at cosine ~0.97-0.9995), is the
filter whose output tests compare.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from winnow.filters import FilterSpec
    from winnow.pipeline import CurationConfig

#: The tiny model, random weights allowed (a real run refuses them unless asked).
TINY_MODEL: dict[str, Any] = {"model": "winnow-tiny-vit", "pretrained": "random", "allow_random_weights": True}
#: Score filters that keep every record; dedup's eps for the tiny model.
ONLY_DEDUP: dict[str, Any] = {"aesthetic_threshold": 0.0, "nsfw_threshold": 1.0, "dedup_eps": 0.0002}


def tiny_config(**values: Any) -> CurationConfig:
    """A run with the tiny model where only dedup drops records; ``values`` (input and output,
    run key, buffer size, partitions, thresholds...) are the other fields and win."""
    from winnow.pipeline import CurationConfig  # here: the Airflow conftest imports this module first

    return CurationConfig(**{**TINY_MODEL, **ONLY_DEDUP, **values})


# ---- every filter, whatever the list holds ---------------------------------------------------------
# A test that compares a {filter: value} dict (a run's thresholds, which filters are on) or the
# outcome counts names the filters it is about and says what every other one holds: adding a
# filter to winnow.filters.FILTERS never breaks it, and a new filter is still checked.


def all_filters(named: Mapping[str, Any], rest: Callable[[FilterSpec], Any] | Any) -> dict[str, Any]:
    """``{filter: value}`` for every filter of :data:`winnow.filters.FILTERS`, in list order:
    ``named[name]`` for the filters ``named`` names, ``rest(spec)`` (or ``rest`` itself, when it
    is no callable) for every other one.

    >>> from winnow.filters import FILTERS
    >>> d = all_filters({"aesthetic": 3.0, "nsfw": 0.6}, off_threshold)
    >>> list(d) == [f.name for f in FILTERS] and (d["aesthetic"], d["nsfw"], d["clip_score"]) == (3.0, 0.6, 0.0)
    True
    """
    from winnow.filters import FILTERS

    unknown = set(named) - {f.name for f in FILTERS}
    assert not unknown, f"no such filter: {sorted(unknown)}"
    value = rest if callable(rest) else lambda _spec: rest
    return {f.name: named[f.name] if f.name in named else value(f) for f in FILTERS}


def off_threshold(spec: FilterSpec) -> float:
    """The threshold that turns ``spec`` off, as the thresholds step records it (a float). A
    filter that is always on has none: a test must name its threshold."""
    assert spec.off is not None, f"filter {spec.name!r} is always on: name its threshold"
    return float(spec.off)


def all_counts(named: Mapping[str, int]) -> dict[str, int]:
    """The run summary's count of every outcome (:data:`winnow.filters.COUNT_NAMES`, in outcome
    order): ``named[count]`` for the counts ``named`` names, 0 for every other one (a filter that
    is off drops nothing)."""
    from winnow.filters import COUNT_NAMES

    unknown = set(named) - set(COUNT_NAMES.values())
    assert not unknown, f"no such count: {sorted(unknown)}"
    return {c: named.get(c, 0) for c in COUNT_NAMES.values()}
