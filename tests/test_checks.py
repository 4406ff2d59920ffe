"""``winnow.checks``: one way to check a knob, one ``ConfigError`` for a bad one, and one
constant per limit in the product."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from winnow.checks import MAX_MAP_LENGTH, bool_problem, check, choice_problem, int_problem, number_problem
from winnow.exceptions import ConfigError, WinnowError

REPO = Path(__file__).resolve().parents[1]
#: The product's source: the engine, the Airflow side, the DAG and the plugin.
PRODUCT = ("winnow", "operators", "dags", "plugins")
#: Lines where 1024 means something else than Airflow's map limit.
OTHER_1024 = {
    "winnow/stages/heads.py": ("nn.Linear", "rows x 1024 floats"),  # the LAION aesthetic MLP's layer width
    "winnow/ray/units.py": ("ru_maxrss",),  # KiB to MiB
    "plugins/winnow_plugin.py": ("GZipMiddleware",),  # bytes
    "winnow/models/download.py": ("unit_divisor",),  # the progress bar's KiB
}


def _product_lines():
    for folder in PRODUCT:
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            for number, line in enumerate(path.read_text().splitlines(), 1):
                yield rel, number, line


def test_the_map_limit_is_written_once():
    found = [(rel, n, line.strip()) for rel, n, line in _product_lines()
             if re.search(r"\b1024\b", line) and not any(word in line for word in OTHER_1024.get(rel, ()))]
    assert [(rel, line) for rel, _, line in found] == [("winnow/checks.py", "MAX_MAP_LENGTH = 1024")], found


def test_error_texts_are_cut_by_the_one_cap():
    from winnow.results import MAX_ERROR_CHARS

    assert MAX_ERROR_CHARS == 2000
    cuts = [(rel, n, line.strip()) for rel, n, line in _product_lines() if re.search(r"\[:\s*(500|2000)\s*\]", line)]
    # operators/hooks.py cuts an HTTP response body (not an error text of ours).
    assert [rel for rel, _, _ in cuts] == ["operators/hooks.py"], cuts


def test_config_error_is_a_value_error_and_a_winnow_error():
    assert issubclass(ConfigError, WinnowError) and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "problem, expected",
    [
        (int_problem("n", 0, low=1), "n must be an integer >= 1, got 0"),
        (int_problem("n", 2.0, low=1), "n must be an integer >= 1, got 2.0"),
        (int_problem("n", True, low=0), "n must be an integer >= 0, got True"),
        (int_problem("n", 5, low=0, high=4, hint="0 = automatic"), "n must be an integer in [0, 4] (0 = automatic), got 5"),
        (int_problem("n", 5, high=4), "n must be an integer <= 4, got 5"),
        (number_problem("x", 0, low=0, high=1, low_open=True), "x must be a number in (0, 1], got 0"),
        (number_problem("x", -1, low=0, low_open=True), "x must be a number > 0, got -1"),
        (number_problem("x", float("inf"), low=0), "x must be a number >= 0, got inf"),
        (number_problem("x", "1", low=0, high=1, nullable=True), "x must be a number in [0, 1] or unset, got '1'"),
        (number_problem("x", 1.5, low=0, integer=True), "x must be an integer >= 0, got 1.5"),
        (choice_problem("c", "z", ("a", "b")), "c must be one of a, b, got 'z'"),
        (bool_problem("f", "false"), "f must be true or false, got 'false'"),
    ],
)
def test_a_problem_names_the_param_what_it_must_be_and_the_value(problem, expected):
    assert problem == expected


@pytest.mark.parametrize(
    "problem",
    [int_problem("n", 3, low=1, high=3), number_problem("x", None, low=0, nullable=True),
     number_problem("x", 2.0, low=0, integer=True), number_problem("x", 1, low=0, high=1, low_open=True),
     choice_problem("c", "a", ("a", "b")), bool_problem("f", False)],
)
def test_a_good_value_has_no_problem(problem):
    assert problem is None


def test_check_raises_one_config_error_naming_every_problem():
    check(None, None)
    with pytest.raises(ConfigError, match=r"^a must be an integer >= 1, got 0; b must be true or false, got 1$"):
        check(int_problem("a", 0, low=1), None, bool_problem("b", 1))


def test_filter_params_say_their_problems_as_the_helper_does():
    """``FilterParam.problem`` (winnow/filters.py) and :func:`number_problem` agree wherever
    both have a range, so a user reads one kind of sentence for every knob."""
    from winnow.filters import PARAMS

    for param in PARAMS:
        if param.high is None:
            continue
        for value in (param.low - 1, param.high + 1, "x", None, True):
            mine = number_problem(param.name, value, low=param.low, high=param.high, low_open=param.low_open,
                                  integer=param.integer, nullable=param.nullable)
            assert param.problem(value) == mine, (param.name, value)


def test_map_limit_is_airflows_default_max_map_length():
    assert MAX_MAP_LENGTH == 1024
