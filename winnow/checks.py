"""The one check of a knob's value (its type, its range, its choices) that every config uses, and
the limits knobs share. A problem is one sentence naming the param, the value and what it must be.

A config lists its problems and hands them to :func:`check`, which raises one
:class:`~winnow.exceptions.ConfigError` naming them all:

>>> check(int_problem("batch_size", 0, low=1), choice_problem("precision", "fp16", ("auto", "fp32", "bf16")))
Traceback (most recent call last):
...
winnow.exceptions.ConfigError: batch_size must be an integer >= 1, got 0; precision must be one of auto, fp32, bf16, got 'fp16'
>>> number_problem("dedup_eps", 0.05, low=0, high=1, low_open=True) is None
True
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from winnow.exceptions import ConfigError

#: Airflow's default ``[core] max_map_length``: the most mapped task instances of one task, so
#: the most partitions of a run and the most dedup buckets.
MAX_MAP_LENGTH = 1024
#: Partitions of a run when ``max_partitions`` is not given (the DAG param's default too).
DEFAULT_MAX_PARTITIONS = 64


def number_problem(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                   low_open: bool = False, integer: bool = False, nullable: bool = False,
                   hint: str = "") -> str | None:
    """What is wrong with ``value`` as the number ``name``, in words; None when it is fine.

    :param low: the least value (``low_open``: excluded); None: no bound below.
    :param high: the greatest value (included); None: no bound above.
    :param integer: a whole number, of either type (``2.0`` passes: JSON has one number type).
    :param nullable: None is a value ("unset").
    :param hint: what the value means or how to pick one, said in brackets after the range.
    """
    if value is None and nullable:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    kind = "an integer" if integer else "a number"
    return _range_problem(name, value, ok, kind, low, high, low_open=low_open, nullable=nullable, hint=hint)


def int_problem(name: str, value: Any, *, low: int | None = None, high: int | None = None,
                hint: str = "") -> str | None:
    """What is wrong with ``value`` as the Python ``int`` ``name`` (a count, a size: ``2.0`` and
    ``True`` are refused); None when it is fine. Bounds and ``hint`` as :func:`number_problem`'s."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    return _range_problem(name, value, ok, "an integer", low, high, hint=hint)


def _range_problem(name: str, value: Any, ok: bool, kind: str, low: float | None, high: float | None, *,
                   low_open: bool = False, nullable: bool = False, hint: str = "") -> str | None:
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or value <= high)
    if ok:
        return None
    if low is not None and high is not None:
        bounds = f" in {'(' if low_open else '['}{low:g}, {high:g}]"
    elif low is not None:
        bounds = f" {'>' if low_open else '>='} {low:g}"
    else:
        bounds = f" <= {high:g}" if high is not None else ""
    unset = " or unset" if nullable else ""
    why = f" ({hint})" if hint else ""
    return f"{name} must be {kind}{bounds}{unset}{why}, got {value!r}"


def choice_problem(name: str, value: Any, choices: Collection[str], *, hint: str = "") -> str | None:
    """What is wrong with ``value`` as one of ``choices``; None when it is one."""
    if isinstance(value, str) and value in choices:
        return None
    why = f" ({hint})" if hint else ""
    return f"{name} must be one of {', '.join(choices)}{why}, got {value!r}"


def bool_problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` as a flag: only ``True`` and ``False`` are (not ``"false"``,
    which Python takes as true)."""
    return None if isinstance(value, bool) else f"{name} must be true or false, got {value!r}"


def check(*problems: str | None) -> None:
    """Raise one :class:`ConfigError` naming every problem given; None is no problem."""
    found = [p for p in problems if p]
    if found:
        raise ConfigError("; ".join(found))
