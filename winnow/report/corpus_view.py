"""The corpus of a run, as the curation view's Corpus tab shows it: the published runs in
generation order (this run marked), the totals, and the takedowns, all from the corpus head
(:meth:`winnow.corpus.Corpus.head`, one small read; nothing corpus-sized is read).

Which corpus a run builds (:func:`run_corpus_uri`): what the run root says it used (its corpus
pre-check's record ``corpus/_pre.json``, else its summary's config), else what the DAG run's conf
names (a run that has not reached its corpus steps yet). A run with neither has no corpus.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The run's corpus and the counts the view lists are the card's too (the card is written by the
# report step, a floor below this one).
from winnow.card import RUN_COUNTS, run_corpus_uri  # noqa: F401  (the view's names for them)
from winnow.rowgroups import RunRoot
from winnow.runkey import run_key_of


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def corpus_view(corpus_uri: str, storage: Any, run_key: str) -> dict[str, Any]:
    """The corpus at ``corpus_uri`` (reached with ``storage``, the run's settings) as the view
    shows it, with run ``run_key``'s place in it::

        {"corpus_uri", "generation", "records" (as the corpus stands: published minus taken down),
         "published_records", "taken_down", "runs": [{"run_key", "logical_date", "generation",
         "published_at", "records" (added), "left_out" (listed by a takedown at publish),
         "counts": {RUN_COUNTS...}, "this": bool}...] (generation order),
         "takedowns": [{"id", "generation", "date", "reason", "identifiers", "removed",
         "run_keys", "files_rewritten"}...] (generation order),
         "this_run": {"run_key", "published", "generation", "logical_date"}}

    Raises :class:`~winnow.corpus.CorpusError` for a head this winnow cannot read.
    """
    from winnow.corpus import open_corpus

    corpus = open_corpus(corpus_uri, storage)
    head = corpus.head()
    runs = []
    for r in sorted(head.runs, key=lambda r: _int(r.get("generation"))):
        counts = r.get("counts") if isinstance(r.get("counts"), dict) else {}
        runs.append({
            "run_key": r.get("run_key"), "logical_date": r.get("logical_date"), "generation": r.get("generation"),
            "published_at": r.get("published_at"), "records": _int(r.get("records")),
            "left_out": _int(r.get("taken_down")),
            "counts": {k: counts[k] for k in RUN_COUNTS if k in counts},
            "this": r.get("run_key") == run_key,
        })
    takedowns = [{k: t.get(k) for k in ("id", "generation", "date", "reason", "identifiers", "removed", "run_keys",
                                         "files_rewritten")}
                 for t in sorted(head.takedowns, key=lambda t: _int(t.get("generation")))]
    published = sum(r["records"] for r in runs)
    taken_down = sum(_int(t.get("removed")) for t in takedowns)
    mine = next((r for r in runs if r["this"]), None)
    return {
        "corpus_uri": corpus.root.uri,
        "generation": head.generation,
        "records": published - taken_down,
        "published_records": published,
        "taken_down": taken_down,
        "runs": runs,
        "takedowns": takedowns,
        "this_run": {"run_key": run_key, "published": mine is not None,
                     "generation": mine["generation"] if mine else None,
                     "logical_date": mine["logical_date"] if mine else None},
    }


def run_corpus(run_root: RunRoot, conf: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """:func:`corpus_view` of the corpus the run at ``run_root`` builds (reached with the run
    root's storage settings), None for a run without a corpus."""
    uri = run_corpus_uri(run_root, conf)
    if uri is None:
        return None
    return corpus_view(uri, run_root.storage, run_key_of(run_root.uri))


__all__ = ["RUN_COUNTS", "corpus_view", "run_corpus", "run_corpus_uri"]
