"""Publish: a run's kept records join the corpus in one atomic step.

Under the corpus lease: read the head; a run already in it publishes nothing. Otherwise read the
run's committed write stage (every ``write/p*/rg*.parquet`` and the member names of its tar),
leave out what a takedown lists, assign each record the bucket of its nearest corpus centroid,
write generation ``g+1``'s delta files (one per uid partition and bucket the run touches, a
deterministic layout: the same run gives the same bytes), then write the head once: the commit.

Crash-safety: before any delta file, ``_pending/publish.json`` names the files this publish
writes; the next corpus writer (a rerun of this publish, another run's, a takedown) deletes those
of a generation the head never reached before it writes anything. A crash anywhere before the head
write leaves the corpus as it was; the rerun redoes it identically.

Memory: the run's kept records (run-proportional), never anything corpus-sized.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from winnow.corpus.layout import (
    CENTROIDS_FILE,
    HEAD_FILE,
    PUBLISH_JOURNAL,
    UID_SCHEMA,
    Corpus,
    CorpusHead,
    corpus_lease,
    kill_point,
    match_mask,
    records_file,
    records_schema,
    uid_file,
    url_of,
)
from winnow.corpus.rewrite import (
    RunRemoval,
    apply_removal,
    list_write_files,
    plan_galleries,
    read_table,
    record_members,
    tar_member_names,
)
from winnow.exceptions import CorpusChanged, CorpusError
from winnow.rowgroups.fs import RunRoot, delete_file
from winnow.rowgroups.lease import process_owner
from winnow.rowgroups.store import CommitStore, parse_row_group_name, read_json, table_to_parquet_bytes, write_atomic, write_json
from winnow.schemas import VALUE_FIELDS
from winnow.stages.write import STAGE as WRITE_STAGE

logger = logging.getLogger(__name__)

CENTROIDS_META = b"winnow.corpus.centroids"


def clear_crashed_publish(corpus: Corpus, head: CorpusHead) -> None:
    """Delete the delta files of a publish that crashed before its head write (its journal names
    them), so that no later generation ever picks them up; then the journal."""
    journal = read_json(corpus.fs, corpus.path(PUBLISH_JOURNAL))
    if journal is None:
        return
    if int(journal.get("generation", 0)) > head.generation:
        for rel in journal.get("files", []):
            if rel == head.centroids:
                continue  # the committed centroids (never the case, but never delete them)
            delete_file(corpus.fs, corpus.path(rel))
    delete_file(corpus.fs, corpus.path(PUBLISH_JOURNAL))


def _read_run(run_root: RunRoot, run_key: str, url_field: str) -> tuple[pa.Table, int | None]:
    """The run's kept records in manifest columns plus ``record_id`` (row-group order), and the
    embedding width (None for a run without a row group)."""
    store = CommitStore(run_root)
    fp = store.read_fingerprint(WRITE_STAGE)
    if fp is None:
        raise CorpusError(f"run {run_key!r} at {run_root.uri} has no write stage ({store.stage_dir(WRITE_STAGE)}/"
                          "_stage.json is missing): run it to the end before publishing")
    n, b = int(fp.get("num_records", 0)), int(fp.get("buffer_size", 1)) or 1
    expected = -(-n // b)
    found: dict[int, str] = {}
    for info in list_write_files(store):
        parsed = parse_row_group_name(info.base_name)
        if parsed and parsed[1] == ".parquet":
            found[parsed[0]] = info.path[len(store.root) + 1:]
    missing = sorted(set(range(expected)) - set(found))
    if missing:
        raise CorpusError(f"run {run_key!r} at {run_root.uri}: the write stage committed {len(found)} of {expected} "
                          f"row groups (missing {missing[:10]}); publish a run only once it is written completely")
    tables, dim = [], None
    for rg in sorted(found):
        rel = found[rg]
        t = read_table(store.fs, store.path(rel))
        dim = t.schema.field("embedding").type.list_size
        tar_rel = rel[: -len(".parquet")] + ".tar"
        names = tar_member_names(store.fs, store.path(tar_rel))
        keys, rids = t.column("key").to_pylist(), t.column("record_id").to_pylist()
        members = record_members(keys, rids, names, f"{run_root.uri}/{tar_rel}")
        n_rows = t.num_rows
        cols: dict[str, Any] = {
            "uid": t.column("uid"), "key": t.column("key"),
            "run_key": pa.array([run_key] * n_rows, pa.string()),
            "run_root": pa.array([run_root.uri] * n_rows, pa.string()),
            "tar": pa.array([tar_rel] * n_rows, pa.string()),
            "members": pa.array(members, pa.list_(pa.string())),
            "url": pa.array([url_of(j, url_field) for j in t.column("json").to_pylist()], pa.string()),
            "caption": t.column("caption"),
            **{name: t.column(name) for name, _ in VALUE_FIELDS},
            "embedding": t.column("embedding"),
            "record_id": t.column("record_id"),
        }
        tables.append(pa.table(cols))
    if not tables:
        return pa.schema([*records_schema(1), ("record_id", pa.int64())]).empty_table(), None
    return pa.concat_tables(tables), dim


def _run_centroids(run_root: RunRoot) -> np.ndarray | None:
    """The run's committed dedup centroids, None when it has none."""
    from winnow.exceptions import DedupError
    from winnow.stages.dedup_steps import load_centroids

    try:
        centroids, _meta = load_centroids(CommitStore(run_root))
    except (DedupError, FileNotFoundError, KeyError):
        return None
    return centroids if centroids.size else None


def centroids_bytes(centroids: np.ndarray, run_key: str) -> bytes:
    k, d = centroids.shape
    col = pa.FixedSizeListArray.from_arrays(pa.array(centroids.astype(np.float32).reshape(-1), pa.float32()), d)
    meta = {"run_key": run_key, "k": k, "d": d}
    table = pa.table({"centroid": col}).replace_schema_metadata({CENTROIDS_META: json.dumps(meta, sort_keys=True)})
    return table_to_parquet_bytes(table)


def _embeddings(table: pa.Table) -> np.ndarray:
    col = table.column("embedding").combine_chunks()
    if not len(col):
        return np.zeros((0, max(1, col.type.list_size)), np.float32)
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size).astype(np.float32)


def assign_buckets(table: pa.Table, centroids: np.ndarray | None) -> np.ndarray:
    """Each record's bucket: the nearest centroid (max dot product; embeddings are L2-normalised),
    0 for every record while the corpus has no centroids."""
    if centroids is None or not table.num_rows:
        return np.zeros(table.num_rows, np.int32)
    return np.argmax(_embeddings(table) @ centroids.T, axis=1).astype(np.int32)


def delta_files(records: pa.Table, buckets: np.ndarray, generation: int, dim: int) -> dict[str, bytes]:
    """rel path -> bytes of the generation's uid and records files (deterministic)."""
    out: dict[str, bytes] = {}
    schema = records_schema(dim)
    uids = records.column("uid").to_pylist()
    parts = np.array([int(u[:2], 16) for u in uids], np.int32)
    uid_table = pa.table({"uid": records.column("uid"), "run_key": records.column("run_key"),
                          "key": records.column("key"), "bucket": pa.array(buckets, pa.int32())}, schema=UID_SCHEMA)
    for part in sorted(set(parts.tolist())):
        rows = np.flatnonzero(parts == part)
        t = uid_table.take(pa.array(rows, pa.int64()))
        order = pc.sort_indices(t, sort_keys=[("uid", "ascending")])  # stable: ties keep run order
        out[uid_file(part, generation)] = table_to_parquet_bytes(t.take(order))
    manifest = records.select(schema.names).cast(schema)
    for bucket in sorted(set(buckets.tolist())):
        rows = np.flatnonzero(buckets == bucket)
        out[records_file(bucket, generation)] = table_to_parquet_bytes(manifest.take(pa.array(rows, pa.int64())))
    return out


def _strip_listed(run_root: RunRoot, records: pa.Table, mask: np.ndarray, log: Callable[[str], None]) -> int:
    """Remove the records a takedown lists from the run's output row groups (the run was checked
    before the takedown was recorded): they must not stay in the corpus's output."""
    rows = records.filter(pa.array(mask))
    removal = RunRemoval(run_root.uri)
    for tar, rid in zip(rows.column("tar").to_pylist(), rows.column("record_id").to_pylist()):
        removal.row_groups.setdefault(tar, []).append(int(rid))
    store = CommitStore(run_root)
    uids = set(rows.column("uid").to_pylist())
    ids = {rid for rids in removal.row_groups.values() for rid in rids}
    removal.galleries, _ = plan_galleries(store, ids, uids)
    written: list[str] = []
    apply_removal(removal, run_root.storage, uids, written.append)
    log(f"publish: left out {rows.num_rows} record(s) of run {run_root.uri} that a takedown lists "
        f"(keys {rows.column('key').to_pylist()[:10]}); rewrote {len(written)} output file(s)")
    return rows.num_rows


def publish(corpus: Corpus, run_root: RunRoot, *, run_key: str, logical_date: str | None, checked_generation: int,
            embed_fingerprint: str, url_field: str = "url", counts: dict | None = None, owner: str | None = None,
            log: Callable[[str], None] | None = None) -> dict:
    """Add run ``run_key``'s kept records (its run root's write stage) to ``corpus`` as one new
    generation (see the module docstring).

    Returns ``{"published": True, "generation", "records", "buckets", "seconds", ...}``, or
    ``{"published": False, "already": True, "generation"}`` when the run is published already (a
    rerun writes nothing). Raises :class:`CorpusChanged` when a run published after generation
    ``checked_generation`` (the one this run's corpus check saw), and :class:`CorpusError` when
    the corpus was built with another embedding model (``embed_fingerprint``) or width.
    """
    log = log or logger.info
    t0 = time.perf_counter()
    run_root = RunRoot.of(run_root) if not isinstance(run_root, str) else RunRoot(run_root, corpus.root.storage)
    owner = owner or process_owner()
    with corpus_lease(corpus, owner):
        head = corpus.head()
        entry = head.run(run_key)
        if entry is not None:
            log(f"publish: run {run_key!r} is in corpus {corpus.root.uri} already (generation {entry['generation']}); "
                "nothing to do")
            return {"published": False, "already": True, "generation": head.generation,
                    "run_generation": entry["generation"]}
        if checked_generation > head.generation:
            raise CorpusError(f"run {run_key!r}: its corpus check saw generation {checked_generation}, but corpus "
                              f"{corpus.root.uri} is at generation {head.generation}: the check ran against another "
                              "corpus; rerun the check")
        later = [r for r in head.runs if int(r["generation"]) > checked_generation]
        if later:
            raise CorpusChanged(f"run {run_key!r}: this run's corpus check saw generation {checked_generation}; run "
                                f"{later[0]['run_key']!r} published since (generation {later[0]['generation']}); rerun "
                                "the check")
        if head.embed_fingerprint is not None and head.embed_fingerprint != embed_fingerprint:
            raise CorpusError(f"run {run_key!r}: corpus {corpus.root.uri} was built with another embedding model "
                              f"(embed fingerprint {head.embed_fingerprint!r}; this run's is {embed_fingerprint!r}); "
                              "its embeddings cannot be compared: use the corpus's model, or another corpus_uri")
        clear_crashed_publish(corpus, head)

        records, dim = _read_run(run_root, run_key, url_field)
        if head.dim is not None and dim is not None and dim != head.dim:
            raise CorpusError(f"run {run_key!r}: its embeddings have {dim} dimensions, corpus {corpus.root.uri}'s "
                              f"{head.dim}; use the corpus's model, or another corpus_uri")
        listed = corpus.takedown_identifiers()
        mask = match_mask(records, listed)
        taken_down = 0
        if mask.any():
            taken_down = _strip_listed(run_root, records, mask, log)
            records = records.filter(pa.array(~mask))

        generation = head.generation + 1
        dim = head.dim if head.dim is not None else dim
        files: dict[str, bytes] = {}
        centroids, centroids_rel, centroids_gen = None, head.centroids, head.centroids_generation
        if head.centroids is not None:
            centroids = corpus.centroids()
        else:
            found = _run_centroids(run_root)
            if found is not None and (dim is None or found.shape[1] == dim):
                centroids, centroids_rel, centroids_gen = found, CENTROIDS_FILE, generation
                files[CENTROIDS_FILE] = centroids_bytes(found, run_key)
        buckets = assign_buckets(records, centroids)
        if records.num_rows:
            files.update(delta_files(records, buckets, generation, dim))

        write_json(corpus.fs, corpus.path(PUBLISH_JOURNAL), {"generation": generation, "run_key": run_key,
                                                               "files": sorted(files)})
        for rel in sorted(files):
            write_atomic(corpus.fs, corpus.path(rel), files[rel])
        kill_point("publish:after_files")
        run_entry = {
            "run_key": run_key, "logical_date": logical_date, "run_root": run_root.uri, "generation": generation,
            "published_at": datetime.now(UTC).isoformat(timespec="seconds"), "records": records.num_rows,
            "counts": dict(counts or {}), "taken_down": taken_down,
        }
        new = CorpusHead(generation=generation, uid_partitions=head.uid_partitions, dim=dim,
                         embed_fingerprint=head.embed_fingerprint or embed_fingerprint, centroids=centroids_rel,
                         runs=(*head.runs, run_entry), takedowns=head.takedowns, centroids_generation=centroids_gen)
        write_json(corpus.fs, corpus.path(HEAD_FILE), new.to_dict())  # the commit
        delete_file(corpus.fs, corpus.path(PUBLISH_JOURNAL))
        seconds = round(time.perf_counter() - t0, 3)
        bucket_list = sorted(set(buckets.tolist())) if records.num_rows else []
        log(f"publish: run {run_key!r} ({logical_date or 'no logical date'}) joined corpus {corpus.root.uri} as "
            f"generation {generation}: {records.num_rows} record(s) in {len(bucket_list)} bucket(s)"
            + (f", {taken_down} left out for takedowns" if taken_down else "") + f" ({seconds} s)")
        return {"published": True, "generation": generation, "records": records.num_rows, "buckets": bucket_list,
                "taken_down": taken_down, "files": len(files), "seconds": seconds}

