"""The ``>>>`` examples in the engine's docstrings run as tests, so they cannot rot (the Airflow
package's: ``tests/airflow/test_doctests.py``, with the test Airflow set up)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import winnow


def modules_with_examples(package) -> list[str]:
    """The modules of ``package`` (an imported package) whose source holds a ``>>>`` example."""
    return sorted(
        m.name
        for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")
        if ">>>" in Path(importlib.util.find_spec(m.name).origin).read_text()
    )


def assert_examples_pass(name: str) -> None:
    """Run the ``>>>`` examples of module ``name``: at least one runs, none fails."""
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has '>>>' but no example ran"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see output above)"


MODULES = modules_with_examples(winnow)


def test_the_engine_has_examples_to_run():
    assert len(MODULES) >= 5, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name):
    assert_examples_pass(name)
