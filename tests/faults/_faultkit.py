"""Helpers of the fault matrix: the shared input, the reference run's output, and the checks every
recoverable case ends with (same output as the reference, nothing computed twice).

The input is the sample generator's corrupt sample (3 shards x 16 records) plus one shard of our
own (CMYK / palette / alpha images, a key repeated inside the shard and a key from another shard).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from tests._tiny import tiny_config
from winnow.data.sample import _picture
from winnow.pipeline import CurationConfig

HERE = os.path.dirname(os.path.abspath(__file__))
from winnow.registry import partition_stages  # noqa: E402

RUNNER_STAGES = tuple(s.name for s in partition_stages())  # the stages the row-group runner commits
#: Summary fields a recovered run must share with the reference.
COUNTS = (
    "records", "exact_duplicates", "undecodable", "aesthetic_dropped", "nsfw_dropped", "no_caption",
    "clip_score_dropped", "duplicates", "kept", "written", "thresholds", "skipped_members",
    "members_without_image", "duplicate_keys", "shards", "bad_shards", "zero_byte_shards",
    "row_groups", "partitions",
)
#: Our own shard, sorted after the generator's three so the record order stays theirs + ours.
EXTRA_SHARD = "shard-000003.tar"
MODE_KEYS = {"cmyk_jpeg": "000300000", "palette_png": "000300001", "rgba_png": "000300002",
             "la_png": "000300003", "rgba_webp": "000300004"}
CROSS_SHARD_DUP = "000100003"  # first seen in shard-000001.tar
IN_SHARD_DUP = MODE_KEYS["palette_png"]  # repeated at the end of our shard


def _encode(img: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return out.getvalue()


def _extra_shard_members() -> list[tuple[str, bytes]]:
    pics = [_picture(10_000 + i) for i in range(7)]
    rgba = pics[2].copy()
    rgba.putalpha(pics[2].convert("L"))
    la = Image.merge("LA", (pics[3].convert("L"), pics[3].convert("L").point(lambda v: 255 - v)))
    webp = pics[4].copy()
    webp.putalpha(128)
    images = [
        (MODE_KEYS["cmyk_jpeg"], "jpg", _encode(pics[0].convert("CMYK"), "JPEG")),
        (MODE_KEYS["palette_png"], "png", _encode(pics[1].convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG")),
        (MODE_KEYS["rgba_png"], "png", _encode(rgba, "PNG")),
        (MODE_KEYS["la_png"], "png", _encode(la, "PNG")),
        (MODE_KEYS["rgba_webp"], "webp", _encode(webp, "WEBP")),
        (CROSS_SHARD_DUP, "jpg", _encode(pics[5], "JPEG")),  # dropped: shard 1 has this key first
        (IN_SHARD_DUP, "jpg", _encode(pics[6], "JPEG")),  # dropped: the png above came first
    ]
    members = []
    for key, ext, data in images:
        members.append((f"{key}.{ext}", data))
        members.append((f"{key}.txt", f"extra shard record {key}.{ext}".encode()))
    return members


@dataclass
class Sample:
    base: str  # the session's folder: input/, out/ and the cases' scratch live under it
    input: str
    manifest: dict[str, Any]

    def config(self, run_key: str, **overrides: Any) -> CurationConfig:
        return tiny_config(**{"input_uri": self.input, "output_root": os.path.join(self.base, "out"), "run_key": run_key,
                              "buffer_size": 8, "max_partitions": 3, "batch_size": 8, **overrides})


@dataclass
class Reference:
    cfg: CurationConfig
    summary: dict[str, Any]
    output: RunOutput
    tree_before: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    tree_after: dict[str, tuple[int, int, str]] = field(default_factory=dict)


@dataclass
class RunOutput:
    kept_keys: list[str]
    tars: dict[str, str]  # path relative to the run root -> sha256 of the bytes

    @classmethod
    def of(cls, run_root: str) -> RunOutput:
        keys: list[str] = []
        tars: dict[str, str] = {}
        out = os.path.join(run_root, "write")
        for dirpath, _, files in sorted(os.walk(out)):
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                if name.startswith("rg") and name.endswith(".parquet"):
                    keys.extend(pq.read_table(path, columns=["key"]).column("key").to_pylist())
                elif name.startswith("rg") and name.endswith(".tar"):
                    tars[os.path.relpath(path, run_root)] = sha256_file(path)
        return cls(sorted(keys), tars)


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tree_state(root: str, *, skip: str | None = None) -> dict[str, tuple[int, int, str]]:
    """(inode, mtime_ns, sha256 or '<dir>') of every path under ``root`` but ``skip``."""
    state: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirs, files in os.walk(root):
        if skip is not None:
            dirs[:] = [d for d in dirs if os.path.join(dirpath, d) != skip]
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            digest = "<dir>" if name in dirs else ("<link>" if os.path.islink(path) else sha256_file(path))
            state[os.path.relpath(path, root)] = (st.st_ino, st.st_mtime_ns, digest)
    return state


def committed_files(run_root: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every committed row-group file (``rg*.parquet`` and side files).

    A commit writes a temp file and renames it, so a recomputed row group gets a new inode:
    an unchanged (inode, mtime_ns) proves the file was not written again. Side files (tar,
    thumbnails) of a row group whose ``.parquet`` marker is missing are not commits: the
    protocol redoes them.
    """
    out: dict[str, tuple[int, int]] = {}
    for dirpath, _, files in os.walk(run_root):
        names = set(files)
        for name in files:
            if name.startswith("rg") and ".tmp-" not in name and f"{name[:11]}.parquet" in names:
                st = os.stat(os.path.join(dirpath, name))
                out[os.path.relpath(os.path.join(dirpath, name), run_root)] = (st.st_ino, st.st_mtime_ns)
    return out


def read_commit_log(log: str | os.PathLike, run_root: str) -> list[tuple[int, str]]:
    """``(pid, path relative to run_root)`` of each commit a commit-log audit hook wrote to
    ``log`` (lines ``<pid> <path>``, one per rename of a row group into place), in order."""
    if not os.path.exists(log):
        return []
    out = []
    with open(log) as f:
        for line in f:
            pid, path = line.rstrip("\n").split(" ", 1)
            if path.startswith(run_root + "/"):
                out.append((int(pid), os.path.relpath(path, run_root)))
    return out


def count_committed(run_root: str, stages=RUNNER_STAGES) -> int:
    return sum(1 for rel in committed_files(run_root) if rel.split("/")[0] in stages and rel.endswith(".parquet"))


def assert_untouched(before: dict[str, tuple[int, int]], run_root: str) -> None:
    after = committed_files(run_root)
    changed = sorted(rel for rel, st in before.items() if after.get(rel) != st)
    assert not changed, f"committed row groups were written again: {changed}"


def assert_same_as_reference(run_root: str, summary: dict[str, Any], reference: Reference, *, counts=COUNTS) -> None:
    """Same kept keys, the same bytes in every output tar, the same outcome counts, the same
    status row (outcome, reason, scores) for every input."""
    from winnow.stages.status import iter_status

    got = RunOutput.of(run_root)
    assert got.kept_keys == reference.output.kept_keys
    assert got.tars == reference.output.tars
    assert {k: summary[k] for k in counts} == {k: reference.summary[k] for k in counts}

    def status(root: str, input_uri: str) -> list[dict[str, Any]]:
        # Shard paths (and reasons naming them) relative to the run's input folder.
        def rel(v: Any) -> Any:
            return v.replace(input_uri.rstrip("/"), "<input>") if isinstance(v, str) else v

        return [{k: rel(v) for k, v in r.items()} for t in iter_status(root) for r in t.to_pylist()]

    assert status(run_root, summary["config"]["input_uri"]) == status(reference.cfg.run_root, reference.cfg.input_uri)


def clone_run(reference: Reference, run_key: str, *, drop: tuple[str, ...] = ()) -> CurationConfig:
    """A copy of the reference run root under ``run_key`` with the row groups of the stages in
    ``drop`` (and the run summary) removed: the state of a run that stopped before those stages."""
    cfg = CurationConfig(**{**reference.cfg.to_dict(), "run_key": run_key})
    shutil.copytree(reference.cfg.run_root, cfg.run_root)
    os.unlink(os.path.join(cfg.run_root, "_summary.json"))
    for stage in drop:
        for entry in os.listdir(os.path.join(cfg.run_root, stage)):
            if entry.startswith("p"):
                shutil.rmtree(os.path.join(cfg.run_root, stage, entry))
    return cfg


CHILD = os.path.join(HERE, "_child.py")


def run_child(spec: dict[str, Any], *, prefix: list[str] | None = None, env: dict[str, str] | None = None,
              timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``_child.py`` with ``spec`` in a fresh Python (optionally under ``prefix``, e.g. unshare)."""
    cmd = [*(prefix or []), sys.executable, CHILD, json.dumps(spec)]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def child_result(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    """The JSON line ``_child.py`` printed last (its result or the error it raised)."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"child printed no result (rc {proc.returncode}); stderr:\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])
