"""Fault matrix, bad input: corrupt images, bad shards, unsafe member names, duplicate keys.

Each is data, not a crash: counted per record or per shard, never a task failure (a bad shard
fails the index by name unless ``skip_bad_shards``), and never a silent loss.
"""

from __future__ import annotations

import glob
import os
import tarfile

import pyarrow.parquet as pq
import pytest

from tests.faults._faultkit import (
    COUNTS,
    CROSS_SHARD_DUP,
    EXTRA_SHARD,
    IN_SHARD_DUP,
    MODE_KEYS,
    assert_same_as_reference,
)
from winnow.data.index import load_index
from winnow.data.tarscan import split_key
from winnow.exceptions import ShardError
from winnow.execution import Execution
from winnow.pipeline import run_all, run_index
from winnow.schemas import IMAGE_EXTENSIONS
from winnow.stages.write import member_key

pytestmark = pytest.mark.timeout(300)

#: Planted kind -> what the record's error says (the sample generator plants these in shard 0).
CORRUPT_REASONS = {
    "truncated_jpeg": "truncated",
    "zero_byte_image": "empty: zero bytes",
    "not_an_image": "not an image",
    "decompression_bomb": "decompression-bomb guard",
}


def _rows(run_root: str, stage: str, columns: list[str]) -> list[dict]:
    rows: list[dict] = []
    for path in sorted(glob.glob(os.path.join(run_root, stage, "p*", "rg*.parquet"))):
        rows.extend(pq.read_table(path, columns=columns).to_pylist())
    return rows


def _keys_by_id(run_root: str) -> dict[int, str]:
    return {r["record_id"]: r["key"] for r in _rows(run_root, "index", ["record_id", "key"])}


def test_corrupt_images_are_counted_per_record_never_a_task_failure(sample, reference):
    run_root = reference.cfg.run_root
    keys = _keys_by_id(run_root)
    errors = {keys[r["record_id"]]: r["error"] for r in _rows(run_root, "embed", ["record_id", "error"])}
    planted = {c["key"]: c["kind"] for c in sample.manifest["corrupt"] if c["kind"] in CORRUPT_REASONS}
    assert len(planted) == 4
    for key, kind in planted.items():
        assert errors[key] is not None and CORRUPT_REASONS[kind] in errors[key], (kind, errors[key])
    # Valid but unusual images decode: CMYK JPEG, palette PNG, RGBA/LA PNG, RGBA WebP.
    for kind, key in MODE_KEYS.items():
        assert errors[key] is None, f"{kind} ({key}) should decode, got {errors[key]}"
        assert key in reference.output.kept_keys
    assert sorted(k for k, e in errors.items() if e is not None) == sorted(planted)
    summary = reference.summary
    assert summary["undecodable"] == 4
    # Never a task failure: every row group of every stage was computed on the first try.
    assert all(s == {"computed": summary["row_groups"], "skipped": 0} for s in summary["row_groups_by_stage"].values())
    from winnow.stages.status import COUNT_NAMES

    assert summary["records"] == sum(summary[name] for name in COUNT_NAMES.values())


def _bad_shards(folder: str, good: str) -> dict[str, str]:
    """Write one bad shard of each kind into ``folder``; returns kind -> path. Root can read
    anything, so "unreadable" is a broken header checksum or a symlink to nothing."""
    with open(good, "rb") as f:
        data = f.read()
    first_size = tarfile.open(good).getmembers()[0].size
    paths = {kind: os.path.join(folder, f"zz-{kind}.tar") for kind in ("truncated", "bad_checksum", "dangling", "zero_byte")}
    # Cut inside the first member's data: its header promises bytes that are gone.
    with open(paths["truncated"], "wb") as f:
        f.write(data[: 1536 + first_size // 2])  # pax header + its data + the member header, then half
    broken = bytearray(data)
    broken[0] ^= 0xFF  # the first header's name changes, its stored checksum no longer matches
    with open(paths["bad_checksum"], "wb") as f:
        f.write(bytes(broken))
    os.symlink(os.path.join(folder, "no-such-target.tar"), paths["dangling"])
    open(paths["zero_byte"], "wb").close()
    return paths


@pytest.mark.parametrize("kind", ["truncated", "bad_checksum", "dangling"])
def test_bad_shard_fails_the_index_naming_the_shard(sample, tmp_path, kind):
    folder = tmp_path / "input"
    folder.mkdir()
    good = os.path.join(sample.input, "shard-000001.tar")
    os.link(good, folder / "shard-000001.tar")
    bad = _bad_shards(str(folder), good)
    for other, path in bad.items():
        if other != kind:
            os.unlink(path)
    cfg = sample.config(f"bad-{kind}", input_uri=str(folder), output_root=str(tmp_path / "out"))
    with pytest.raises(ShardError) as err:
        run_index(cfg, execution=Execution(), owner="dag-run-1")
    assert err.value.shard == bad[kind]
    assert bad[kind] in str(err.value)
    assert "skip_bad_shards" in str(err.value) or "readable" in str(err.value)  # says what to do
    assert not os.path.exists(os.path.join(cfg.run_root, "_lease.json"))  # the fixed rerun is not locked out


def test_bad_shards_are_skipped_and_counted_and_the_rest_matches_the_reference(sample, reference, tmp_path):
    folder = tmp_path / "input"
    folder.mkdir()
    for good in sorted(glob.glob(os.path.join(sample.input, "*.tar"))):
        os.link(good, folder / os.path.basename(good))
    bad = _bad_shards(str(folder), os.path.join(sample.input, "shard-000001.tar"))
    cfg = sample.config("skip-bad", input_uri=str(folder), skip_bad_shards=True)
    summary = run_all(cfg, backend="local")
    assert summary["bad_shards"] == 3 and summary["zero_byte_shards"] == 1
    assert summary["shards"] == reference.summary["shards"] + 4
    counts = load_index(cfg.run_root).counts
    assert sorted(e["shard"] for e in counts["bad_shard_errors"]) == sorted(
        bad[k] for k in ("truncated", "bad_checksum", "dangling")
    )
    same = tuple(k for k in COUNTS if k not in ("shards", "bad_shards", "zero_byte_shards"))
    assert_same_as_reference(cfg.run_root, summary, reference, counts=same)


def test_member_names_with_dotdot_or_leading_slash_stay_keys_and_nothing_lands_outside(sample, reference):
    planted = {c["kind"]: c["key"] for c in sample.manifest["corrupt"]}
    unsafe = [planted["parent_traversal_name"], planted["absolute_name"]]
    assert unsafe[0].startswith("../") and unsafe[1].startswith("/")
    index_keys = set(_keys_by_id(reference.cfg.run_root).values())
    assert set(unsafe) <= index_keys  # kept as keys, unchanged
    # Both are kept: they keep their keys in the output Parquet and are stored under safe tar
    # member names.
    kept = [k for k in unsafe if k in reference.output.kept_keys]
    assert kept == unsafe
    names = []
    for tar_path in glob.glob(os.path.join(reference.cfg.run_root, "write", "p*", "rg*.tar")):
        with tarfile.open(tar_path) as tar:
            names.extend(tar.getnames())
    assert all(not n.startswith("/") and ".." not in n.split("/") for n in names)
    assert f"{member_key(unsafe[0])}.jpg" in names and f"{member_key(unsafe[1])}.jpg" in names
    # Nothing was written outside the run root: the test tree is as before plus out/ itself.
    before, after = reference.tree_before, reference.tree_after
    assert set(after) - set(before) == {"out"}
    assert {k: after[k] for k in before} == before
    for root in ("/", sample.base, os.path.dirname(sample.base), os.path.join(sample.base, "out")):
        assert not os.path.exists(os.path.join(root, "escape")) and not os.path.exists(os.path.join(root, "absolute"))


def _image_records(shard: str) -> list[tuple[str, bytes]]:
    """(key, first image bytes) of every record with an image, in member order, straight from
    tarfile: the count before any deduplication of keys."""
    out: list[tuple[str, bytes]] = []
    current, images = None, []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers() + [None]:
            key, ext = split_key(m.name) if m is not None else (None, "")
            if key != current:
                if images:
                    out.append((current, images[0]))
                current, images = key, []
            if m is not None and ext in IMAGE_EXTENSIONS:
                images.append(tar.extractfile(m).read())
    return out


def test_duplicate_keys_within_and_across_shards_keep_the_first_and_count_every_drop(sample, reference):
    from winnow.data.reader import read_members

    shards = sorted(glob.glob(os.path.join(sample.input, "*.tar")))
    raw = [(shard, key, data) for shard in shards for key, data in _image_records(shard)]
    index = load_index(reference.cfg.run_root)
    counts = index.counts
    assert counts["duplicate_keys"] == 3 and counts["duplicate_keys_across_shards"] == 1
    # No silent loss: every image record in the tars is in the index or counted as dropped.
    assert len(raw) == index.num_records + counts["duplicate_keys"]
    assert reference.summary["duplicate_keys"] == counts["duplicate_keys"]
    rows = _rows(reference.cfg.run_root, "index", ["record_id", "key", "shard", "image_ext", "image_offset", "image_size"])
    by_key = {r["key"]: r for r in rows}
    assert len(by_key) == len(rows)  # every key once
    first = {}
    for shard, key, data in raw:
        first.setdefault(key, (shard, data))
    import pyarrow as pa

    for key in ("000000000", IN_SHARD_DUP, CROSS_SHARD_DUP):
        row = by_key[key]
        assert row["shard"] == first[key][0]
        table = pa.Table.from_pylist([row])
        assert read_members(table, "image") == [first[key][1]]  # the first occurrence's bytes
    assert by_key[CROSS_SHARD_DUP]["shard"].endswith("shard-000001.tar")
    assert by_key[IN_SHARD_DUP]["shard"].endswith(EXTRA_SHARD) and by_key[IN_SHARD_DUP]["image_ext"] == "png"
