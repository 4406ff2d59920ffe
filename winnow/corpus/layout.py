"""The corpus's files (see :mod:`winnow.corpus` for the layout) and its read side: the head,
uid lookups, buckets of the manifest, the takedown list.

Every read goes through winnow's storage layer (:class:`~winnow.rowgroups.fs.RunRoot`, the
retrying helpers of :mod:`winnow.rowgroups.store`). Readers use only files of generations up to
the head's: whatever a crashed publish left at ``generation + 1`` is invisible.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from winnow.exceptions import CorpusError
from winnow.rowgroups.fs import RunRoot, StorageOptions, display_uri, fs_error, is_local
from winnow.rowgroups.store import TEMP_MARK, CommitStore, list_folder, read_json
from winnow.schemas import VALUE_FIELDS, embedding_type

#: Version of the layout written in the head; a head of another format is refused.
FORMAT = 1
HEAD_FILE = "_corpus.json"
#: uid -> its first two hex digits -> one of this many uid partitions.
UID_PARTITIONS = 256
UIDS_DIR = "uids"
RECORDS_DIR = "records"
CENTROIDS_FILE = "centroids/centroids.parquet"
TAKEDOWNS_DIR = "takedowns"
PENDING_DIR = "_pending"
#: A publish in progress: the delta files it writes (a crashed one's are deleted by the next writer).
PUBLISH_JOURNAL = f"{PENDING_DIR}/publish.json"
#: A takedown in progress: what it matched and the files it rewrites (a rerun finishes it).
TAKEDOWN_JOURNAL = f"{PENDING_DIR}/takedown.json"
#: Test-only fault hook: ``publish:after_files`` or ``takedown:after_rewrite:<n>`` SIGKILLs this
#: process at that point (the fault tests' crash mid-publish and mid-takedown). Never set it
#: outside a test.
KILL_ENV = "WINNOW_TEST_CORPUS_KILL"
#: How a record's tar is named in the manifest: relative to its run root.
UID_RE = re.compile(r"^[0-9a-f]{32}$")

_GEN_FILE = re.compile(r"^g(\d{9})\.parquet$")
_BUCKET_DIR = re.compile(r"^c(\d{5})$")

#: ``uids/u<hh>/g<gen>.parquet``: a uid partition's share of one generation, sorted by uid.
UID_SCHEMA = pa.schema([
    ("uid", pa.string()),
    ("run_key", pa.string()),
    ("key", pa.string()),
    ("bucket", pa.int32()),
])

#: ``takedowns/t<gen>.parquet``: one row per identifier of one takedown.
TAKEDOWN_SCHEMA = pa.schema([
    ("identifier", pa.string()),
    ("kind", pa.string()),  # "uid" | "key" | "url"
    ("reason", pa.string()),
    ("date", pa.string()),
    ("removed_uids", pa.list_(pa.string())),
    ("removed_run_keys", pa.list_(pa.string())),
    ("files", pa.list_(pa.string())),
])

#: The manifest's columns besides the filter values and the embedding.
RECORD_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("uid", pa.string()),
    ("key", pa.string()),
    ("run_key", pa.string()),
    ("run_root", pa.string()),
    ("tar", pa.string()),  # the output tar, relative to run_root (write/p00000/rg000000000.tar)
    ("members", pa.list_(pa.string())),  # its members in that tar: the image, then .txt / .json
    ("url", pa.string()),  # the JSON sidecar's url field (CurationConfig.url_field); null without one
    ("caption", pa.string()),
)


def records_schema(dim: int) -> pa.Schema:
    """``records/c<bucket>/g<gen>.parquet``: the manifest rows of one bucket and generation."""
    return pa.schema([*RECORD_FIELDS, *VALUE_FIELDS, ("embedding", embedding_type(dim))])


def uid_partition(uid: str) -> int:
    """The uid partition of a uid (its first two hex digits).

    >>> uid_partition("0a" + "0" * 30), uid_partition("ff" + "0" * 30)
    (10, 255)
    """
    return int(uid[:2], 16)


def uid_dir(partition: int) -> str:
    return f"{UIDS_DIR}/u{partition:02x}"


def uid_file(partition: int, generation: int) -> str:
    """The uid file of one partition and generation.

    >>> uid_file(10, 3)
    'uids/u0a/g000000003.parquet'
    """
    return f"{uid_dir(partition)}/g{generation:09d}.parquet"


def bucket_dir(bucket: int) -> str:
    return f"{RECORDS_DIR}/c{bucket:05d}"


def records_file(bucket: int, generation: int) -> str:
    """The manifest file of one bucket and generation.

    >>> records_file(7, 12)
    'records/c00007/g000000012.parquet'
    """
    return f"{bucket_dir(bucket)}/g{generation:09d}.parquet"


def takedown_file(generation: int) -> str:
    return f"{TAKEDOWNS_DIR}/t{generation:09d}.parquet"


def parse_generation(name: str) -> int | None:
    """The generation of a delta file's name (``g000000003.parquet`` -> 3), else None."""
    m = _GEN_FILE.match(name)
    return int(m.group(1)) if m else None


def kill_point(point: str) -> None:
    """Test-only: SIGKILL this process when :data:`KILL_ENV` names ``point``."""
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def classify(identifier: str) -> str:
    """A takedown identifier's kind: 32 lowercase hex digits is a ``uid``, anything with ``://``
    a ``url``, else a record ``key``.

    >>> classify("0" * 32), classify("https://a.example/x.jpg"), classify("000100002")
    ('uid', 'url', 'key')
    """
    if UID_RE.match(identifier):
        return "uid"
    if "://" in identifier:
        return "url"
    return "key"


@dataclass(frozen=True)
class CorpusHead:
    """``_corpus.json``: the corpus's one commit point (a missing head is an empty corpus at
    generation 0)."""

    generation: int
    uid_partitions: int
    dim: int | None
    embed_fingerprint: str | None
    centroids: str | None
    runs: tuple[dict, ...]
    takedowns: tuple[dict, ...]
    #: The generation whose publish brought the centroids (records of earlier generations are in
    #: bucket 0 whatever their embedding); None while the corpus has none.
    centroids_generation: int | None = field(default=None)

    @classmethod
    def empty(cls) -> CorpusHead:
        return cls(generation=0, uid_partitions=UID_PARTITIONS, dim=None, embed_fingerprint=None, centroids=None,
                   runs=(), takedowns=())

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> CorpusHead:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CorpusError(f"{where}: not a corpus head of format {FORMAT} (got format "
                              f"{data.get('format') if isinstance(data, dict) else data!r}); this winnow cannot "
                              "read it (a newer winnow wrote it, or the file is not a corpus head)")
        try:
            return cls(
                generation=int(data["generation"]),
                uid_partitions=int(data.get("uid_partitions", UID_PARTITIONS)),
                dim=None if data.get("dim") is None else int(data["dim"]),
                embed_fingerprint=data.get("embed_fingerprint"),
                centroids=data.get("centroids"),
                runs=tuple(dict(r) for r in data.get("runs", [])),
                takedowns=tuple(dict(t) for t in data.get("takedowns", [])),
                centroids_generation=data.get("centroids_generation"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorpusError(f"{where}: a damaged corpus head ({type(exc).__name__}: {exc})") from exc

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "generation": self.generation,
            "uid_partitions": self.uid_partitions,
            "dim": self.dim,
            "embed_fingerprint": self.embed_fingerprint,
            "centroids": self.centroids,
            "centroids_generation": self.centroids_generation,
            "runs": [dict(r) for r in self.runs],
            "takedowns": [dict(t) for t in self.takedowns],
        }

    def run(self, run_key: str) -> dict | None:
        """The published run ``run_key``'s entry, None when it is not published."""
        return next((r for r in self.runs if r.get("run_key") == run_key), None)


def _root_of(root: RunRoot | str) -> RunRoot:
    if isinstance(root, RunRoot):
        return root
    # A plain string: reached like a run root whose entry point configured nothing else, with
    # the standard AWS environment (unused for a local path).
    return RunRoot(str(root), StorageOptions.from_env())


class Corpus:
    """A corpus at a :class:`RunRoot` (or a URI string, reached with the AWS environment).

    The read side: every call reads the head again (one small GET), so a long-lived object never
    answers from a stale generation.
    """

    def __init__(self, root: RunRoot | str) -> None:
        self.root: RunRoot = _root_of(root)
        self.store = CommitStore(self.root)
        self.fs: pafs.FileSystem = self.store.fs

    def __repr__(self) -> str:
        return f"Corpus({self.root.uri!r})"

    # ---- paths and files ------------------------------------------------------------------
    def path(self, rel: str) -> str:
        return self.store.path(rel)

    def uri(self, rel: str) -> str:
        """``rel`` as the user would write it (for messages)."""
        return display_uri(self.fs, self.path(rel))

    def list_files(self, rel: str, *, recursive: bool = False) -> list[pafs.FileInfo]:
        """The files under ``rel`` (one listing; none when the folder is missing), temp files
        of a crashed local writer left out."""
        infos = list_folder(self.fs, self.path(rel), recursive=recursive)
        return [i for i in infos if i.type == pafs.FileType.File and TEMP_MARK not in i.base_name]

    def generation_files(self, rel: str, generation: int) -> list[tuple[int, str]]:
        """(generation, path) of the delta files in folder ``rel`` of generations <= ``generation``,
        in generation order."""
        found = []
        for info in self.list_files(rel):
            g = parse_generation(info.base_name)
            if g is not None and g <= generation:
                found.append((g, info.path))
        return sorted(found)

    def read_parquet(self, path: str, columns: Sequence[str] | None = None, filters: Any = None) -> pa.Table:
        """One of the corpus's Parquet files (``path``: full path on the corpus filesystem)."""
        try:
            with self.fs.open_input_file(path) as f:
                return pq.read_table(f, columns=list(columns) if columns is not None else None, filters=filters)
        except FileNotFoundError as exc:
            raise CorpusError(f"{display_uri(self.fs, path)} is missing: the corpus head names it, so the corpus "
                              "was changed by hand or by an older winnow") from exc
        except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as exc:
            raise CorpusError(f"{display_uri(self.fs, path)}: not a readable corpus file ({exc})") from exc
        except OSError as exc:
            if is_local(self.fs):
                raise
            raise fs_error(self.fs, path, exc) from exc

    # ---- the head -------------------------------------------------------------------------
    def head(self) -> CorpusHead:
        """The head as it is now (one small GET); an empty corpus at generation 0 without one."""
        path = self.path(HEAD_FILE)
        try:
            data = read_json(self.fs, path)
        except ValueError as exc:
            raise CorpusError(f"{self.uri(HEAD_FILE)}: not JSON ({exc}); the corpus head is damaged") from exc
        if data is None:
            return CorpusHead.empty()
        return CorpusHead.from_dict(data, self.uri(HEAD_FILE))

    def published(self, run_key: str) -> bool:
        return self.head().run(run_key) is not None

    # ---- lookups --------------------------------------------------------------------------
    def lookup_uids(self, uids: Sequence[str], *, generation: int | None = None,
                    after: int = 0) -> dict[str, tuple[str, str]]:
        """uid -> (run_key, key) of the corpus record with that uid, as of head generation
        ``generation`` (default: the current head), among the files of generations > ``after``
        (a caller that looked up to generation ``after`` already reads only what came since).
        Reads only the uid partitions the given uids fall in, one at a time, only their
        uid/run_key/key columns (the earliest record wins where a uid is there twice)."""
        return self.uid_rows(uids, ("run_key", "key"), generation=generation, after=after)

    def uid_rows(self, uids: Sequence[str], columns: Sequence[str], *, generation: int | None = None,
                 after: int = 0) -> dict[str, tuple]:
        """uid -> the values of ``columns`` (of the uid files: ``run_key``, ``key``, ``bucket``) of
        the corpus record with that uid, as :meth:`lookup_uids` finds it."""
        if generation is None:
            generation = self.head().generation
        if after >= generation:  # nothing published since: no listing, no read
            return {}
        by_part: dict[int, set[str]] = {}
        for uid in uids:
            if not isinstance(uid, str) or not UID_RE.match(uid):
                raise CorpusError(f"lookup_uids: {uid!r} is not a uid (32 lowercase hex digits)")
            by_part.setdefault(uid_partition(uid), set()).add(uid)
        found: dict[str, tuple] = {}
        for part in sorted(by_part):
            wanted = by_part[part]
            for g, path in self.generation_files(uid_dir(part), generation):
                if g <= after:
                    continue
                t = self.read_parquet(path, ["uid", *columns], filters=[("uid", "in", sorted(wanted))])
                for uid, *values in zip(*(t.column(c).to_pylist() for c in ("uid", *columns))):
                    if uid in wanted and uid not in found:
                        found[uid] = tuple(values)
        return found

    def takedown_identifiers(self) -> dict[str, set[str]]:
        """``{"uid": {...}, "key": {...}, "url": {...}}``: every identifier of every takedown
        recorded in the head (the list stays in force for later runs), and those of a takedown
        in progress (its journal): a record one of them lists never joins the corpus."""
        out: dict[str, set[str]] = {"uid": set(), "key": set(), "url": set()}
        for entry in self.head().takedowns:
            t = self.read_parquet(self.path(entry["file"]), ["identifier", "kind"])
            for ident, kind in zip(t.column("identifier").to_pylist(), t.column("kind").to_pylist()):
                out.setdefault(kind, set()).add(ident)
        pending = read_json(self.fs, self.path(TAKEDOWN_JOURNAL))
        for item in (pending or {}).get("identifiers", []):
            out.setdefault(item["kind"], set()).add(item["identifier"])
        return out

    def centroids(self) -> np.ndarray | None:
        """The corpus's frozen centroids ``(k, d) float32``; None while it has none."""
        head = self.head()
        if head.centroids is None:
            return None
        t = self.read_parquet(self.path(head.centroids), ["centroid"])
        col = t.column("centroid").combine_chunks()
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size).astype(np.float32)

    def buckets(self) -> list[int]:
        """The buckets holding records at the head (one recursive listing of ``records/``)."""
        generation = self.head().generation
        found = set()
        for info in self.list_files(RECORDS_DIR, recursive=True):
            g = parse_generation(info.base_name)
            m = _BUCKET_DIR.match(info.path.rsplit("/", 2)[-2])
            if g is not None and m and g <= generation:
                found.add(int(m.group(1)))
        return sorted(found)

    def read_bucket(self, bucket: int, columns: Sequence[str] | None = None, *,
                    generation: int | None = None) -> pa.Table:
        """Every manifest row of ``bucket``: its files of generations <= the head's (or
        ``generation``), concatenated in generation order."""
        head = self.head()
        generation = head.generation if generation is None else generation
        tables = [self.read_parquet(path, columns) for _g, path in self.generation_files(bucket_dir(bucket), generation)]
        if tables:
            return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
        schema = records_schema(head.dim or 1)
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
        return schema.empty_table()


def open_corpus(uri: str, storage: StorageOptions | None = None) -> Corpus:
    """The corpus at ``uri`` (a local path, ``s3://``, ``gs://``), reached with ``storage``
    (default: the AWS environment)."""
    return Corpus(RunRoot(uri, storage if storage is not None else StorageOptions.from_env()))


def is_published(corpus_uri: str, run_key: str, storage: StorageOptions | None = None) -> bool:
    """Whether run ``run_key`` has published to the corpus at ``corpus_uri`` (its head in storage
    says so); a corpus nothing has published to yet holds no run."""
    try:
        return bool(open_corpus(corpus_uri, storage).published(run_key))
    except FileNotFoundError:
        return False


def iter_records(corpus_uri: str, *, storage: StorageOptions | None = None,
                 columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """The corpus as it stands, bucket by bucket (one bucket in memory): every record of every
    published run, taken-down records excluded (a takedown removes them from the manifest)."""
    corpus = open_corpus(corpus_uri, storage)
    for bucket in corpus.buckets():
        table = corpus.read_bucket(bucket, columns)
        if table.num_rows:
            yield table


def url_of(json_text: str | None, url_field: str) -> str | None:
    """The ``url_field`` of a record's JSON sidecar, when it is there and a string.

    >>> url_of('{"url": "https://x/1.jpg"}', "url"), url_of('{"url": 3}', "url"), url_of(None, "url")
    ('https://x/1.jpg', None, None)
    """
    if not json_text:
        return None
    try:
        obj = json.loads(json_text)
    except ValueError:
        return None
    value = obj.get(url_field) if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


def match_mask(table: pa.Table, identifiers: dict[str, set[str]]) -> np.ndarray:
    """Rows of ``table`` (columns uid, key and url) that any identifier lists."""
    mask = np.zeros(table.num_rows, dtype=bool)
    for kind in ("uid", "key", "url"):
        listed = identifiers.get(kind)
        if listed and kind in table.column_names:
            hit = pc.is_in(table.column(kind), value_set=pa.array(sorted(listed), pa.string()))
            mask |= hit.fill_null(False).to_numpy(zero_copy_only=False)
    return mask


#: A corpus writer (publish, takedown) holds ``<corpus>/_lease.json`` while it works; another
#: writer waits this long for it before failing with :class:`~winnow.exceptions.RunLocked`.
LEASE_WAIT_S = 120.0
LEASE_TTL_S = 2 * 60 * 60


@contextmanager
def corpus_lease(corpus: Corpus, owner: str, *, wait_s: float | None = None) -> Iterator[None]:
    """Hold the corpus lease (:mod:`winnow.rowgroups.lease` on the corpus root) for ``owner``:
    one writer at a time, the others wait up to ``wait_s`` (default :data:`LEASE_WAIT_S`). A dead
    ``process:`` owner's lease is taken over at once."""
    from winnow.exceptions import RunLocked
    from winnow.rowgroups import lease

    wait_s = LEASE_WAIT_S if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lease.acquire(corpus.store, owner, ttl_s=LEASE_TTL_S)
            break
        except RunLocked as exc:
            if time.monotonic() >= deadline:
                raise RunLocked(f"corpus {corpus.root.uri}: another writer holds its lease {corpus.uri('_lease.json')} "
                                f"(waited {wait_s:.0f} s): {exc}") from exc
            time.sleep(min(1.0, max(0.05, wait_s / 10)))
    try:
        yield
    finally:
        lease.release_quietly(corpus.store, owner)
