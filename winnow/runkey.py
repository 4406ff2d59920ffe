"""The run key: the one folder under ``output_root`` that holds a run (``<output_root>/<run_key>``).

One rule, used by the config check, the operators (a run without a key), the DAG's param and the
plugin (which reads run roots back from a DAG run): a run key is a plain folder name of letters,
digits, ``.``, ``_`` and ``-``, never ``.`` or ``..``. Imports nothing heavy (the DAG file reads
it at parse time).

>>> run_key_problem("20250101") is None, run_key_problem("a/b") is None, run_key_problem("..") is None
(True, False, False)
>>> run_key_problem("a/b")
"run_key must be a single folder name of letters, digits, '.', '_' and '-', got 'a/b'"
>>> default_run_key(None, "manual__2025-01-01T00:00:00+00:00")
'manual__2025-01-01T00_00_00_00_00'
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

#: A run key, as a JSON-schema pattern (the DAG's param allows the empty string: "pick one").
PATTERN = r"^[A-Za-z0-9._-]+$"
_KEY = re.compile(PATTERN)


def run_key_problem(key: Any) -> str | None:
    """Why ``key`` is not a valid run key, or None when it is."""
    if isinstance(key, str) and _KEY.match(key) and key not in (".", ".."):
        return None
    return f"run_key must be a single folder name of letters, digits, '.', '_' and '-', got {key!r}"


def default_run_key(logical_date: datetime | None, run_id: str | None) -> str:
    """The key of a run that names none: ``YYYYMMDD`` of its logical date, else its run id made
    path-safe (a manual run without a logical date)."""
    if logical_date is not None:
        return logical_date.strftime("%Y%m%d")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(run_id or "manual")).strip("_") or "manual"


def run_key_of(run_root: str) -> str:
    """The run key a run root ends in (its last path part)."""
    return run_root.rstrip("/").rsplit("/", 1)[-1]
