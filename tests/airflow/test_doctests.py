"""The ``>>>`` examples of the Airflow package run as tests, as the engine's do
(``tests/test_doctests.py``), and every example that names the package says ``winnow_airflow``:
what a user installs and imports, never the ``operators`` folder it is built from."""

from __future__ import annotations

import re

import pytest

import winnow_airflow
from tests.airflow.conftest import REPO
from tests.test_doctests import assert_examples_pass, modules_with_examples

MODULES = modules_with_examples(winnow_airflow)
#: Where examples of the Airflow side may be written.
PLACES = ("operators", "plugins", "dags", "docs")
#: An example line (``>>>`` or its ``...`` continuation) that imports or names the folder's name.
FOLDER_NAME = re.compile(r"^\s*(>>>|\.\.\.)\s.*(\bfrom\s+operators\b|\bimport\s+operators\b|(?<![\w.])operators\.\w)")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name):
    assert_examples_pass(name)


def test_examples_name_the_package_winnow_airflow():
    files = [p for place in PLACES for p in (REPO / place).rglob("*") if p.suffix in (".py", ".md")]
    files.append(REPO / "README.md")
    wrong = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files
             for i, line in enumerate(p.read_text().splitlines(), 1) if FOLDER_NAME.search(line)]
    assert not wrong, "examples must import winnow_airflow, not operators:\n" + "\n".join(wrong)
    assert MODULES, "winnow_airflow has no '>>>' examples left to run"
