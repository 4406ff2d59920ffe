"""The ``>>>`` examples in the engine's docstrings run as tests, so they cannot rot."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import winnow

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(winnow.__path__, "winnow.")
    if ">>>" in Path(importlib.util.find_spec(m.name).origin).read_text()
)


def test_the_engine_has_examples_to_run():
    assert len(MODULES) >= 5, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has '>>>' but no example ran"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see output above)"
