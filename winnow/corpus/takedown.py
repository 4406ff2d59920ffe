"""Takedowns: remove every corpus record a list names (by uid, key or source URL) from the
corpus's output and its manifest, and keep the list in force for every later run.

Under the corpus lease:

1. **plan** - read the list; scan the manifest bucket by bucket (one bucket in memory) for the
   records it matches; read the record ids of those records from their row groups' Parquet; find
   the galleries that show them (their own row groups', and any gallery of a published run that
   shows one as a duplicate's twin);
2. **journal** - write ``_pending/takedown.json``: the identifiers, the matched records (uid, key,
   run key, run root, tar), every file to rewrite;
3. **rewrite** - per run root, the galleries (``rg*.thumbs`` then ``rg*.gallery``), then per row
   group its tar and then its ``rg*.parquet`` (:mod:`winnow.corpus.rewrite`); then the manifest
   files (``records/c*/g*.parquet``, ``uids/u*/g*.parquet``) that held the records, under the same
   names. Each file is replaced by one whole-object write;
4. **commit** - write ``takedowns/t<gen>.parquet`` and the head at ``generation + 1`` with the
   takedown's entry; delete the journal.

A rerun after a crash (SIGKILL anywhere) finds the journal and finishes that takedown first: every
rewrite is computed from the file as it is now, so a file rewritten already is left as it is. A
rerun of a finished list finds nothing more to remove and nothing new to record: a no-op. An
identifier that matches nothing is recorded all the same: no later run, and no publish, ever lets
a record it lists into the corpus.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from winnow.corpus.layout import (
    HEAD_FILE,
    TAKEDOWN_JOURNAL,
    TAKEDOWN_SCHEMA,
    Corpus,
    CorpusHead,
    classify,
    corpus_lease,
    kill_point,
    match_mask,
    open_corpus,
    records_file,
    takedown_file,
    uid_file,
    uid_partition,
)
from winnow.corpus.publish import clear_crashed_publish
from winnow.corpus.rewrite import RunRemoval, apply_removal, plan_galleries, removed_record_ids, sibling
from winnow.exceptions import CorpusError
from winnow.rowgroups.fs import RunRoot, StorageOptions, delete_file, resolve_filesystem
from winnow.rowgroups.lease import process_owner
from winnow.rowgroups.store import CommitStore, read_json, table_to_parquet_bytes, write_atomic, write_json

logger = logging.getLogger(__name__)

_MATCH_COLUMNS = ["uid", "key", "url", "run_key", "run_root", "tar"]


def read_identifiers(list_uri: str, storage: StorageOptions | None = None) -> list[str]:
    """The identifiers of a takedown list, in order, each once: a text file (one a line; blank
    lines and ``#`` comment lines ignored) or a Parquet file (column ``identifier``, else its first
    string column)."""
    fs, path = resolve_filesystem(list_uri, storage)
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise CorpusError(f"takedown list {list_uri} does not exist") from exc
    except OSError as exc:
        raise CorpusError(f"takedown list {list_uri}: cannot read it ({exc})") from exc
    values: list[str] = []
    if path.endswith(".parquet") or data[:4] == b"PAR1":
        try:
            table = pq.read_table(io.BytesIO(data))
        except pa.ArrowInvalid as exc:
            raise CorpusError(f"takedown list {list_uri}: not a readable Parquet file ({exc})") from exc
        if "identifier" in table.column_names:
            name = "identifier"
        else:
            strings = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
            if not strings:
                raise CorpusError(f"takedown list {list_uri}: a Parquet list needs a column 'identifier' (or a string "
                                  f"column); it has {table.column_names}")
            name = strings[0]
        values = [str(v).strip() for v in table.column(name).to_pylist() if v is not None]
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(f"takedown list {list_uri}: not UTF-8 text nor Parquet ({exc})") from exc
        values = [line.strip() for line in text.splitlines()]
        values = [v for v in values if not v.startswith("#")]
    out = list(dict.fromkeys(v for v in values if v))
    if not out:
        raise CorpusError(f"takedown list {list_uri} holds no identifier (one uid, key or URL per line; blank lines "
                          "and # comments are ignored)")
    return out


def _token(identifiers: list[dict], reason: str, date: str, base: int) -> str:
    payload = json.dumps({"identifiers": identifiers, "reason": reason, "date": date, "base": base}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _plan(corpus: Corpus, head: CorpusHead, identifiers: list[str], reason: str, date: str,
          storage: StorageOptions | None) -> dict[str, Any] | None:
    """The takedown's journal, or None when it removes nothing and records nothing new."""
    kinds = [(ident, classify(ident)) for ident in identifiers]
    wanted: dict[str, set[str]] = {"uid": set(), "key": set(), "url": set()}
    for ident, kind in kinds:
        wanted[kind].add(ident)
    recorded = corpus.takedown_identifiers()
    matched: list[dict[str, Any]] = []
    for bucket in corpus.buckets():
        t = corpus.read_bucket(bucket, _MATCH_COLUMNS, generation=head.generation)
        mask = match_mask(t, wanted)
        if mask.any():
            for row in t.filter(pa.array(mask)).to_pylist():
                matched.append({**row, "bucket": bucket})
    matched.sort(key=lambda r: (r["run_key"], r["tar"], r["key"], r["uid"]))
    hits: dict[str, list[int]] = {ident: [] for ident in identifiers}
    for i, row in enumerate(matched):
        for kind in ("uid", "key", "url"):
            if row[kind] is not None and row[kind] in wanted[kind]:
                hits[row[kind]].append(i)
    listed = [{"identifier": ident, "kind": kind, "matched": hits[ident]} for ident, kind in kinds
              if hits[ident] or ident not in recorded.get(kind, set())]
    if not matched and not listed:
        return None

    # Where each matched record is in its run root (its record id), and what shows it.
    pairs: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for row in matched:
        pairs.setdefault((row["run_root"], row["tar"]), set()).add((row["uid"], row["key"]))
    removals: dict[str, RunRemoval] = {}
    for (run_root, tar), want in sorted(pairs.items()):
        store = CommitStore(RunRoot(run_root, storage))
        rids = removed_record_ids(store, tar, want)
        removals.setdefault(run_root, RunRemoval(run_root)).row_groups[tar] = sorted(rids)
    removed_uids = sorted({row["uid"] for row in matched})
    thumbs: dict[str, list[str]] = {}
    run_roots = list(dict.fromkeys([r["run_root"] for r in head.runs] + list(removals)))
    for run_root in run_roots:
        removal = removals.get(run_root, RunRemoval(run_root))
        ids = {rid for rids in removal.row_groups.values() for rid in rids}
        galleries, blobs = plan_galleries(CommitStore(RunRoot(run_root, storage)), ids, set(removed_uids))
        if galleries:
            removal.galleries = galleries
            removals.setdefault(run_root, removal)
            thumbs[run_root] = blobs
    # The manifest files that hold the records: those of the generation that published each.
    manifest: dict[str, list[list[str]]] = {}
    for row in matched:
        run = head.run(row["run_key"])
        if run is None:
            raise CorpusError(f"{corpus.uri(HEAD_FILE)}: the manifest holds record {row['key']!r} of run "
                              f"{row['run_key']!r}, which the head does not list; the corpus is damaged")
        gen = int(run["generation"])
        who = [row["uid"], row["key"], row["run_key"]]
        manifest.setdefault(records_file(row["bucket"], gen), []).append(who)
        manifest.setdefault(uid_file(uid_partition(row["uid"]), gen), []).append(who)
    runs = [removals[r] for r in run_roots if r in removals]
    files = [f"{r.run_root}/{rel}" for r in runs for rel in r.files(thumbs.get(r.run_root, ()))]
    journal = {
        "base_generation": head.generation,
        "reason": reason,
        "date": date,
        "identifiers": listed,
        "matched": matched,
        "runs": [r.to_dict() for r in runs],
        "removed_uids": removed_uids,
        "run_files": files,
        "manifest": [{"file": rel, "remove": sorted(who)} for rel, who in sorted(manifest.items())],
    }
    journal["id"] = _token([{"identifier": i["identifier"], "kind": i["kind"]} for i in listed], reason, date,
                           head.generation)
    return journal


def _row_group_files(row: dict[str, Any]) -> list[str]:
    base = f"{row['run_root']}/{row['tar']}"
    return [base, sibling(base, ".parquet")]


def _summary(journal: dict[str, Any], generation: int, **extra: Any) -> dict[str, Any]:
    matched = journal["matched"]
    by_identifier = []
    for item in journal["identifiers"]:
        rows = [matched[i] for i in item["matched"]]
        files = sorted({f for r in rows for f in _row_group_files(r)})
        by_identifier.append({"identifier": item["identifier"], "kind": item["kind"],
                              "removed": [{"run_key": r["run_key"], "key": r["key"], "uid": r["uid"]} for r in rows],
                              "files": files})
    return {
        "takedown": journal["id"], "generation": generation, "reason": journal["reason"], "date": journal["date"],
        "identifiers": len(journal["identifiers"]), "removed": len(matched),
        "run_keys": sorted({r["run_key"] for r in matched}), "keys": sorted({r["key"] for r in matched}),
        "files_rewritten": len(journal["run_files"]), "manifest_files": len(journal["manifest"]),
        "by_identifier": by_identifier, **extra,
    }


def _finish(corpus: Corpus, journal: dict[str, Any], storage: StorageOptions | None,
            log: Callable[[str], None]) -> dict[str, Any]:
    """Rewrite, then commit, the takedown of ``journal`` (a new one, or one a crash left)."""
    head = corpus.head()
    done = next((t for t in head.takedowns if t.get("id") == journal["id"]), None)
    if done is not None:  # committed before the crash; only the journal was left
        delete_file(corpus.fs, corpus.path(TAKEDOWN_JOURNAL))
        return _summary(journal, int(done["generation"]))
    count = 0

    def wrote(path: str) -> None:
        nonlocal count
        count += 1
        kill_point(f"takedown:after_rewrite:{count}")

    uids = set(journal["removed_uids"])
    for run in journal["runs"]:
        apply_removal(RunRemoval.from_dict(run), storage, uids, wrote)
    for item in journal["manifest"]:
        path = corpus.path(item["file"])
        t = corpus.read_parquet(path)
        remove = {tuple(w) for w in item["remove"]}
        keep = [(u, k, r) not in remove for u, k, r in zip(*(t.column(c).to_pylist() for c in ("uid", "key", "run_key")))]
        if not all(keep):
            write_atomic(corpus.fs, path, table_to_parquet_bytes(t.filter(pa.array(keep, pa.bool_()))))
            wrote(path)

    generation = head.generation + 1
    matched = journal["matched"]
    rows = []
    for item in journal["identifiers"]:
        hit = [matched[i] for i in item["matched"]]
        rows.append({"identifier": item["identifier"], "kind": item["kind"], "reason": journal["reason"],
                     "date": journal["date"], "removed_uids": [r["uid"] for r in hit],
                     "removed_run_keys": sorted({r["run_key"] for r in hit}),
                     "files": sorted({f for r in hit for f in _row_group_files(r)})})
    file_rel = takedown_file(generation)
    write_atomic(corpus.fs, corpus.path(file_rel), table_to_parquet_bytes(pa.Table.from_pylist(rows, schema=TAKEDOWN_SCHEMA)))
    entry = {"id": journal["id"], "generation": generation, "file": file_rel, "reason": journal["reason"],
             "date": journal["date"], "identifiers": len(rows), "removed": len(matched),
             "run_keys": sorted({r["run_key"] for r in matched}), "files_rewritten": len(journal["run_files"])}
    new = CorpusHead(generation=generation, uid_partitions=head.uid_partitions, dim=head.dim,
                     embed_fingerprint=head.embed_fingerprint, centroids=head.centroids, runs=head.runs,
                     takedowns=(*head.takedowns, entry), centroids_generation=head.centroids_generation)
    write_json(corpus.fs, corpus.path(HEAD_FILE), new.to_dict())  # the commit
    delete_file(corpus.fs, corpus.path(TAKEDOWN_JOURNAL))
    return _summary(journal, generation)


def _log_summary(summary: dict[str, Any], corpus: Corpus, log: Callable[[str], None]) -> None:
    log(f"takedown {summary['takedown']} of corpus {corpus.root.uri} (generation {summary['generation']}, "
        f"reason {summary['reason']!r}): {summary['identifiers']} identifier(s) recorded, {summary['removed']} "
        f"record(s) removed from run(s) {summary['run_keys']}, {summary['files_rewritten']} output file(s) and "
        f"{summary['manifest_files']} manifest file(s) rewritten")
    for item in summary["by_identifier"]:
        removed = ", ".join(f"{r['run_key']}/{r['key']}" for r in item["removed"]) or "nothing (stays listed)"
        log(f"  {item['kind']} {item['identifier']}: removed {removed}")


def takedown(corpus_uri: str, list_uri: str, *, reason: str, storage: StorageOptions | None = None,
             owner: str | None = None, date: str | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Take down every corpus record that ``list_uri`` names (see the module docstring) and
    record the list; returns (and logs) the summary: per identifier what it removed (run keys,
    keys, uids) and the files rewritten, and the counts. Idempotent and resumable.

    ``storage`` reaches the corpus, the list and the run roots (default: the AWS environment).
    """
    log = log or logger.info
    t0 = time.perf_counter()
    storage = storage if storage is not None else StorageOptions.from_env()
    corpus = open_corpus(corpus_uri, storage)
    reason = str(reason).strip()
    if not reason:
        raise CorpusError("takedown needs a reason (a person's opt-out, a legal notice...): it is recorded with "
                          "every identifier")
    date = date or datetime.now(UTC).date().isoformat()
    owner = owner or process_owner()
    with corpus_lease(corpus, owner):
        head = corpus.head()
        clear_crashed_publish(corpus, head)
        resumed = None
        pending = read_json(corpus.fs, corpus.path(TAKEDOWN_JOURNAL))
        if pending is not None:
            log(f"takedown: finishing the takedown {pending['id']} a crash left in {corpus.uri(TAKEDOWN_JOURNAL)}")
            resumed = _finish(corpus, pending, storage, log)
            _log_summary(resumed, corpus, log)
            head = corpus.head()
        identifiers = read_identifiers(list_uri, storage)
        journal = _plan(corpus, head, identifiers, reason, date, storage)
        if journal is None:
            if resumed is not None:
                return {**resumed, "resumed": True, "seconds": round(time.perf_counter() - t0, 3)}
            log(f"takedown: every identifier of {list_uri} is recorded already and none matches a corpus record: "
                "nothing to do")
            return {"takedown": None, "generation": head.generation, "identifiers": 0, "removed": 0, "run_keys": [],
                    "keys": [], "files_rewritten": 0, "manifest_files": 0, "by_identifier": [], "noop": True,
                    "seconds": round(time.perf_counter() - t0, 3)}
        write_json(corpus.fs, corpus.path(TAKEDOWN_JOURNAL), journal)
        summary = _finish(corpus, journal, storage, log)
        _log_summary(summary, corpus, log)
        extra = {"resumed_pending": resumed} if resumed is not None else {}
        return {**summary, **extra, "seconds": round(time.perf_counter() - t0, 3)}


__all__ = ["read_identifiers", "takedown"]
