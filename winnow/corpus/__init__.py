"""The corpus: ONE curated dataset that many runs (one per logical date) build over time, at
``corpus_uri`` (a local path, ``s3://``, ``gs://``).

Each run curates its own input into its own run root, as without a corpus; publishing a run adds
its kept records to the corpus's manifest (the records stay in the run's output tars, which the
manifest points at). A takedown removes records from the runs' output and from the manifest, and
stays in force: no later publish lets a record it lists in.

Layout under the corpus root ``C`` (every file written by one whole-object write)::

    C/_corpus.json                       the head: the ONLY commit point
    C/_lease.json                        the writer's lease (publish, takedown: one at a time)
    C/uids/u<hh>/g<gen:09d>.parquet      uid -> run_key, key, bucket; sorted by uid
    C/records/c<bucket:05d>/g<gen:09d>.parquet   the manifest rows
    C/centroids/centroids.parquet        the corpus's frozen centroids
    C/takedowns/t<gen:09d>.parquet       one takedown's identifiers and what they removed
    C/_pending/publish.json              a publish in progress: the delta files it writes
    C/_pending/takedown.json             a takedown in progress: its journal

- ``_corpus.json``: ``{"format": 1, "generation": g, "uid_partitions": 256, "dim": d | null,
  "embed_fingerprint": str | null, "centroids": "centroids/centroids.parquet" | null,
  "centroids_generation": int | null, "runs": [{"run_key", "logical_date" (ISO date or null),
  "run_root" (URI), "generation", "published_at", "records" (kept records added), "counts" (the
  run's summary counts), "taken_down" (records left out because a takedown lists them)}...],
  "takedowns": [{"id", "generation", "file", "reason", "date", "identifiers", "removed",
  "run_keys", "files_rewritten"}...]}``. No head is an empty corpus at generation 0. Every publish
  and every takedown makes one new generation. Readers use only files of generations <= the
  head's: the delta files of a crashed publish (at ``generation + 1``) are invisible, and the next
  writer deletes them (``_pending/publish.json`` names them) before it writes anything.
- ``uids/u<hh>/g<gen>.parquet`` (``hh``: the uid's first two hex digits, 256 partitions): columns
  ``uid, run_key, key, bucket`` (int32), sorted by uid; one file per uid partition a generation
  touches. A uid lookup reads one partition's files, nothing else.
- ``records/c<bucket>/g<gen>.parquet``: ``uid, key, run_key, run_root, tar`` (the output tar,
  relative to ``run_root``: ``write/p00000/rg000000000.tar``), ``members`` (its members in that
  tar: the image, then ``.txt`` / ``.json``), ``url`` (the JSON sidecar's ``url_field``; null
  without one), ``caption``, the filter values (:data:`winnow.schemas.VALUE_FIELDS`) and
  ``embedding`` (``list<float16, dim>``). ``bucket`` is the index of the nearest corpus centroid
  (max dot product; embeddings are L2-normalised).
- ``centroids/centroids.parquet`` (column ``centroid``, ``list<float32, d>``): copied from the
  dedup centroids of the first published run that has committed centroids, and never changed
  afterwards. The rule while the corpus has none (its first runs kept nothing, so they committed
  no centroids): every record is in bucket 0; the first publish that brings centroids freezes
  them (``centroids_generation``), and from then on records are bucketed by them. Records already
  in the corpus never move: those of generations before ``centroids_generation`` stay in
  bucket 0 (a near-duplicate check must read bucket 0's files of those generations as well).
- ``takedowns/t<gen>.parquet``: ``identifier, kind`` (``uid`` | ``key`` | ``url``), ``reason,
  date, removed_uids, removed_run_keys, files`` (the output files rewritten for it).

The Python API: :class:`Corpus` / :func:`open_corpus` (the read side: :meth:`Corpus.head`,
:meth:`Corpus.lookup_uids`, :meth:`Corpus.takedown_identifiers`, :meth:`Corpus.read_bucket`...),
:func:`iter_records` (the corpus as it stands), :func:`publish` and :func:`takedown`. Run roots
named in the head are reached with the corpus's storage settings.

Test-only: the environment variable ``WINNOW_TEST_CORPUS_KILL`` (:data:`~winnow.corpus.layout.KILL_ENV`)
set to ``publish:after_files`` or ``takedown:after_rewrite:<n>`` SIGKILLs the process at that
point (the crash tests); never set it outside a test.
"""

from winnow.corpus.layout import (
    KILL_ENV,
    Corpus,
    CorpusHead,
    classify,
    is_published,
    iter_records,
    open_corpus,
    records_schema,
)
from winnow.corpus.publish import publish
from winnow.corpus.takedown import read_identifiers, takedown
from winnow.exceptions import CorpusChanged, CorpusError

__all__ = [
    "KILL_ENV",
    "Corpus",
    "CorpusChanged",
    "CorpusError",
    "CorpusHead",
    "classify",
    "is_published",
    "iter_records",
    "open_corpus",
    "publish",
    "read_identifiers",
    "records_schema",
    "takedown",
]
