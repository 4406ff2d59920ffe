"""The outcome rule (winnow.stages.kept): first match wins, in the declared order of the filters."""

from __future__ import annotations

import numpy as np

from winnow.filters import ALL_COUNT_NAMES, BEFORE_DECODE, CORPUS_OUTCOMES, COUNT_NAMES, FILTERS, OUTCOMES, count_names
from winnow.stages.kept import filter_outcomes


def test_first_match_wins_in_the_declared_order():
    t = {"aesthetic": {"threshold": 5.0, "keep": ">="}, "nsfw": {"threshold": 0.5, "keep": "<"},
         "clip_score": {"threshold": 0.2, "keep": ">=", "enabled": True}}
    x = {"exact_duplicate": np.array([False, True, False, False, False, False, False]),
         "decoded": np.array([True, False, False, True, True, True, True]),
         "aesthetic_score": np.array([6, np.nan, np.nan, 4, 6, 6, 4], np.float32),
         "nsfw_score": np.array([0.1, np.nan, np.nan, 0.1, 0.1, 0.1, 0.9], np.float32),
         "has_caption": np.array([True, True, True, True, False, True, False]),
         "clip_score": np.array([0.3, np.nan, np.nan, 0.3, np.nan, 0.1, np.nan], np.float32)}
    for spec in BEFORE_DECODE:  # no record breaks a before-decode filter here (they are off)
        for name in spec.column_names:
            x[name] = np.full(7, 1000, np.float32)
    assert filter_outcomes(t, x).tolist() == ["", "exact_duplicate", "undecodable", "aesthetic", "no_caption",
                                              "clip_score", "aesthetic"]
    # A filter that is off drops nothing, nor does its missing-value rule; one the thresholds do not
    # list (added after the run's thresholds step) is off.
    off = {**t, "clip_score": {**t["clip_score"], "enabled": False}}
    assert filter_outcomes(off, x).tolist() == ["", "exact_duplicate", "undecodable", "aesthetic", "", "", "aesthetic"]
    assert filter_outcomes({k: v for k, v in t.items() if k != "clip_score"}, x).tolist()[4:6] == ["", ""]


def test_outcomes_and_counts_derive_from_the_filter_list():
    assert OUTCOMES[:3] == ("exact_duplicate", *CORPUS_OUTCOMES) and OUTCOMES[-2:] == ("duplicate", "kept")
    assert OUTCOMES.index("undecodable") == 1 + len(CORPUS_OUTCOMES) + len({f.outcome for f in BEFORE_DECODE})
    for f in FILTERS:
        assert f.outcome in OUTCOMES and COUNT_NAMES[f.outcome] == f.count
        if f.missing is not None:
            assert OUTCOMES.index(f.missing.outcome) < OUTCOMES.index(f.outcome)
    # A run without a corpus counts every outcome but the corpus's; one with a corpus all of them.
    assert list(COUNT_NAMES) == [o for o in OUTCOMES if o not in CORPUS_OUTCOMES]
    assert list(ALL_COUNT_NAMES) == list(OUTCOMES) and len(set(ALL_COUNT_NAMES.values())) == len(OUTCOMES)
    assert count_names(False) == COUNT_NAMES and count_names(True) == ALL_COUNT_NAMES
