"""Test helper: write small real tar shards from (member name, bytes) lists."""

from __future__ import annotations

import io
import os
import tarfile


def write_tar(path: str, members: list[tuple[str, bytes]], *, fmt: int = tarfile.PAX_FORMAT) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tree_snapshot(root: str, *, exclude: str | None = None) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file (folders: (-1, 0), as creating a child
    changes a folder's mtime) under root, minus ``exclude``."""
    out: dict[str, tuple[int, int]] = {}
    for folder, dirs, files in os.walk(root):
        if exclude and os.path.abspath(folder).startswith(os.path.abspath(exclude)):
            continue
        for name in dirs + files:
            p = os.path.join(folder, name)
            if exclude and os.path.abspath(p).startswith(os.path.abspath(exclude)):
                continue
            st = os.lstat(p)
            is_dir = os.path.isdir(p) and not os.path.islink(p)
            out[os.path.relpath(p, root)] = (-1, 0) if is_dir else (st.st_size, st.st_mtime_ns)
    return out
