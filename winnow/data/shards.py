"""Listing the WebDataset shards of an input: every ``*.tar`` under a local path or a
``pyarrow.fs`` URI, recursively, in one sorted order that fixes the run's record order.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from winnow.data.errors import InputError
from winnow.rowgroups.store import resolve_filesystem

SHARD_SUFFIX = ".tar"


def shard_uri(input_uri: str, path: str) -> str:
    """How a shard found under ``input_uri`` is named in the index: a plain absolute path for
    local input, else a URI of the input's scheme (its query options, e.g. an endpoint, kept) so
    that :func:`resolve_filesystem` reopens it."""
    if "://" not in input_uri:
        return path
    parts = urlsplit(input_uri)
    query = f"?{parts.query}" if parts.query else ""
    if parts.scheme == "file":
        return f"file://{path}"
    return f"{parts.scheme}://{path.lstrip('/')}{query}"


def open_shard_filesystem(shard: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a shard named as :func:`list_shards` names it."""
    if filesystem is not None:
        return filesystem, shard
    return resolve_filesystem(shard)


def list_shards(input_uri: str) -> list[str]:
    """All ``*.tar`` files under ``input_uri`` (a folder, searched recursively, or one tar),
    sorted by path. Raises :class:`InputError` when the input is missing or holds no tar."""
    return [name for name, _ in list_shard_infos(input_uri)]


def list_shard_infos(input_uri: str) -> list[tuple[str, int]]:
    """(shard, size in bytes) of every shard :func:`list_shards` lists, from one listing."""
    try:
        fs, root = resolve_filesystem(input_uri)
        info = fs.get_file_info(root)
    except (OSError, ValueError) as exc:
        raise InputError(
            input_uri,
            f"input {input_uri!r} cannot be opened: {exc}. Check the URI's scheme and "
            "credentials, or pass a local folder of WebDataset shards.",
        ) from exc
    if info.type == pafs.FileType.NotFound:
        raise InputError(
            input_uri,
            f"input {input_uri!r} does not exist. Point input_uri at a folder (or prefix) holding "
            f"WebDataset shards ({SHARD_SUFFIX} files); `python -m winnow.data.sample --out DIR` "
            "writes a sample one.",
        )
    if info.type == pafs.FileType.File:
        found = [info] if root.endswith(SHARD_SUFFIX) else []
    else:
        selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        found = [
            f
            for f in fs.get_file_info(selector)
            if f.type == pafs.FileType.File and f.base_name.endswith(SHARD_SUFFIX)
        ]
    listed = [(shard_uri(input_uri, f.path), f.size or 0) for f in sorted(found, key=lambda f: f.path)]
    if isinstance(fs, pafs.LocalFileSystem) and info.type == pafs.FileType.Directory:
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


def _broken_links(root: str) -> list[str]:
    """``*.tar`` symlinks under a local ``root`` whose target does not exist."""
    return [
        os.path.join(dirpath, name)
        for dirpath, _, names in os.walk(root)
        for name in names
        if name.endswith(SHARD_SUFFIX) and not os.path.exists(os.path.join(dirpath, name))
    ]
