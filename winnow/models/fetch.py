"""Fetch the weights of a production run into a model directory, and the lock that pins them.

The lock, ``winnow-models.lock.json`` in the model directory, holds per file (keyed by its path
relative to the directory): the entry name, source URL, revision, sha256, size, and how the
digest was established (``digest``):

* ``published``: the source publishes the sha256 (an OpenAI checkpoint URL, the Hugging Face
  hub's LFS object id of the file at the recorded revision); the download was checked against it;
* ``pinned``: winnow's registry pins the sha256 (computed from the file at the pinned commit);
* ``git-blob``: no sha256 is published; the download was checked against the file's git blob id
  at the pinned commit, and its sha256 recorded then;
* ``trust-on-first-fetch``: nothing to check the first download against; its sha256 recorded then
  is what every later fetch and verification checks;
* ``converted``: winnow's conversion (the NSFW detector's Keras zip to safetensors) of a download
  described under ``converted_from`` with its own ``digest``.

``"sha256:" + sha256`` is exactly what the stage fingerprints record as ``weights_digest``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from winnow.exceptions import ConfigError, ModelError
from winnow.models.download import Downloaded, download, git_blob_sha1, sha256_file
from winnow.models.registry import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    KERAS_NSFW,
    Source,
    clip_path,
    resolve_sources,
)
from winnow.stages.models import MODELS_LOCK

__all__ = ["LOCK_NAME", "Lock", "LockEntry", "fetch", "model_dir_or_env", "verify", "verify_problems"]

log = logging.getLogger(__name__)

#: The lock file's name, in the model directory (runs read it too: ``locked_weights``).
LOCK_NAME = MODELS_LOCK
#: The lock format written (and the only one read).
LOCK_FORMAT = "winnow-models-lock/1"
#: Where downloads that are converted (the NSFW zip) wait, inside the model directory.
DOWNLOADS_DIR = ".downloads"

PUBLISHED, PINNED, GIT_BLOB, TOFU, CONVERTED = "published", "pinned", "git-blob", "trust-on-first-fetch", "converted"


@dataclass
class LockEntry:
    """One locked file."""

    name: str
    path: str
    source: str
    revision: str | None
    sha256: str
    size: int
    digest: str
    digest_note: str = ""
    converted_from: dict[str, Any] | None = None
    fetched_at: str = ""
    #: the run param that takes this file (``model_dir`` for the open_clip checkpoint)
    param: str = ""

    @property
    def origin(self) -> str:
        """The URL the file came from (a converted file's: its download's)."""
        return (self.converted_from or {}).get("source", self.source)

    @property
    def fingerprint(self) -> str:
        """What a stage fingerprint records for this file (``weights_digest``)."""
        return f"sha256:{self.sha256}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["path"]
        if out["converted_from"] is None:
            del out["converted_from"]
        out["fingerprint"] = self.fingerprint
        return out

    @classmethod
    def from_dict(cls, path: str, values: Mapping[str, Any]) -> LockEntry:
        fields = {k: values.get(k) for k in ("name", "source", "revision", "sha256", "size", "digest")}
        return cls(path=path, **fields, digest_note=str(values.get("digest_note", "")),  # type: ignore[arg-type]
                   converted_from=values.get("converted_from"), fetched_at=str(values.get("fetched_at", "")),
                   param=str(values.get("param", "")))

    def problem(self, model_dir: Path) -> str | None:
        """Why the file on disk is not this entry's, or None when it is (size, then sha256)."""
        target = model_dir / self.path
        where = f"expected source {self.source}" + (f" @ {self.revision}" if self.revision else "")
        if not target.is_file():
            return f"{self.path} ({self.name}): missing; {where}"
        size = target.stat().st_size
        if size != self.size:
            return (f"{self.path} ({self.name}): size {size} bytes, expected {self.size}; sha256 expected "
                    f"{self.sha256}; {where}")
        actual = sha256_file(target)
        if actual != self.sha256:
            return f"{self.path} ({self.name}): sha256 mismatch: expected {self.sha256}, actual {actual}; {where}"
        return None


@dataclass
class Lock:
    """The lock of a model directory: its entries by relative path."""

    model_dir: Path
    entries: dict[str, LockEntry] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.model_dir / LOCK_NAME

    @classmethod
    def read(cls, model_dir: str | Path) -> Lock:
        """The lock of ``model_dir`` (empty when it has none)."""
        model_dir = Path(model_dir).expanduser()
        path = model_dir / LOCK_NAME
        if not path.exists():
            return cls(model_dir)
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model lock {path}: not readable JSON ({exc})") from exc
        if doc.get("format") != LOCK_FORMAT:
            raise ConfigError(f"model lock {path}: format {doc.get('format')!r}, expected {LOCK_FORMAT!r}")
        return cls(model_dir, {p: LockEntry.from_dict(p, v) for p, v in doc.get("files", {}).items()})

    def write(self) -> None:
        """Write atomically (a temporary file renamed over the lock)."""
        from winnow import __version__

        doc = {
            "format": LOCK_FORMAT,
            "written_by": f"winnow {__version__}",
            "files": {p: self.entries[p].to_dict() for p in sorted(self.entries)},
        }
        self.model_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lock-", dir=self.model_dir)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from the services that read the models volume
        os.replace(tmp, self.path)

    def params(self) -> dict[str, str]:
        """The run params these files fill: ``model_dir`` and the heads' weights paths, as a run
        reads them from the written lock (:func:`winnow.stages.models.locked_weights`)."""
        from winnow.stages.models import locked_weights

        return {"model_dir": str(self.model_dir), **locked_weights(str(self.model_dir))}


def model_dir_or_env(model_dir: str | Path | None) -> Path:
    """``model_dir``, else ``WINNOW_MODEL_DIR``; a :class:`ConfigError` when neither is set."""
    from winnow.stages.models import MODEL_DIR_ENV

    value = model_dir or os.environ.get(MODEL_DIR_ENV)
    if not value:
        raise ConfigError(f"no model directory: pass --model-dir (model_dir=) or set {MODEL_DIR_ENV}")
    return Path(value).expanduser().absolute()


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def verify(
    model_dir: str | Path | None = None,
    *,
    model: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    only: list[str] | tuple[str, ...] | None = None,
    sources: Mapping[str, Any] | str | Path | None = None,
) -> Lock:
    """Check the files of ``model_dir`` against its lock, downloading nothing: every file the
    lock holds for the selected entries must be there with its size and sha256, and every
    selected entry must be in the lock. Raises :class:`ModelError` listing each missing or
    wrong file (one line each, as :func:`verify_problems` gives them) with its expected source;
    returns the lock otherwise."""
    root = model_dir_or_env(model_dir)
    problems = verify_problems(root, model=model, pretrained=pretrained, only=only, sources=sources)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ModelError(f"model directory {root}: {len(problems)} file(s) missing or wrong:\n{lines}")
    return Lock.read(root)


def verify_problems(
    model_dir: str | Path | None = None,
    *,
    model: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    only: list[str] | tuple[str, ...] | None = None,
    sources: Mapping[str, Any] | str | Path | None = None,
) -> list[str]:
    """What :func:`verify` finds wrong, one line per file (empty: all verified)."""
    root = model_dir_or_env(model_dir)
    lock = Lock.read(root)
    wanted = resolve_sources(model, pretrained, only=only, sources=sources)
    problems: list[str] = []
    if not lock.path.exists():
        problems.append(f"{LOCK_NAME}: missing (fetch without --offline first)")
    for source in wanted:
        entry = lock.entries.get(source.path)
        if entry is None:
            problems.append(f"{source.path} ({source.name}): not in the lock; expected source {source.url}")
            continue
        problem = entry.problem(root)
        if problem:
            problems.append(problem)
    return problems


def _digest_of(source: Source, got: Downloaded, locked: LockEntry | None) -> tuple[str, str]:
    """(digest method, note) of a download that passed every check it had."""
    if source.sha256:
        method = PUBLISHED if source.sha256_note.startswith("published") else PINNED
        return method, source.sha256_note
    hub = _hub_sha256(got.headers)
    if hub:
        return PUBLISHED, f"published: the Hugging Face hub's LFS sha256 of the file at revision {_revision(source, got)}"
    if source.git_blob:
        return GIT_BLOB, (f"sha256 recorded at the first fetch ({_now()}); content checked against git blob "
                          f"{source.git_blob} at {source.revision}")
    if locked is not None:
        return locked.digest, locked.digest_note
    return TOFU, f"no published digest: trusted on the first fetch ({_now()}) and checked against it since"


def _hub_sha256(headers: Mapping[str, str]) -> str | None:
    etag = headers.get("x-linked-etag", "").strip().strip('"').removeprefix("W/").strip('"').lower()
    return etag if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) else None


def _revision(source: Source, got: Downloaded | None) -> str | None:
    if got is not None and got.headers.get("x-repo-commit"):
        return got.headers["x-repo-commit"]
    return source.revision


def _expected(source: Source, locked: LockEntry | None) -> str | None:
    """The sha256 the download must have: the registry's, or the lock's for the same source."""
    if source.sha256:
        return source.sha256
    if locked is not None and locked.source == source.url and locked.converted_from is None:
        return locked.sha256
    return None


def _existing_ok(root: Path, source: Source, locked: LockEntry | None) -> bool:
    """Whether the file already there is the one wanted (so nothing is downloaded)."""
    target = root / source.path
    if not target.is_file():
        return False
    if locked is not None and locked.origin == source.url and locked.problem(root) is None:
        return True
    if source.convert:
        return False
    if source.sha256:
        return sha256_file(target) == source.sha256
    if source.git_blob:
        return git_blob_sha1(target) == source.git_blob
    return False


def _download(source: Source, dest: Path, expected: str | None, progress: bool, retries: int) -> Downloaded:
    return download(source.url, dest, expected_sha256=expected, expected_git_blob=source.git_blob,
                    label=f"{source.name}: {Path(source.path).name}", retries=retries, progress=progress)


def _convert_keras_nsfw(archive: Path, target: Path, source: Source, archive_sha256: str) -> None:
    from safetensors.torch import save_file

    from winnow.models.keras import keras_weights
    from winnow.stages.heads import NsfwHead, nsfw_state_dict_from_keras

    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for member in z.namelist():  # no absolute paths or .. escaping the folder
                    if member.startswith("/") or ".." in Path(member).parts:
                        raise ModelError(f"{archive}: unsafe path {member!r} in the archive")
                z.extractall(tmp)
            weights = keras_weights(tmp)
        else:
            weights = keras_weights(archive)
        state = nsfw_state_dict_from_keras(weights)
        NsfwHead(int(state["layers.0.weight"].shape[1])).load_state_dict(state)  # the layout fits
        out = Path(tmp) / target.name
        save_file(state, str(out), metadata={"source": source.url, "source_sha256": archive_sha256,
                                             "converted_by": "winnow.models"})
        os.replace(out, target)


def _fetch_one(root: Path, source: Source, lock: Lock, progress: bool, retries: int) -> LockEntry:
    locked = lock.entries.get(source.path)
    target = root / source.path
    if _existing_ok(root, source, locked):
        if locked is not None and locked.origin == source.url:
            log.info("%s: %s is there and matches the lock", source.name, source.path)
            return locked
        digest = sha256_file(target)
        method = PINNED if source.sha256 else GIT_BLOB
        note = source.sha256_note if source.sha256 else f"file already there, checked against git blob {source.git_blob}"
        return LockEntry(source.name, source.path, source.url, source.revision, digest, target.stat().st_size,
                         method, note, fetched_at=_now(), param=source.param)
    if target.exists():
        log.warning("%s: replacing %s, which does not match its expected digest", source.name, target)
    if source.convert == KERAS_NSFW:
        archive = root / DOWNLOADS_DIR / Path(source.url.split("?")[0]).name
        expected = source.sha256
        previous = (locked.converted_from or {}) if locked is not None else {}
        if expected is None and previous.get("source") == source.url:
            expected = previous.get("sha256")
        got = _download(source, archive, expected, progress, retries)
        method, note = _digest_of(source, got, None)
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_keras_nsfw(archive, target, source, got.sha256)
        archive.unlink()
        return LockEntry(
            source.name, source.path, source.url, _revision(source, got), sha256_file(target), target.stat().st_size,
            CONVERTED, "winnow's conversion (winnow.models.keras + nsfw_state_dict_from_keras) of the download "
            "under converted_from",
            converted_from={"source": source.url, "revision": _revision(source, got), "sha256": got.sha256,
                            "size": got.size, "digest": method, "digest_note": note},
            fetched_at=_now(), param=source.param,
        )
    try:
        got = _download(source, target, _expected(source, locked), progress, retries)
    except ModelError as exc:
        fallback = source.url.replace("/open_clip_model.safetensors", "/open_clip_pytorch_model.bin")
        if source.name != "clip" or fallback == source.url or "HTTP 404" not in str(exc):
            raise
        # open_clip's own order: the safetensors file when the hub has one, else the .bin.
        source = Source(source.name, fallback, clip_path(*Path(source.path).parts[:2], fallback),
                        revision=source.revision, param=source.param, description=source.description)
        got = _download(source, root / source.path, None, progress, retries)
    hub = _hub_sha256(got.headers)
    if hub and hub != got.sha256:
        got.path.unlink()
        raise ModelError(f"{got.path}: sha256 mismatch for {source.name} downloaded from {source.url}: expected "
                            f"{hub} (the hub's LFS sha256), got {got.sha256}")
    method, note = _digest_of(source, got, locked if _expected(source, locked) else None)
    return LockEntry(source.name, source.path, source.url, _revision(source, got), got.sha256, got.size, method,
                     note, fetched_at=_now(), param=source.param)


def fetch(
    model_dir: str | Path | None = None,
    *,
    model: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    only: list[str] | tuple[str, ...] | None = None,
    offline: bool = False,
    sources: Mapping[str, Any] | str | Path | None = None,
    progress: bool = True,
    retries: int = 3,
) -> Lock:
    """Download what a production run needs into ``model_dir`` (else ``WINNOW_MODEL_DIR``),
    verify each file, and write the lock; returns it.

    Entries (``only`` picks some): ``clip`` (the open_clip checkpoint of ``model`` and tag
    ``pretrained``, where :func:`winnow.stages.models.tag_candidates` looks), ``aesthetic``,
    ``nsfw`` (converted to safetensors, no TensorFlow) and ``watermark``. A file already there
    that matches the lock (or its pinned digest) is not downloaded again; a partial download
    (``<file>.part``) is resumed. ``offline=True`` downloads nothing and is :func:`verify`.
    ``sources`` (or ``WINNOW_MODELS_SOURCES``) replaces registry entries, e.g. with mirrors.
    """
    if offline:
        return verify(model_dir, model=model, pretrained=pretrained, only=only, sources=sources)
    root = model_dir_or_env(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    wanted = resolve_sources(model, pretrained, only=only, sources=sources)
    lock = Lock.read(root)
    for source in wanted:
        entry = _fetch_one(root, source, lock, progress, retries)
        lock.entries[entry.path] = entry
        lock.write()  # after every file: an interrupted fetch keeps what it verified
    downloads = root / DOWNLOADS_DIR
    if downloads.is_dir() and not any(downloads.iterdir()):
        shutil.rmtree(downloads, ignore_errors=True)
    return lock
