"""Listing the WebDataset shards of an input: every ``*.tar`` under a local path or a
``pyarrow.fs`` URI, recursively, in one sorted order that fixes the run's record order.

An input may be a folder (or prefix), one tar, a glob (``/data/part-*.tar``,
``s3://bucket/x/*.tar``, ``**`` crosses folders) or a brace list as WebDataset users write it
(``shard-{000..099}.tar``, ``{a,b}``); :func:`expand_input` owns that rule.
"""

from __future__ import annotations

import itertools
import os
import re
from collections import defaultdict

import pyarrow.fs as pafs

from winnow.exceptions import InputError, StorageError
from winnow.rowgroups.fs import StorageOptions, check_bucket, explain, is_local, resolve_filesystem, storage_of

SHARD_SUFFIX = ".tar"
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_MAGIC = re.compile(r"[*?[]")


def _split_uri(uri: str) -> tuple[str, str, str]:
    """(``scheme://`` or "", the path part, query). A ``?`` is a glob character unless what
    follows it reads as URI options (``key=value``)."""
    if "://" not in uri:
        return "", uri, ""
    scheme, rest = uri.split("://", 1)
    query = ""
    if "?" in rest:
        head, tail = rest.split("?", 1)
        if "=" in tail and "/" not in tail:
            rest, query = head, tail
    return f"{scheme}://", rest, query


def shard_uri(input_uri: str, path: str) -> str:
    """How a shard found under ``input_uri`` is named in the index: a plain absolute path for
    local input, else a URI of the input's scheme (its query options, e.g. an endpoint, kept) so
    that :func:`resolve_filesystem` reopens it."""
    prefix, _, query = _split_uri(input_uri)
    if not prefix:
        return path
    if prefix == "file://":
        return f"file://{path}"
    return f"{prefix}{path.lstrip('/')}{'?' + query if query else ''}"


def open_shard_filesystem(shard: str, filesystem: pafs.FileSystem | None = None,
                          storage: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a shard named as :func:`list_shards` names it, reached with the
    run's ``storage`` settings (an object store needs them)."""
    if filesystem is not None:
        return filesystem, shard
    return resolve_filesystem(shard, storage)


def expand_braces(pattern: str) -> list[str]:
    """Brace lists and numeric ranges expanded, in order; other text is kept as written.

    >>> expand_braces("shard-{000..002}.tar")
    ['shard-000.tar', 'shard-001.tar', 'shard-002.tar']
    >>> expand_braces("{a,b}/x-{1..2}.tar")
    ['a/x-1.tar', 'a/x-2.tar', 'b/x-1.tar', 'b/x-2.tar']
    >>> expand_braces("/data/{{ ds }}/part-*.tar")  # no comma or range: left alone
    ['/data/{{ ds }}/part-*.tar']
    """
    pieces: list[list[str]] = []
    pos = 0
    for m in _BRACE.finditer(pattern):
        body = m.group(1)
        rng = _RANGE.match(body)
        if rng:
            a, b = rng.groups()
            lo, hi = int(a), int(b)
            step = 1 if hi >= lo else -1
            padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (a, b))
            width = max(len(a), len(b)) if padded else 0
            choices = [str(i).zfill(width) for i in range(lo, hi + step, step)]
        elif "," in body:
            choices = body.split(",")
        else:
            continue
        pieces.append([pattern[pos:m.start()]])
        pieces.append(choices)
        pos = m.end()
    pieces.append([pattern[pos:]])
    return ["".join(p) for p in itertools.product(*pieces)]


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A path glob as a regex: ``*`` and ``?`` stay within one folder, ``**`` crosses folders,
    ``[...]`` is a character class.

    >>> bool(glob_regex("b/x/part-*.tar").fullmatch("b/x/part-7.tar"))
    True
    >>> bool(glob_regex("b/x/*.tar").fullmatch("b/x/sub/part-7.tar"))
    False
    >>> bool(glob_regex("b/**/*.tar").fullmatch("b/x/sub/part-7.tar"))
    True
    """
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and pattern.find("]", i + 2) != -1:
            end = pattern.find("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def expand_input(input_uri: str) -> list[str]:
    """The patterns an ``input_uri`` stands for: its brace expansion (one item when there is
    none). Each item is a folder, a tar or a glob."""
    return expand_braces(input_uri)


def list_shards(input_uri: str, storage: StorageOptions | None = None) -> list[str]:
    """All ``*.tar`` files under ``input_uri`` (a folder, searched recursively, one tar, a glob
    or a brace list: see :func:`expand_input`), sorted by path; an object store is reached with
    the run's ``storage`` settings. Raises :class:`InputError` when the input is missing, a
    pattern matches nothing, or no tar is found."""
    return [name for name, _ in list_shard_infos(input_uri, storage)]


def list_shard_infos(input_uri: str, storage: StorageOptions | None = None) -> list[tuple[str, int]]:
    """(shard, size in bytes) of every shard :func:`list_shards` lists, from one listing per
    folder (one LIST per prefix on an object store)."""
    patterns = expand_input(input_uri)
    if len(patterns) == 1 and not _MAGIC.search(_split_uri(patterns[0])[1]):
        return _list_one(input_uri, storage)
    return _list_patterns(input_uri, patterns, storage)


def _open(input_uri: str, uri: str, storage: StorageOptions | None) -> tuple[pafs.FileSystem, str]:
    try:
        return resolve_filesystem(uri, storage)
    except (OSError, ValueError, StorageError) as exc:
        raise InputError(
            input_uri,
            f"input {input_uri!r} cannot be opened: {exc}. Check the URI's scheme and "
            "credentials, or pass a local folder of WebDataset shards.",
        ) from exc


def _info(input_uri: str, fs: pafs.FileSystem, what) -> object:
    try:
        return fs.get_file_info(what)
    except OSError as exc:
        raise InputError(input_uri, f"input {explain(input_uri, exc, storage_of(fs))}") from exc


def _missing(input_uri: str, fs: pafs.FileSystem, path: str) -> None:
    """A missing bucket is named as such before "does not exist"."""
    try:
        check_bucket(fs, path, input_uri)
    except StorageError as exc:
        raise InputError(input_uri, f"input {exc}") from exc


def _list_one(input_uri: str, storage: StorageOptions | None) -> list[tuple[str, int]]:
    fs, root = _open(input_uri, input_uri, storage)
    info = _info(input_uri, fs, root)
    if info.type == pafs.FileType.NotFound:
        _missing(input_uri, fs, root)
        raise InputError(
            input_uri,
            f"input {input_uri!r} does not exist. Point input_uri at a folder (or prefix) holding "
            f"WebDataset shards ({SHARD_SUFFIX} files), a glob or a brace list; "
            "`python -m winnow.data.sample --out DIR` writes a sample one.",
        )
    if info.type == pafs.FileType.File:
        found = [info] if root.endswith(SHARD_SUFFIX) else []
    else:
        found = _tars_under(input_uri, fs, root)
    listed = [(shard_uri(input_uri, f.path), f.size or 0) for f in sorted(found, key=lambda f: f.path)]
    if is_local(fs) and info.type == pafs.FileType.Directory:
        # pyarrow's listing leaves out broken symlinks; a shard that is listed as missing
        # beats one that silently vanishes (the index then names it as unreadable).
        listed += [(shard_uri(input_uri, p), 0) for p in _broken_links(root)]
        listed.sort()
    if not listed:
        raise InputError(
            input_uri,
            f"input {input_uri!r} holds no {SHARD_SUFFIX} files (searched recursively). "
            "WebDataset shards must be named *.tar; check the path or the date partition.",
        )
    return listed


def _tars_under(input_uri: str, fs: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(folder, recursive=True, allow_not_found=True)
    return [
        f for f in _info(input_uri, fs, selector)
        if f.type == pafs.FileType.File and f.base_name.endswith(SHARD_SUFFIX)
    ]


def _list_patterns(input_uri: str, patterns: list[str], storage: StorageOptions | None) -> list[tuple[str, int]]:
    """Globs and brace lists: each distinct parent folder is listed once."""
    fs = None
    by_base: dict[str, list[tuple[str, str]]] = defaultdict(list)  # base path -> (pattern, its path)
    for pattern in patterns:
        prefix, rest, query = _split_uri(pattern)
        if not prefix:
            rest = os.path.abspath(rest) + ("/" if rest.endswith("/") else "")
        magic = _MAGIC.search(rest)
        cut = rest.rfind("/", 0, magic.start() if magic else len(rest.rstrip("/")))
        base_rest = rest[:cut] if cut > 0 else ("/" if rest.startswith("/") else "")
        base_uri = f"{prefix}{base_rest}{'?' + query if query else ''}"
        fs, base = _open(input_uri, base_uri, storage)
        tail = rest[cut + 1:].rstrip("/") if cut >= 0 else rest.rstrip("/")
        by_base[base].append((pattern, f"{base.rstrip('/')}/{tail}" if base not in ("", "/") else f"{base}{tail}"))
    assert fs is not None
    found: dict[str, int] = {}
    unmatched: list[str] = []
    for base, items in by_base.items():
        deep = any(_MAGIC.search(p) and "/" in p[len(base):].lstrip("/") for _, p in items)
        listing = _info(input_uri, fs, pafs.FileSelector(base, recursive=deep, allow_not_found=True))
        for pattern, path in items:
            rx = glob_regex(path)
            hits = [f for f in listing if rx.fullmatch(f.path)]
            if not hits:
                unmatched.append(pattern)
            for f in hits:
                if f.type == pafs.FileType.Directory:
                    for t in _tars_under(input_uri, fs, f.path):
                        found[t.path] = t.size or 0
                elif f.base_name.endswith(SHARD_SUFFIX):
                    found[f.path] = f.size or 0
    if unmatched:
        if not found:
            _missing(input_uri, fs, next(iter(by_base)))
        shown = ", ".join(repr(p) for p in unmatched[:5])
        if len(unmatched) > 5:
            shown += f" and {len(unmatched) - 5} more"
        raise InputError(
            input_uri,
            f"input pattern {input_uri!r} matched nothing for {shown}. Check the pattern (globs: "
            "* ? [..] within a folder, ** across folders; brace lists: {a,b} and {000..099}) "
            "and that the shards exist.",
        )
    if not found:
        raise InputError(
            input_uri,
            f"input pattern {input_uri!r} matched no {SHARD_SUFFIX} files. WebDataset shards "
            "must be named *.tar; check the pattern.",
        )
    return [(shard_uri(input_uri, path), found[path]) for path in sorted(found)]


def _broken_links(root: str) -> list[str]:
    """``*.tar`` symlinks under a local ``root`` whose target does not exist."""
    return [
        os.path.join(dirpath, name)
        for dirpath, _, names in os.walk(root)
        for name in names
        if name.endswith(SHARD_SUFFIX) and not os.path.exists(os.path.join(dirpath, name))
    ]
