"""The corpus: cross-run dedup of ten runs appended to one corpus, with what each reads of it.

    python benchmarks/corpus_dedup.py [--runs 10] [--records-per-run 100000] [--dim 768]
        [--buckets 256] [--dup-fraction 0.2] [--s3] [--json /tmp/winnow-bench/corpus.json]

What runs. ``--runs`` synthetic run roots, one per logical date, each published to ONE corpus in
date order, the way the DAG runs them: the real ``winnow.stages.corpus.run_pre`` (the pre-check:
uid lookups), the real ``winnow.stages.corpus.run_check`` (the ordered exact check, reading only
what was published since the pre-check) and ``run_near`` (near duplicates per corpus bucket),
then the run's write stage holding what the checks left, and the real ``winnow.corpus.publish``.
No model runs: a run root holds only what those read, written
by this script with the engine's own schemas and fingerprints: ``index`` (``winnow.schemas.INDEX``
rows, every record a first occurrence), ``embed`` (``embed_schema(dim)``, synthetic L2-normalised
float16 embeddings), the filter stages (``record_id`` only), ``thresholds`` (every filter off, so
every record is a dedup candidate), ``centroids/centroids.parquet`` as
``winnow.stages.dedup_steps`` writes it (the ``--buckets`` cluster centres the embeddings are drawn
around: the first publish freezes them as the corpus's centroids), and the write stage
(``write/p<5>/rg<9>.parquet`` of ``write_schema(dim)`` + the sibling ``.tar``) of the records the
check did not flag. A run's records: ``(1 - F)`` new ones (a random centre plus noise: cosine ~0.2
to each other, never within ``--eps``), ``F/2`` byte-identical copies of earlier published records
(same uid: the pre-check must find them) and ``F/2`` near copies (new uid, cosine ~0.9988 to the
original: the check must find them), shuffled over the run's row groups. The first run has no
copies (there is no corpus yet). After the runs, a ``probe`` run: near copies of records of ONE
corpus bucket only (0 new records): its check must read that one bucket's files and nothing else
of ``records/``, and its publish adds nothing.

Where: the corpus is a local folder (default), or with ``--s3`` a bucket on the S3 test server
(``benchmarks/_s3server.py``, moto on 127.0.0.1: loopback, a single-process Python server; its
times are not a cloud's); the run roots are local either way.

How measured, per run and step (pre-check, check, publish):

- wall time of the step's call (``time.perf_counter``; it includes the run-side reads of the
  run's own index/embed row groups, which no corpus makes bigger);
- bytes read from the corpus and requests against it: the corpus's filesystem is replaced by a
  counting subclass of the same pyarrow filesystem (``Corpus.fs`` and ``Corpus.store.fs``), which
  counts every byte returned by a read and the requests an object store is sent for them: one
  HEAD per ``open_input_file`` (pyarrow's S3 file asks for the size) and per path of
  ``get_file_info``, one ranged GET per read call on a random-access file (Parquet's footer read,
  then its coalesced column-chunk reads), one GET per ``open_input_stream`` (the head, JSON
  markers), one LIST per ``get_file_info(FileSelector)`` per 1000 entries. With ``--s3`` the
  requests column is the server's own log instead (every request, botocore's conditional
  reads and writes of the head and the lease included), and the modelled count is in the JSON;
- writes of publish: files and bytes added or changed under the corpus, from a listing of the
  corpus before and after (a local ``write_atomic`` bypasses the filesystem object);
- the largest unit held in memory (the table's "max unit" column): the larger of the Arrow
  ``nbytes`` of the biggest table ``Corpus.read_bucket`` returned during the check (the check
  then holds its embeddings once more as float32, and a similarity matrix) and the bytes read
  from the biggest single uid partition (``lookup_uids`` holds one of its files at a time);
- the corpus's size after each run: records (the head's runs) and bytes (a listing).

Then a file-layout probe (what ``docs/corpus.md`` projects to 10^9 records from): one bucket file
of ``--probe-bucket-rows`` rows at ``--probe-dim`` written by the real
``winnow.corpus.publish.delta_files``, and one uid-partition file of ``--probe-uid-rows`` rows
(10^7 a day / 256 partitions) written by the same code path (checked byte for byte against
``delta_files`` first; it is called directly only for the check, so that a day's 3,162 bucket
values do not make it write 3,162 records files too), of synthetic records shaped like web data
(9-char keys, ~80-char captions, ~80-char URLs, an Airflow run id). Parquet bytes per record, per
column, come from the files' metadata. Both files are then read back through ``Corpus.read_parquet``
and the counting filesystem, as the checks read them (a day's lookups in that partition, 1 % of
them hits; a bucket read's four columns). The embedding column is random float16 (real CLIP
embeddings compress little better); the string columns' bytes depend on real captions and URLs.
Last, the Python heap per looked-up uid (tracemalloc over the dict and sets the lookups build,
for ``--probe-lookup-uids`` uids).

``--smoke`` runs it all on tiny data in seconds and asserts the counts are sane (the test suite
runs it). Scripts, not tests: nothing here is collected by pytest.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from _common import REPO, add_smoke, apply_smoke, describe, machine  # noqa: F401  (REPO puts the repo on sys.path)

FOOTER_READ = 64 << 10  # pyarrow's speculative read of a Parquet file's tail (its footer)
LIST_PAGE = 1000  # keys per LIST page (S3's ListObjectsV2 default and maximum)
NEAR_NOISE = 0.05  # a near copy: e + 0.05 * (unit noise): cosine ~ 1 / sqrt(1 + 0.05^2) = 0.99875
SPREAD = 2.0  # a new record: centre + 2 * (unit noise): cosine ~0.2 between two of one centre


# ---- counting the corpus's reads ----------------------------------------------------------

class Meter:
    """Every request and byte against the corpus, as (kind, path, bytes) events."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.events: list[tuple[str, str, int]] = []
        self.units: list[int] = []  # Arrow nbytes of each read_bucket result

    def add(self, kind: str, path: str, nbytes: int = 0) -> None:
        self.events.append((kind, path, nbytes))

    def rel(self, path: str) -> str:
        return path[len(self.root) + 1:] if path.startswith(self.root + "/") else path

    def take(self) -> dict:
        """The events since the last take, summed."""
        events, units = self.events, self.units
        self.events, self.units = [], []
        kinds = collections.Counter()
        req_area = collections.Counter()
        by_area = collections.Counter()
        by_uid_part = collections.Counter()
        by_bucket = collections.Counter()
        files_read = set()
        for kind, path, n in events:
            rel = self.rel(path)
            if kind != "BYTES":
                kinds[kind] += 1 if kind != "LIST" else n
                req_area[f"{rel.split('/')[0]} {kind}"] += 1 if kind != "LIST" else n
                continue
            files_read.add(rel)
            parts = rel.split("/")
            by_area[parts[0]] += n
            if parts[0] == "uids" and len(parts) > 2:
                by_uid_part[parts[1]] += n
            if parts[0] == "records" and len(parts) > 2:
                by_bucket[parts[1]] += n
        return {
            "requests": dict(kinds), "request_total": sum(kinds.values()), "requests_by_area": dict(sorted(req_area.items())),
            "bytes": sum(by_area.values()),
            "bytes_by_area": dict(by_area), "files_read": sorted(files_read),
            "max_uid_partition_bytes": max(by_uid_part.values(), default=0), "uid_partitions_read": len(by_uid_part),
            "buckets_read": sorted(int(b[1:]) for b in by_bucket), "bucket_bytes": {k: v for k, v in sorted(by_bucket.items())},
            "max_unit_nbytes": max(units, default=0),
        }


class _Reader:
    """A file object over a pyarrow random-access file that reports each read call to the
    meter: one ranged GET each."""

    def __init__(self, f, meter: Meter, path: str) -> None:
        self.f, self.meter, self.path = f, meter, path

    def read(self, nbytes: int = -1) -> bytes:
        data = self.f.read() if nbytes is None or nbytes < 0 else self.f.read(nbytes)
        self.meter.add("GET", self.path)
        self.meter.add("BYTES", self.path, len(data))
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def tell(self) -> int:
        return self.f.tell()

    def size(self) -> int:
        return self.f.size()

    def close(self) -> None:
        self.f.close()

    @property
    def closed(self) -> bool:
        return self.f.closed

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False


class _Counting:
    """Mixed into a subclass of the corpus's own pyarrow filesystem class, so every check of the
    storage layer (``is_local``, ``isinstance(fs, S3FileSystem)``) sees the same kind of store."""

    meter: Meter

    def get_file_info(self, paths_or_selector):
        infos = super().get_file_info(paths_or_selector)
        if isinstance(paths_or_selector, pafs.FileSelector):
            self.meter.add("LIST", paths_or_selector.base_dir, max(1, math.ceil(len(infos) / LIST_PAGE)))
        else:
            for info in (infos if isinstance(infos, list) else [infos]):
                self.meter.add("HEAD", info.path)
        return infos

    def open_input_file(self, path):
        f = super().open_input_file(path)
        self.meter.add("HEAD", path)
        return pa.PythonFile(_Reader(f, self.meter, path), mode="r")

    def open_input_stream(self, path, *args, **kwargs):
        # One GET; the corpus streams only small JSON files (the head, markers): read it whole.
        with super().open_input_stream(path, *args, **kwargs) as f:
            data = f.read()
        self.meter.add("GET", path)
        self.meter.add("BYTES", path, len(data))
        return pa.BufferReader(data)

    def open_output_stream(self, path, *args, **kwargs):
        self.meter.add("PUT", path)
        return super().open_output_stream(path, *args, **kwargs)

    def delete_file(self, path):
        self.meter.add("DELETE", path)
        return super().delete_file(path)


_CLASSES: dict[type, type] = {}


def counting_fs(fs: pafs.FileSystem, meter: Meter) -> pafs.FileSystem:
    """A filesystem of ``fs``'s class and settings that reports to ``meter``."""
    base = type(fs)
    cls = _CLASSES.setdefault(base, type(f"Counting{base.__name__}", (_Counting, base), {}))
    if isinstance(fs, pafs.LocalFileSystem):
        out = cls()
    else:  # S3: the same settings (pyarrow's own pickling of them)
        out = cls(**fs.__reduce__()[1][0])
    out.meter = meter
    return out


def metered_corpus(uri: str, storage, meter: Meter):
    """``winnow.corpus.open_corpus(uri)`` whose reads report to ``meter``: its filesystem, and
    the tables ``read_bucket`` hands to the check (the unit held in memory)."""
    from winnow.corpus import open_corpus

    corpus = open_corpus(uri, storage)
    raw = corpus.fs
    fs = counting_fs(raw, meter)
    corpus.fs = fs
    corpus.store.fs = fs
    read_bucket = corpus.read_bucket

    def metered_read_bucket(bucket, columns=None, **kwargs):
        table = read_bucket(bucket, columns, **kwargs)
        meter.units.append(table.nbytes)
        return table

    corpus.read_bucket = metered_read_bucket
    return corpus, raw


def listing(fs: pafs.FileSystem, root: str) -> dict[str, int]:
    """rel path -> size of every file under the corpus (uncounted: the benchmark's own look)."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


# ---- synthetic data ------------------------------------------------------------------------

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "zu", "pe", "dor", "lin", "mar", "ste", "qua", "ber")


def _vocabulary(rng: np.random.Generator, n: int = 2000) -> list[str]:
    return ["".join(rng.choice(_SYLLABLES, rng.integers(2, 5))) for _ in range(n)]


def captions(rng: np.random.Generator, vocab: list[str], n: int) -> list[str]:
    """~80-character captions of 8-12 made-up words."""
    words = np.asarray(vocab, dtype=object)
    lengths = rng.integers(8, 13, n)
    picks = rng.integers(0, len(vocab), int(lengths.sum()))
    out, at = [], 0
    for k in lengths.tolist():
        out.append(" ".join(words[picks[at:at + k]]))
        at += k
    return out


def urls(rng: np.random.Generator, keys: list[str]) -> list[str]:
    """~80-character URLs over 500 hosts."""
    hosts = rng.integers(0, 500, len(keys))
    paths = rng.integers(0, 2**62, len(keys))
    return [f"https://cdn{h:03d}.images-example.com/uploads/2025/{p % 12 + 1:02d}/{p:016x}/{k}.jpg"
            for h, p, k in zip(hosts.tolist(), paths.tolist(), keys)]


def random_uids(rng: np.random.Generator, n: int) -> list[str]:
    """Uniform 128-bit uids (32 lowercase hex digits), like ``winnow.data.tarscan.image_uid``."""
    raw = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    return [row.tobytes().hex() for row in raw]


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fresh_embeddings(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    d = centres.shape[1]
    x = centres[rng.integers(0, len(centres), n)] + SPREAD * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return unit_rows(x).astype(np.float16)


def near_copies(rng: np.random.Generator, emb: np.ndarray) -> np.ndarray:
    d = emb.shape[1]
    x = emb.astype(np.float32) + NEAR_NOISE * rng.standard_normal(emb.shape).astype(np.float32) / np.sqrt(d)
    return unit_rows(x).astype(np.float16)


def fsl(emb: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float16()), emb.shape[1])


# ---- a synthetic run root -------------------------------------------------------------------

FILTER_STAGES = ("aesthetic", "nsfw", "clip_score")


def make_run(run_root: str, n: int, buffer_size: int, max_partitions: int, uids: list[str], keys: list[str],
             emb: np.ndarray, centres: np.ndarray, tag: str):
    """Commit what the corpus checks read (index, embed, the filter stages, thresholds, the dedup
    centroids) for records ``uids`` / ``keys`` / ``emb``; returns the plan."""
    from winnow.rowgroups import CommitStore, RowGroupPlan, StageFingerprint
    from winnow.rowgroups.store import write_atomic, write_json
    from winnow.schemas import INDEX, embed_schema
    from winnow.stages.dedup_steps import _META, CENTROIDS_FILE
    from winnow.stages.thresholds import STAGE as THRESHOLDS
    from winnow.stages.thresholds import THRESHOLDS_FILE

    plan = RowGroupPlan(n, buffer_size, max_partitions)
    store = CommitStore(run_root)
    for stage in ("index", "embed", *FILTER_STAGES, THRESHOLDS, "centroids"):
        store.ensure_stage(StageFingerprint(stage=stage, config={"synthetic": tag}, num_records=n, buffer_size=buffer_size))
    write_json(store.fs, store.path(THRESHOLDS, THRESHOLDS_FILE),
               {"digest": store.fingerprint_digest(THRESHOLDS), "filters": {}})  # every filter off
    d = emb.shape[1]
    for rg in range(plan.num_row_groups):
        p = plan.partition_of(rg)
        lo, hi = plan.row_group_range(rg)
        ids = pa.array(np.arange(lo, hi, dtype=np.int64))
        m = hi - lo
        none_i64 = pa.nulls(m, pa.int64())
        index = pa.table({
            "record_id": ids, "shard": pa.array([f"{tag}/shard-{rg:06d}.tar"] * m), "key": pa.array(keys[lo:hi]),
            "image_ext": pa.array(["jpg"] * m), "image_offset": pa.array(np.arange(m, dtype=np.int64) * 4096),
            "image_size": pa.array(np.full(m, 4000, np.int64)), "txt_offset": none_i64, "txt_size": none_i64,
            "json_offset": none_i64, "json_size": none_i64, "uid": pa.array(uids[lo:hi], pa.string()),
            "exact_duplicate_of": none_i64, "width": pa.array(np.full(m, 512, np.int32)),
            "height": pa.array(np.full(m, 384, np.int32)), "caption_words": pa.array(np.full(m, 9, np.int32)),
        }, schema=INDEX)
        store.commit_table("index", p, rg, index)
        store.commit_table("embed", p, rg, pa.table({
            "record_id": ids, "key": pa.array(keys[lo:hi]), "embedding": fsl(emb[lo:hi]),
            "error": pa.nulls(m, pa.string())}, schema=embed_schema(d)))
        for stage in FILTER_STAGES:
            store.commit_table(stage, p, rg, pa.table({"record_id": ids}))
    meta = {"k": len(centres), "candidates": n, "sample": n, "buckets": len(centres),
            "bucket_of_cluster": list(range(len(centres))), "sample_sizes": [], "digest": store.fingerprint_digest("centroids")}
    table = pa.table({
        "cluster": pa.array(np.arange(len(centres), dtype=np.int32)),
        "centroid": pa.FixedSizeListArray.from_arrays(pa.array(centres.reshape(-1), pa.float32()), d),
    }).replace_schema_metadata({_META: json.dumps(meta)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(store.fs, store.path("centroids", CENTROIDS_FILE), sink.getvalue().to_pybytes())
    return plan


def write_kept(run_root: str, plan, flagged: set[int], uids: list[str], keys: list[str], emb: np.ndarray,
               caption: list[str], url: list[str], tag: str) -> int:
    """The write stage of the records the checks did not flag (``write/p*/rg*.tar`` + ``.parquet``,
    ``write_schema``), as the write stage commits them; returns how many."""
    from winnow.rowgroups import CommitStore, StageFingerprint
    from winnow.schemas import VALUE_FIELDS, write_schema
    from winnow.stages.write import STAGE, TAR_MTIME, _tar_bytes

    store = CommitStore(run_root)
    store.ensure_stage(StageFingerprint(stage=STAGE, config={"synthetic": tag}, num_records=plan.num_records,
                                        buffer_size=plan.buffer_size))
    d = emb.shape[1]
    kept_total = 0
    for rg in range(plan.num_row_groups):
        p = plan.partition_of(rg)
        lo, hi = plan.row_group_range(rg)
        rows = [i for i in range(lo, hi) if i not in flagged]
        sidecars = [json.dumps({"url": url[i], "caption": caption[i]}) for i in rows]
        members = []
        for i, side in zip(rows, sidecars):
            members += [(f"{keys[i]}.jpg", uids[i][:16].encode()), (f"{keys[i]}.txt", caption[i].encode()),
                        (f"{keys[i]}.json", side.encode())]
        store.commit_bytes(STAGE, p, rg, _tar_bytes(members, TAR_MTIME), suffix=".tar")
        m = len(rows)
        values = {name: pa.array(np.full(m, 0.5), t) if pa.types.is_floating(t) else pa.array(np.full(m, 9), t)
                  for name, t in VALUE_FIELDS}
        table = pa.table({
            "record_id": pa.array(np.asarray(rows, np.int64), pa.int64()), "uid": pa.array([uids[i] for i in rows], pa.string()),
            "key": pa.array([keys[i] for i in rows], pa.string()),
            "shard": pa.array([f"{tag}/shard-{rg:06d}.tar"] * m, pa.string()),
            "caption": pa.array([caption[i] for i in rows], pa.string()), "json": pa.array(sidecars, pa.string()),
            **values, "embedding": fsl(emb[rows] if m else np.zeros((0, d), np.float16)),
        }, schema=write_schema(d))
        store.commit_table(STAGE, p, rg, table)
        kept_total += m
    return kept_total


# ---- one run --------------------------------------------------------------------------------

def one_run(label: str, work: Path, corpus, raw_fs, corpus_root: str, meter: Meter, server, args, date: str,
            uids: list[str], keys: list[str], emb: np.ndarray, caption: list[str], url: list[str], centres: np.ndarray,
            planted: dict) -> dict:
    """One date: its run root, the pre-check, the check, its write stage, publish; measured."""
    from winnow.corpus import publish
    from winnow.rowgroups import CommitStore, RunRoot
    from winnow.stages.corpus import checked_generation, run_check, run_near, run_pre

    quiet = (lambda _m: None) if args.quiet else (lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    run_key = f"scheduled__{date}T00:00:00+00:00"
    run_root = str(work / "runs" / label)
    n = len(uids)
    plan = make_run(run_root, n, args.buffer_size, args.max_partitions, uids, keys, emb, centres, tag=run_key)
    root = RunRoot(run_root)
    before = listing(raw_fs, corpus_root)
    head = corpus.head()
    meter.take()
    steps = {}
    for name, call in (
        ("pre", lambda: run_pre(root, plan, corpus, url_field="url", log=quiet)),
        ("check", lambda: run_check(root, plan, corpus, url_field="url", log=quiet)),
        ("near", lambda: run_near(root, plan, corpus, eps=args.eps, log=quiet)),
    ):
        mark = server.mark() if server else None
        t0 = time.perf_counter()
        out = call()
        seconds = time.perf_counter() - t0
        steps[name] = {"seconds": round(seconds, 4), "result": out, **meter.take()}
        if not args.smoke:
            steps[name]["files_read"] = len(steps[name]["files_read"])
        if server:
            steps[name]["modelled_requests"] = steps[name]["requests"]
            steps[name]["requests"] = dict(server.counts(mark))
            steps[name]["request_total"] = sum(steps[name]["requests"].values())
    store = CommitStore(root)
    matches = pa.concat_tables([pq.read_table(store.path("corpus/checked.parquet")),
                                pq.read_table(store.path("corpus/near.parquet"))])
    flagged = set(matches.column("record_id").to_pylist())
    match = collections.Counter(matches.column("match").to_pylist())
    kept = write_kept(run_root, plan, flagged, uids, keys, emb, caption, url, run_key)
    mark = server.mark() if server else None
    t0 = time.perf_counter()
    pub = publish(corpus, root, run_key=run_key, logical_date=date, checked_generation=checked_generation(store),
                  embed_fingerprint=f"synthetic-{args.dim}", url_field="url", counts={"kept": kept}, log=quiet)
    pub_s = time.perf_counter() - t0
    pub_reads = meter.take()
    pub_reads["files_read"] = len(pub_reads["files_read"])
    after = listing(raw_fs, corpus_root)
    written = {k: v for k, v in after.items() if before.get(k) != v or k not in before}
    if server:
        pub_reads["modelled_requests"] = pub_reads["requests"]
        pub_reads["requests"] = dict(server.counts(mark))
    head_after = corpus.head()
    records_after = sum(int(r["records"]) for r in head_after.runs)
    by_area = collections.Counter(k.split("/")[0] for k in after)
    bytes_area = collections.Counter()
    for k, v in after.items():
        bytes_area[k.split("/")[0]] += v
    row = {
        "run": label, "run_key": run_key, "records_in_run": n,
        "corpus_records_before": sum(int(r["records"]) for r in head.runs), "corpus_bytes_before": sum(before.values()),
        "planted_exact": planted["exact"], "planted_near": planted["near"],
        "found_exact": match.get("bytes", 0), "found_near": match.get("near", 0), "published": pub.get("records", 0),
        # "check": the near-duplicate check (the bucket reads); "exact_check": the ordered exact
        # check (uid files published since the pre-check: none when run one date after another).
        "pre": steps["pre"], "exact_check": steps["check"], "check": steps["near"],
        "publish": {"seconds": round(pub_s, 4), "result": pub, "reads": pub_reads, "files_written": len(written),
                    "bytes_written": sum(written.values()), **({"written": sorted(written)} if args.smoke else {})},
        "corpus_records_after": records_after, "corpus_bytes_after": sum(after.values()),
        "corpus_files_after": dict(by_area), "corpus_bytes_by_area_after": dict(bytes_area),
        "bucket_files_after": {k: v for k, v in sorted(collections.Counter(
            k.split("/")[1] for k in after if k.startswith("records/")).items())},
    }
    return row


# ---- the file-layout probe ------------------------------------------------------------------

def layout_probe(uid_rows: int, bucket_rows: int, dim: int, seed: int, lookup_uids: int = 100_000) -> dict:
    """Parquet bytes per record of a uid-partition file and a bucket file, as publish writes them
    (``winnow.corpus.publish.delta_files``), from the files' own metadata."""
    from winnow.corpus.layout import UID_SCHEMA
    from winnow.corpus.publish import delta_files
    from winnow.rowgroups.store import table_to_parquet_bytes

    rng = np.random.default_rng([seed, 99])
    vocab = _vocabulary(rng)

    def records(n: int, d: int, partition_00: bool) -> pa.Table:
        uids = random_uids(rng, n)
        if partition_00:  # all in uid partition 00, as a day's share of one partition
            uids = ["00" + u[2:] for u in uids]
        keys = [f"{s:05d}{i:04d}" for s, i in zip(rng.integers(0, 20000, n).tolist(), rng.integers(0, 10000, n).tolist())]
        run_key = "scheduled__2025-03-01T00:00:00+00:00"
        from winnow.schemas import VALUE_FIELDS

        vals = {name: (pa.array(rng.random(n).astype(np.float32), t) if pa.types.is_floating(t)
                       else pa.array(rng.integers(64, 2048, n).astype(np.int32), t)) for name, t in VALUE_FIELDS}
        return pa.table({
            "uid": pa.array(uids), "key": pa.array(keys), "run_key": pa.array([run_key] * n),
            "run_root": pa.array([f"s3://datasets/winnow/runs/{run_key}"] * n),
            "tar": pa.array([f"write/p{r // 100:05d}/rg{r:09d}.tar" for r in sorted(rng.integers(0, 1000, n).tolist())]),
            "members": pa.array([[f"{k}.jpg", f"{k}.txt", f"{k}.json"] for k in keys], pa.list_(pa.string())),
            "url": pa.array(urls(rng, keys)), "caption": pa.array(captions(rng, vocab, n)), **vals,
            "embedding": fsl(unit_rows(rng.standard_normal((n, d)).astype(np.float32)).astype(np.float16)),
        })

    def per_record(data: bytes, n: int) -> dict:
        md = pq.ParquetFile(pa.BufferReader(data)).metadata
        cols = collections.Counter()
        for rg in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(rg).column(c)
                cols[col.path_in_schema.split(".")[0]] += col.total_compressed_size
        return {"rows": n, "file_bytes": len(data), "row_groups": md.num_row_groups,
                "file_bytes_per_record": round(len(data) / n, 2),
                "column_bytes_per_record": {k: round(v / n, 2) for k, v in cols.items()}}

    def uid_file(t: pa.Table, buckets: np.ndarray) -> bytes:
        # delta_files' uid file, for one partition: the same schema, order and writer (checked
        # below), without writing one records file per bucket of the day as well.
        u = pa.table({"uid": t.column("uid"), "run_key": t.column("run_key"), "key": t.column("key"),
                      "bucket": pa.array(buckets, pa.int32())}, schema=UID_SCHEMA)
        return table_to_parquet_bytes(u.sort_by("uid"))

    day = records(uid_rows, 8, True)
    zeros = np.zeros(uid_rows, np.int32)
    real = delta_files(day, zeros, 1, 8)
    assert real["uids/u00/g000000001.parquet"] == uid_file(day, zeros), "delta_files' uid file changed: update the probe"
    # A day's records fall in the corpus's k buckets (k = 3162: round(sqrt(1e7)), dedup's default).
    uid_data = uid_file(day, rng.integers(0, 3162, uid_rows).astype(np.int32))
    rec = records(bucket_rows, dim, False)
    rec_files = delta_files(rec, np.zeros(bucket_rows, np.int32), 1, dim)
    rec_data = next(v for k, v in rec_files.items() if k.startswith("records/"))
    uid_probe, rec_probe = per_record(uid_data, uid_rows), per_record(rec_data, bucket_rows)

    # Read both files back as the checks do (Corpus.read_parquet through the counting
    # filesystem): a day's uid lookups in that partition (uid_rows uniform uids, 1% of them in
    # the file), and a bucket read's columns.
    tmp = tempfile.mkdtemp(prefix="winnow-corpus-probe-")
    try:
        meter = Meter(tmp)
        corpus, _raw = metered_corpus(tmp, None, meter)
        paths = {"uid": f"{tmp}/uids/u00/g000000001.parquet", "rec": f"{tmp}/records/c00000/g000000001.parquet"}
        for key, data in (("uid", uid_data), ("rec", rec_data)):
            os.makedirs(os.path.dirname(paths[key]), exist_ok=True)
            Path(paths[key]).write_bytes(data)
        in_file = day.column("uid").to_pylist()
        wanted = ["00" + u[2:] for u in random_uids(rng, uid_rows - uid_rows // 100)] + in_file[: uid_rows // 100]
        meter.take()
        found = corpus.read_parquet(paths["uid"], ["uid", "run_key", "key"], filters=[("uid", "in", sorted(wanted))])
        lookup = meter.take()
        assert found.num_rows == uid_rows // 100, found.num_rows
        bucket = corpus.read_parquet(paths["rec"], ["uid", "run_key", "key", "embedding"])
        bucket_read = meter.take()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    uid_probe["lookup_read"] = {"bytes": lookup["bytes"], "requests": lookup["requests"]}
    rec_probe["bucket_read"] = {"bytes": bucket_read["bytes"], "requests": bucket_read["requests"],
                                "arrow_nbytes_per_record": round(bucket.nbytes / bucket_rows, 1)}
    return {"uid_file": uid_probe, "records_file": rec_probe, "dim": dim,
            "caption_chars": round(float(np.mean([len(c) for c in rec.column("caption").to_pylist()])), 1),
            "url_chars": round(float(np.mean([len(u) for u in rec.column("url").to_pylist()])), 1),
            "python_bytes_per_looked_up_uid": python_lookup_bytes(rng, lookup_uids), "python_probe_uids": lookup_uids}


def python_lookup_bytes(rng: np.random.Generator, m: int = 100_000) -> float:
    """Python heap per uid the pre-check looks up (tracemalloc): the structures
    ``winnow.stages.corpus._listed_and_known`` (uid -> [record_id], from Arrow's ``to_pylist``)
    and ``Corpus.lookup_uids`` (a set per uid partition, and its sorted list for the filter)
    build, all alive at once: what a day's run holds whatever the corpus size."""
    import tracemalloc

    column = pa.array(random_uids(rng, m))
    tracemalloc.start()
    try:
        ids, uid_list = list(range(m)), column.to_pylist()
        uids: dict[str, list[int]] = {}
        for rid, uid in zip(ids, uid_list):
            uids.setdefault(uid, []).append(rid)
        by_part: dict[int, set[str]] = {}
        for uid in list(uids):
            by_part.setdefault(int(uid[:2], 16), set()).add(uid)
        biggest = max(by_part.values(), key=len)
        filter_list = sorted(biggest)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del filter_list
    return round(peak / m, 1)


# ---- report ---------------------------------------------------------------------------------

def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| run | corpus records (before) | corpus MB (before) | exact found / planted | near found / planted | "
        "pre-check s | exact check s | near check s | publish s | pre-check read MB / requests | "
        "exact check read MB / requests | near check read MB / requests | "
        "buckets read | max unit in memory MB | publish files / MB written |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pre, ex, chk, pub = r["pre"], r["exact_check"], r["check"], r["publish"]
        unit = max(chk["max_unit_nbytes"], pre["max_uid_partition_bytes"], ex["max_uid_partition_bytes"])
        lines.append(
            f"| {r['run']} | {r['corpus_records_before']:,} | {_mb(r['corpus_bytes_before'])} | "
            f"{r['found_exact']:,} / {r['planted_exact']:,} | {r['found_near']:,} / {r['planted_near']:,} | "
            f"{pre['seconds']:.3f} | {ex['seconds']:.3f} | {chk['seconds']:.3f} | {pub['seconds']:.3f} | "
            f"{_mb(pre['bytes'])} / {pre['request_total']:,} | {_mb(ex['bytes'])} / {ex['request_total']:,} | "
            f"{_mb(chk['bytes'])} / {chk['request_total']:,} | "
            f"{len(chk['buckets_read'])} | {_mb(unit)} | {pub['files_written']} / {_mb(pub['bytes_written'])} |")
    return "\n".join(lines)


def layout_table(probe: dict) -> str:
    u, r = probe["uid_file"], probe["records_file"]
    lines = ["| file | rows | file bytes / record | column bytes / record | read back as the checks read it |",
             "|---|---:|---:|---|---|"]
    for name, f, read in (("uids/u<hh>/g<gen>.parquet", u, u["lookup_read"]),
                          (f"records/c<b>/g<gen>.parquet (d={probe['dim']})", r, r["bucket_read"])):
        cols = ", ".join(f"{k} {v}" for k, v in f["column_bytes_per_record"].items())
        reqs = " + ".join(f"{v} {k}" for k, v in sorted(read["requests"].items()))
        lines.append(f"| {name} | {f['rows']:,} | {f['file_bytes_per_record']} | {cols} | "
                     f"{read['bytes']:,} bytes of {f['file_bytes']:,}, {reqs} |")
    lines.append(f"\nArrow bytes per record of a bucket read (uid, run_key, key, embedding): "
                 f"{r['bucket_read']['arrow_nbytes_per_record']}; Python heap per uid a lookup holds: "
                 f"{probe['python_bytes_per_looked_up_uid']} bytes ({probe['python_probe_uids']:,} uids, tracemalloc)")
    return "\n".join(lines)


# ---- the sanity checks of --smoke -----------------------------------------------------------

def sanity(rows: list[dict], corpus_files: dict[str, int]) -> None:
    """What must hold whatever the machine: the checks find what was planted, the pre-check
    reads no manifest record, the check reads only the buckets its candidates fall in, the
    corpus grows by what each run published, the probe reads one bucket and publishes nothing."""
    from winnow.corpus.layout import UID_PARTITIONS

    total = 0
    for r in rows:
        pre, chk = r["pre"], r["check"]
        assert r["found_exact"] == r["planted_exact"], (r["run"], r["found_exact"], r["planted_exact"])
        assert r["planted_near"] * 0.9 <= r["found_near"] <= r["planted_near"] + max(2, r["planted_near"] // 20), \
            (r["run"], r["found_near"], r["planted_near"])
        assert r["published"] == r["records_in_run"] - r["found_exact"] - r["found_near"], r["run"]
        assert r["corpus_records_after"] == r["corpus_records_before"] + r["published"]
        total += r["published"]
        assert r["corpus_records_after"] == total
        assert not any(f.startswith("records/") for f in pre["files_read"]), "the pre-check read manifest records"
        # Run one date after another, the ordered check has nothing published since the
        # pre-check to read: no uid file, no manifest record.
        ex = r["exact_check"]
        assert not any(f.startswith(("uids/", "records/")) for f in ex["files_read"]), (r["run"], ex["files_read"])
        assert pre["uid_partitions_read"] <= UID_PARTITIONS
        if r["corpus_records_before"] == 0:
            assert pre["bytes_by_area"].get("uids", 0) == 0 and not chk["buckets_read"], r["run"]
            continue
        # The check reads records/ only of the buckets its candidates fall in, at most their bytes.
        # (Parquet's first read of a file is a speculative 64 KiB footer read, then the column
        # chunks: a file under 64 KiB is read about twice.)
        touched = set(chk["buckets_read"])
        assert len(touched) == chk["result"]["buckets_read"], (r["run"], touched, chk["result"]["buckets_read"])
        for b, read in chk["bucket_bytes"].items():
            files = [v for k, v in corpus_files[r["run"]].items() if k.startswith(f"records/{b}/")]
            assert 0 < read <= sum(files) + FOOTER_READ * len(files), (r["run"], b, read, sum(files))
        assert chk["max_unit_nbytes"] > 0
    probe = rows[-1]
    assert probe["run"] == "probe"
    assert len(probe["check"]["buckets_read"]) == 1, probe["check"]["buckets_read"]
    assert probe["published"] == 0 and probe["corpus_records_after"] == probe["corpus_records_before"]
    one = probe["check"]["bucket_bytes"]
    assert sum(one.values()) < sum(v for k, v in corpus_files["probe"].items() if k.startswith("records/")), \
        "the probe read as much as the whole manifest"


# ---- main -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--records-per-run", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--buckets", type=int, default=256, help="corpus buckets K: the centroids the first publish freezes")
    ap.add_argument("--dup-fraction", type=float, default=0.2, help="F: half byte-identical, half near copies")
    ap.add_argument("--eps", type=float, default=0.05, help="dedup_eps (CurationConfig's default)")
    ap.add_argument("--buffer-size", type=int, default=10_000)
    ap.add_argument("--max-partitions", type=int, default=8)
    ap.add_argument("--probe-records", type=int, default=2000, help="records of the one-bucket probe run")
    ap.add_argument("--probe-uid-rows", type=int, default=39_063, help="rows of the layout probe's uid file (1e7/256)")
    ap.add_argument("--probe-bucket-rows", type=int, default=3_163, help="rows of its bucket file (1e7/3162)")
    ap.add_argument("--probe-dim", type=int, default=768)
    ap.add_argument("--probe-lookup-uids", type=int, default=100_000, help="uids of the Python-heap probe of a lookup")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--s3", action="store_true", help="the corpus on the S3 test server; requests from its log")
    ap.add_argument("--workdir", default=None, help="default: a fresh temp folder, removed at the end")
    ap.add_argument("--quiet", action="store_true", help="no step logs")
    ap.add_argument("--json", default=None)
    add_smoke(ap)
    args = ap.parse_args(argv)
    apply_smoke(args, runs=4, records_per_run=200, dim=32, buckets=4, buffer_size=50, max_partitions=2,
                probe_records=40, probe_uid_rows=39_063, probe_bucket_rows=3_163, probe_dim=768, probe_lookup_uids=30_000,
                quiet=True)

    start_machine = machine()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="winnow-corpus-bench-"))
    shutil.rmtree(work / "runs", ignore_errors=True)
    server = None
    if args.s3:
        from benchmarks._s3server import S3Server

        work.mkdir(parents=True, exist_ok=True)
        server = S3Server(str(work / "s3-requests.log"))
        os.environ.update(server.env())
        server.create_bucket("bench")
        corpus_uri = f"s3://bench/corpus-{time.time_ns()}"
    else:
        corpus_uri = str(work / "corpus")
        shutil.rmtree(corpus_uri, ignore_errors=True)
    from winnow.rowgroups.fs import StorageOptions, resolve_filesystem

    storage = StorageOptions.from_env()
    _fs, corpus_root = resolve_filesystem(corpus_uri, storage)
    meter = Meter(corpus_root)
    corpus, raw_fs = metered_corpus(corpus_uri, storage, meter)

    rng = np.random.default_rng(args.seed)
    d = args.dim
    centres = unit_rows(rng.standard_normal((args.buckets, d)).astype(np.float32))
    vocab = _vocabulary(rng)
    pool_uids: list[str] = []
    pool_emb = np.zeros((0, d), np.float16)
    rows, corpus_files = [], {}
    t_all = time.perf_counter()
    try:
        for i in range(args.runs + 1):
            probe = i == args.runs
            label = "probe" if probe else str(i + 1)
            date = (datetime.date(2025, 1, 1) + datetime.timedelta(days=i)).isoformat()
            n = args.probe_records if probe else args.records_per_run
            if probe:  # near copies of records of ONE bucket (the one the pool holds most of)
                pool_b = np.argmax(pool_emb.astype(np.float32) @ centres.T, axis=1)
                b = int(np.bincount(pool_b).argmax())
                src = np.flatnonzero(pool_b == b)
                emb = near_copies(rng, pool_emb[rng.choice(src, n)])
                emb = emb[np.argmax(emb.astype(np.float32) @ centres.T, axis=1) == b]  # exactly that bucket
                n = len(emb)
                uids = random_uids(rng, n)
                planted = {"exact": 0, "near": n}
            else:
                n_dup = round(args.dup_fraction * n) if pool_uids else 0
                n_exact, n_near = n_dup // 2, n_dup - n_dup // 2
                n_new = n - n_dup
                uids = random_uids(rng, n_new)
                emb = fresh_embeddings(rng, centres, n_new)
                if n_dup:
                    pick = rng.choice(len(pool_uids), n_exact + n_near, replace=n_dup > len(pool_uids))
                    ex, nr = pick[:n_exact], pick[n_exact:]
                    uids += [pool_uids[j] for j in ex] + random_uids(rng, n_near)
                    emb = np.concatenate([emb, pool_emb[ex], near_copies(rng, pool_emb[nr])])
                order = rng.permutation(n)
                uids = [uids[j] for j in order]
                emb = emb[order]
                planted = {"exact": n_exact, "near": n_near}
            keys = [f"{date.replace('-', '')}_{j:09d}" for j in range(n)]
            caption = captions(rng, vocab, n)
            url = urls(rng, keys)
            print(f"run {label}: {n:,} records ({planted['exact']:,} exact and {planted['near']:,} near copies)",
                  file=sys.stderr, flush=True)
            row = one_run(label, work, corpus, raw_fs, corpus_root, meter, server, args, date, uids, keys, emb, caption,
                          url, centres, planted)
            rows.append(row)
            corpus_files[label] = listing(raw_fs, corpus_root)
            if not probe:  # what later runs copy: this run's published records (a bounded sample)
                checked = pa.concat_tables([pq.read_table(str(work / "runs" / label / "corpus" / f), columns=["record_id"])
                                            for f in ("checked.parquet", "near.parquet")])
                flagged = set(checked.column("record_id").to_pylist())
                kept = np.asarray([j for j in range(n) if j not in flagged], np.int64)
                cap = round(args.dup_fraction * args.records_per_run) + 100  # enough for the next run's copies
                take = kept if len(kept) <= cap else np.sort(rng.choice(kept, cap, replace=False))
                pool_uids += [uids[j] for j in take.tolist()]
                pool_emb = np.concatenate([pool_emb, emb[take]])
        probe_layout = layout_probe(args.probe_uid_rows, args.probe_bucket_rows, args.probe_dim, args.seed, args.probe_lookup_uids)
    finally:
        if server:
            server.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t_all

    print(f"\nCorpus: {corpus_uri if not args.s3 else 'S3 test server (moto, loopback)'}; {args.runs} runs of "
          f"{args.records_per_run:,} records, d={d}, K={args.buckets} buckets, F={args.dup_fraction}, eps={args.eps}")
    how = ("the S3 server's log" if args.s3 else
           "modelled by the counting filesystem (HEAD per open, GET per read call, LIST per listing page)")
    print(f"Requests: {how}")
    print(table(rows))
    print()
    print("File layout probe (winnow.corpus.publish.delta_files; Parquet metadata):")
    print(layout_table(probe_layout))
    print(f"\n{describe(start_machine)}; {elapsed:.1f} s in all")
    result = {"params": {k: v for k, v in vars(args).items() if k not in ("json",)}, "corpus_uri": corpus_uri,
              "requests_source": "s3 server log" if args.s3 else "counting filesystem (modelled)",
              "rows": rows, "layout_probe": probe_layout, "machine": start_machine, "seconds": round(elapsed, 2)}
    if args.smoke:
        sanity(rows, corpus_files)
        print("smoke: sanity checks passed", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
