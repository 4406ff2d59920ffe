"""A run's three checks against its corpus (:mod:`winnow.corpus`).

``pre`` (after the index, before embed: it never waits) marks the records a takedown lists
(by uid, key or source URL) and those whose image bytes a corpus record already has (same
``uid``), against the corpus as it stands: they are never read, decoded nor embedded. Committed
as ``<run_root>/corpus/pre.parquet`` + ``corpus/_pre.json``.

``check`` (after the score stages, before thresholds: the one run step that must see every
earlier date published) does the same again against the corpus as it is now, reading only the
uid files published since the pre-check. A record it finds late (a date published while this
run embedded: a backfill running dates side by side) was embedded, but from here on counts for
nothing: the thresholds' keep fractions, the run's own dedup and the outcome rule treat it as if
the pre-check had found it, so the run's result is the one a run after that date gives.
Committed as ``corpus/checked.parquet`` + ``corpus/_checked.json`` (with the corpus generation it
saw, which publish checks).

``near`` (after the run's own dedup, before ``status``; no wait of its own) compares each record
that passed the filters with the corpus records of its corpus cluster bucket (the corpus's
frozen centroids), one bucket in memory at a time; cosine >= 1 - ``dedup_eps`` makes it a
``corpus_duplicate`` of the most similar one. Committed as ``corpus/near.parquet`` +
``corpus/_near.json``.

All three files hold matches only, sorted by ``record_id`` (:data:`MATCHES`), and each step is
written once and never recomputed (a rerun of a checked run reuses them). What embed, the
outcome rule, thresholds and status read of them is :mod:`winnow.stages.corpus_matches`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from winnow.rowgroups import CommitStore, RowGroupPlan, RunRoot
from winnow.rowgroups.store import read_json, table_to_parquet_bytes, write_atomic, write_json
from winnow.stages.corpus_matches import _HAS, CHECKED, CHECKED_DONE, MATCHES, NEAR, NEAR_DONE, PRE, PRE_DONE


def _index_rows(store: CommitStore, plan: RowGroupPlan, columns: list[str]) -> Any:
    for p in range(plan.num_partitions):
        for rg in plan.partition_row_groups(p):
            yield p, rg, store.read_table("index", p, rg, columns=columns)


def _urls(table: pa.Table, url_field: str, storage: Any) -> list[str | None]:
    from winnow.data.reader import read_members

    out: list[str | None] = []
    for data in read_members(table, "json", storage=storage):
        url = None
        if data is not None:
            try:
                value = json.loads(data).get(url_field)
                url = value if isinstance(value, str) else None
            except (ValueError, AttributeError):
                url = None
        out.append(url)
    return out


def _listed_and_known(store: CommitStore, plan: RowGroupPlan, corpus: Any, url_field: str, storage: Any,
                      skip: set[int], generation: int | None, after: int = 0, step: str = "pre") -> dict[int, dict[str, Any]]:
    """record_id -> match row for the records a takedown lists or whose uid the corpus holds in a
    generation in ``(after, generation]`` (in-run exact duplicates and ``skip`` left out).
    Run-proportional memory: the run's uids."""
    listed = corpus.takedown_identifiers()
    want_urls = bool(listed.get("url"))
    cols = ["record_id", "key", "uid", "exact_duplicate_of", "shard", "json_offset", "json_size"]
    rows: dict[int, dict[str, Any]] = {}
    uids: dict[str, list[int]] = {}
    for _p, _rg, t in _index_rows(store, plan, cols):
        fresh = t.filter(t.column("exact_duplicate_of").is_null())
        ids = fresh.column("record_id").to_pylist()
        keys = fresh.column("key").to_pylist()
        uid_list = fresh.column("uid").to_pylist()
        urls = _urls(fresh, url_field, storage) if want_urls else [None] * len(ids)
        for rid, key, uid, url in zip(ids, keys, uid_list, urls):
            if rid in skip:
                continue
            hit = (("uid", uid) if uid in listed["uid"] else ("key", key) if key in listed["key"]
                   else ("url", url) if url is not None and url in listed["url"] else None)
            if hit is not None:
                rows[rid] = {"record_id": rid, "outcome": "takedown", "match": "takedown",
                             "identifier": f"{hit[0]}:{hit[1]}", "step": step}
            elif uid is not None:
                uids.setdefault(uid, []).append(rid)
    found = corpus.lookup_uids(list(uids), generation=generation, after=after) if uids else {}
    for uid, (run_key, key) in found.items():
        for rid in uids[uid]:
            rows[rid] = {"record_id": rid, "outcome": "corpus_duplicate", "match": "bytes",
                         "duplicate_of_run": run_key, "duplicate_of_key": key, "duplicate_of_uid": uid,
                         "similarity": 1.0, "step": step}
    return rows


def _commit(store: CommitStore, data_path: str, done_path: str, rows: dict[int, dict[str, Any]],
            meta: dict[str, Any]) -> None:
    ordered = [rows[r] for r in sorted(rows)]
    table = pa.table({f.name: pa.array([r.get(f.name) for r in ordered], f.type) for f in MATCHES}, schema=MATCHES)
    write_atomic(store.fs, store.path(data_path), table_to_parquet_bytes(table))
    write_json(store.fs, store.path(done_path), meta)  # the marker: the step is committed


def _summary(rows: dict[int, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    by = {"takedown": 0, "bytes": 0, "near": 0}
    for r in rows.values():
        by[r["match"]] += 1
    return {"takedowns": by["takedown"], "corpus_exact": by["bytes"], "corpus_near": by["near"], **extra}


def run_pre(root: RunRoot, plan: RowGroupPlan, corpus: Any, *, url_field: str,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """The ``pre`` check (see the module doc); a committed one is returned as it is."""
    store = CommitStore(root)
    done = read_json(store.fs, store.path(PRE_DONE))
    if done is not None:
        return {**done, "skipped": True}
    t0 = time.perf_counter()
    head = corpus.head()
    rows = _listed_and_known(store, plan, corpus, url_field, root.storage, set(), head.generation)
    meta = _summary(rows, generation=head.generation, corpus_uri=corpus.root.uri, seconds=round(time.perf_counter() - t0, 3))
    _commit(store, PRE, PRE_DONE, rows, meta)
    _HAS[store.path(PRE_DONE)] = True
    log(f"corpus pre-check against generation {head.generation}: {meta['takedowns']} listed by a takedown, "
        f"{meta['corpus_exact']} already in the corpus (same bytes); none of them is decoded")
    return meta


def run_check(root: RunRoot, plan: RowGroupPlan, corpus: Any, *, url_field: str,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """The ordered ``check`` (see the module doc): takedowns and known bytes again, against the
    corpus once every earlier date published; a committed one is returned as it is."""
    store = CommitStore(root)
    done = read_json(store.fs, store.path(CHECKED_DONE))
    if done is not None:
        return {**done, "skipped": True}
    t0 = time.perf_counter()
    head = corpus.head()
    with store.fs.open_input_file(store.path(PRE)) as f:
        pre = {int(r["record_id"]): r for r in pq.read_table(f).to_pylist()}
    pre_generation = int(read_json(store.fs, store.path(PRE_DONE))["generation"])
    rows = dict(pre)
    # The uids the pre-check looked up are known up to its generation: only the runs published
    # since (a parallel backfill's earlier dates) are read again; run one date after another,
    # nothing is.
    rows.update(_listed_and_known(store, plan, corpus, url_field, root.storage, set(pre), head.generation,
                                  after=pre_generation, step="check"))
    meta = _summary(rows, generation=head.generation, corpus_uri=corpus.root.uri, seconds=round(time.perf_counter() - t0, 3))
    _commit(store, CHECKED, CHECKED_DONE, rows, meta)
    log(f"corpus check against generation {head.generation}: {meta['takedowns']} listed by a takedown, "
        f"{meta['corpus_exact']} same bytes as a corpus record ({meta['corpus_exact'] + meta['takedowns'] - len(pre)} "
        "found since the pre-check: they were embedded, and count for nothing after this)")
    return meta


def run_near(root: RunRoot, plan: RowGroupPlan, corpus: Any, *, eps: float,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Near duplicates of corpus records among the records that pass the filters, after the
    run's own dedup (see the module doc); a committed one is returned as it is. The corpus is the
    one the ordered check saw: a later date publishes only after this run."""
    from winnow.stages.kept import row_group_filters

    store = CommitStore(root)
    done = read_json(store.fs, store.path(NEAR_DONE))
    if done is not None:
        return {**done, "skipped": True}
    t0 = time.perf_counter()
    head = corpus.head()
    rows: dict[int, dict[str, Any]] = {}

    # Near duplicates among the records that pass the filters (and matched nothing above).
    centroids = corpus.centroids()
    buckets = set(corpus.buckets())
    # Records published before the corpus had centroids (their runs kept nothing to cluster)
    # stay in bucket 0 of those generations: every candidate is compared with them as well.
    early = head.centroids_generation - 1 if centroids is not None and head.centroids_generation else 0
    cand_ids: list[np.ndarray] = []
    cand_emb: list[np.ndarray] = []
    if buckets:
        for p in range(plan.num_partitions):
            for rg in plan.partition_row_groups(p):
                x, out = row_group_filters(store, p, rg)
                ids = x["record_id"][out == ""]
                if not len(ids):
                    continue
                emb = store.read_table("embed", p, rg, columns=["record_id", "embedding"])
                take = np.flatnonzero(np.isin(emb.column("record_id").to_numpy(), ids))
                col = emb.column("embedding").combine_chunks().take(pa.array(take, pa.int64()))
                cand_ids.append(emb.column("record_id").to_numpy()[take])
                # float16 as committed: the run's candidates at 2 bytes a dimension; a bucket's
                # slice becomes float32 only while it is compared.
                cand_emb.append(col.flatten().to_numpy(zero_copy_only=False).reshape(len(take), -1))
    compared = read = 0
    if cand_ids:
        ids = np.concatenate(cand_ids)
        emb = np.concatenate(cand_emb)
        del cand_emb

        def unit(rows: np.ndarray) -> np.ndarray:
            v = emb[rows].astype(np.float32)
            return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

        assigned = np.zeros(len(ids), np.int64)
        if centroids is not None:
            for start in range(0, len(ids), 65536):
                chunk = np.arange(start, min(start + 65536, len(ids)))
                assigned[chunk] = np.argmax(unit(chunk) @ centroids.T, axis=1)
        units = [(b, np.flatnonzero(assigned == b), None) for b in sorted(buckets & set(assigned.tolist()))]
        if early:
            units.insert(0, (0, np.arange(len(ids)), early))
        best_of: dict[int, tuple[float, str, str, str]] = {}
        for b, mine, as_of in units:  # one corpus bucket in memory at a time
            theirs = corpus.read_bucket(b, columns=["uid", "run_key", "key", "embedding"], generation=as_of)
            if not theirs.num_rows or not len(mine):
                continue
            read += 1
            col = theirs.column("embedding").combine_chunks()
            ref = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1).astype(np.float32)
            ref /= np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
            sims = unit(mine) @ ref.T
            best = np.argmax(sims, axis=1)  # the first (earliest published) of equals
            best_sim = sims[np.arange(len(mine)), best]
            compared += len(mine) * len(ref)
            uids, runs, keys = (theirs.column(c).to_pylist() for c in ("uid", "run_key", "key"))
            for i, j, sim in zip(mine.tolist(), best.tolist(), best_sim.tolist()):
                if sim >= 1.0 - eps and (i not in best_of or sim > best_of[i][0]):
                    best_of[i] = (sim, runs[j], keys[j], uids[j])
        for i, (sim, run_key, key, uid) in best_of.items():
            rid = int(ids[i])
            rows[rid] = {"record_id": rid, "outcome": "corpus_duplicate", "match": "near", "duplicate_of_run": run_key,
                         "duplicate_of_key": key, "duplicate_of_uid": uid, "similarity": float(sim), "step": "near"}
    meta = _summary(rows, generation=head.generation, corpus_uri=corpus.root.uri, candidates=int(sum(map(len, cand_ids))),
                    buckets_read=read, pairs_compared=compared,
                    seconds=round(time.perf_counter() - t0, 3))
    _commit(store, NEAR, NEAR_DONE, rows, meta)
    log(f"corpus near-duplicate check against generation {head.generation}: {meta['corpus_near']} near duplicates "
        "of a corpus record "
        f"({meta['candidates']} candidates, {meta['buckets_read']} corpus buckets read)")
    return meta


def checked_generation(store: CommitStore) -> int:
    """The corpus generation the run's ``check`` saw (what publish compares with)."""
    done = read_json(store.fs, store.path(CHECKED_DONE))
    if done is None:
        from winnow.exceptions import StorageError

        raise StorageError(f"{store.path(CHECKED_DONE)} is missing: run the corpus check (task 'corpus_check') first")
    return int(done["generation"])
