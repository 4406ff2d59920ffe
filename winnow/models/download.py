"""One file over HTTP(S) into a folder: a ``.part`` file resumed with an HTTP Range request after
a dropped connection or an interrupted fetch, a progress bar on stderr, the sha256 (and, for a
file pinned by its git blob id, the git blob SHA-1) checked before an atomic rename to the final
name. Nothing else in winnow downloads."""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from winnow.exceptions import ModelError
from winnow.stages.models import sha256_hex as sha256_file  # sha256 hex of a file (no cache)

__all__ = ["Downloaded", "download", "git_blob_sha1", "sha256_file"]

#: Bytes read per chunk.
_CHUNK = 1 << 20
#: Seconds a read may stall before the connection counts as dropped.
_TIMEOUT_S = 60.0
#: Headers of the Hugging Face hub's first (redirect) response worth keeping.
_HUB_HEADERS = ("x-repo-commit", "x-linked-etag", "x-linked-size")


def git_blob_sha1(path: str | Path) -> str:
    """The git blob id of a file's content (SHA-1 of ``blob <size>\\0`` + the bytes): what a
    repository tree records for it."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Downloaded:
    """A finished download: its path, sha256 hex, size, and response headers worth recording."""

    path: Path
    sha256: str
    size: int
    headers: dict[str, str] = field(default_factory=dict)
    resumed_from: int = 0


class _KeepRedirectHeaders(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does, keeping the hub's headers of the first response (a
    Hugging Face ``resolve`` URL answers 302 with the commit and the LFS sha256, then the CDN
    serves the bytes without them)."""

    def __init__(self, seen: dict[str, str]) -> None:
        self.seen = seen

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 - urllib's signature
        for name in _HUB_HEADERS:
            if headers.get(name) and name not in self.seen:
                self.seen[name] = headers[name]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and req.get_header("Range"):
            new.add_unredirected_header("Range", req.get_header("Range"))
        return new


def _open(url: str, start: int, seen: dict[str, str]) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": "winnow-models"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    token = os.environ.get("HF_TOKEN")
    if token and "huggingface.co" in url:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(_KeepRedirectHeaders(seen))
    return opener.open(request, timeout=_TIMEOUT_S)


def _progress(total: int | None, initial: int, label: str, enabled: bool):  # noqa: ANN202 - a tqdm bar
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=not enabled, leave=False, dynamic_ncols=True)


def download(
    url: str,
    dest: str | Path,
    *,
    expected_sha256: str | None = None,
    expected_git_blob: str | None = None,
    label: str | None = None,
    retries: int = 3,
    progress: bool = True,
) -> Downloaded:
    """Download ``url`` to ``dest`` through ``dest.part``; returns what was written.

    A ``.part`` left by an earlier try is resumed with ``Range: bytes=<size>-`` (a server that
    answers 200 instead of 206 restarts it). A connection dropped mid-file is resumed the same
    way, up to ``retries`` times. The finished file's sha256 is checked against
    ``expected_sha256`` (and its git blob id against ``expected_git_blob``) before it is renamed
    to ``dest``: on a mismatch the ``.part`` is deleted and :class:`ModelError` names the file,
    the URL and both digests (as it names the URL of a download that failed).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    label = label or dest.name
    seen: dict[str, str] = {}
    resumed_from = part.stat().st_size if part.exists() else 0
    attempt = 0
    while True:
        start = part.stat().st_size if part.exists() else 0
        try:
            response = _open(url, start, seen)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and start:  # the .part is already whole (or longer than the file)
                part.unlink()
                resumed_from = 0
                continue
            raise ModelError(f"{label}: HTTP {exc.code} {exc.reason} for {url}") from exc
        except (urllib.error.URLError, OSError) as exc:
            if attempt >= retries:
                raise ModelError(f"{label}: could not reach {url}: {exc}") from exc
            attempt += 1
            time.sleep(min(2.0**attempt, 10.0) * 0.1)
            continue
        with response:
            if start and response.status != 206:
                start = 0  # the server ignored the Range: start over
                resumed_from = 0
            length = response.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            try:
                with open(part, "ab" if start else "wb") as out, _progress(total, start, label, progress) as bar:
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
                if total is not None and part.stat().st_size < total:
                    raise http.client.IncompleteRead(b"", total - part.stat().st_size)
            except (http.client.HTTPException, OSError) as exc:
                if attempt >= retries:
                    raise ModelError(
                        f"{label}: the connection to {url} dropped at {part.stat().st_size} bytes ({exc}); "
                        f"fetch again to resume from {part}"
                    ) from exc
                attempt += 1
                continue
        break
    for name in _HUB_HEADERS:
        if response.headers.get(name) and name not in seen:
            seen[name] = response.headers[name]
    digest = sha256_file(part)
    if expected_sha256 and digest != expected_sha256.lower():
        part.unlink()
        raise ModelError(
            f"{dest}: sha256 mismatch for {label} downloaded from {url}: expected {expected_sha256}, "
            f"got {digest} (the download was deleted)"
        )
    if expected_git_blob:
        blob = git_blob_sha1(part)
        if blob != expected_git_blob.lower():
            part.unlink()
            raise ModelError(
                f"{dest}: git blob id mismatch for {label} downloaded from {url}: expected {expected_git_blob}, "
                f"got {blob} (sha256 {digest}; the download was deleted)"
            )
    size = part.stat().st_size
    os.replace(part, dest)
    return Downloaded(dest, digest, size, seen, resumed_from)
