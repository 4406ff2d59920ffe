"""The sample generator writes real, deterministic WebDataset shards with what it promises."""

from __future__ import annotations

import glob
import io
import json
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from winnow.data.sample import MANIFEST, generate_sample, main


@pytest.fixture(scope="module")
def corrupt_sample(tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("sample"))
    return out, generate_sample(out, shards=3, per_shard=16, seed=7, corrupt=True, bad_shards=True)


def _tar_bytes(folder: str) -> dict[str, bytes]:
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(f"{folder}/*"))}


def test_same_seed_gives_byte_identical_shards_and_other_seed_differs(tmp_path):
    kw = dict(shards=2, per_shard=6, corrupt=True, bad_shards=True)
    generate_sample(str(tmp_path / "a"), seed=3, **kw)
    generate_sample(str(tmp_path / "b"), seed=3, **kw)
    generate_sample(str(tmp_path / "c"), seed=4, **kw)
    a, b, c = (_tar_bytes(str(tmp_path / x)) for x in "abc")
    assert a == b
    assert sorted(a) == sorted(c)
    assert a["shard-000000.tar"] != c["shard-000000.tar"]
    assert a["shard-000001.tar"] != c["shard-000001.tar"]


def test_manifest_is_written_and_lists_every_planted_kind(corrupt_sample):
    out, manifest = corrupt_sample
    assert json.load(open(os.path.join(out, MANIFEST))) == manifest
    kinds = {c["kind"] for c in manifest["corrupt"]}
    assert kinds == {
        "truncated_jpeg", "zero_byte_image", "not_an_image", "decompression_bomb", "orphan_txt",
        "parent_traversal_name", "absolute_name", "duplicate_key",
    }
    assert {b["kind"] for b in manifest["bad_shards"]} == {"truncated_tar", "zero_byte_tar"}
    assert os.path.getsize(os.path.join(out, next(b["shard"] for b in manifest["bad_shards"] if b["kind"] == "zero_byte_tar"))) == 0
    assert manifest["near_duplicates"], "a 48-record sample plants at least one near-duplicate pair"


def test_webdataset_iterates_generated_shards_with_images_and_sidecars(corrupt_sample):
    out, manifest = corrupt_sample
    urls = [os.path.join(out, s) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    keys = [s["__key__"] for s in samples]
    for shard in range(3):
        for i in range(16):
            assert f"{shard:04d}{i:05d}" in keys
    # The planted duplicate_key member comes back as a second sample with key 000000000.
    assert keys.count("000000000") == 2
    normal = [s for s in samples if s["__key__"].isdigit() and int(s["__key__"][4:]) < 16]
    normal = [s for s in normal if "txt" in s]
    assert len(normal) == 48
    for s in normal:
        image_ext = [e for e in ("jpg", "jpeg", "png", "webp") if e in s]
        assert len(image_ext) == 1 and "txt" in s and "json" in s
        meta = json.loads(s["json"])
        with Image.open(io.BytesIO(s[image_ext[0]])) as im:
            assert im.size == (meta["width"], meta["height"])
            assert 45 <= im.width <= 545 and 45 <= im.height <= 545


def test_sample_mixes_formats_and_modes(tmp_path):
    manifest = generate_sample(str(tmp_path), shards=2, per_shard=20, seed=0)
    formats = {k.split("/")[0] for k in manifest["formats"]}
    modes = {k.split("/")[1] for k in manifest["formats"]}
    assert {"jpg", "png", "webp"} <= formats
    assert {"RGB", "L", "RGBA", "P", "LA", "CMYK"} <= modes


def _thumb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.float32)


def test_near_duplicates_look_alike_and_other_pictures_do_not(corrupt_sample):
    out, manifest = corrupt_sample
    images = {}
    for s in wds.WebDataset([os.path.join(out, x) for x in manifest["shards"]], shardshuffle=False, empty_check=False):
        for ext in ("jpg", "jpeg", "png", "webp"):
            if ext in s and s["__key__"].isdigit() and int(s["__key__"][4:]) < 16:
                images[s["__key__"]] = _thumb(s[ext])
    pair_diffs = [np.abs(images[a] - images[b]).mean() for a, b in (p["keys"] for p in manifest["near_duplicates"])]
    keys = sorted(images)
    other_diffs = [np.abs(images[a] - images[b]).mean() for a, b in zip(keys, keys[1:])]
    assert max(pair_diffs) < 12
    assert np.median(other_diffs) > 3 * max(pair_diffs)


def test_corrupt_members_are_really_corrupt(corrupt_sample):
    out, manifest = corrupt_sample
    by_kind = {c["kind"]: c for c in manifest["corrupt"]}
    members = {}
    for s in wds.WebDataset([os.path.join(out, manifest["shards"][0])], shardshuffle=False, empty_check=False):
        for ext in ("jpg", "png"):
            if ext in s:
                members[f"{s['__key__']}.{ext}"] = s[ext]
    assert members[by_kind["zero_byte_image"]["member"]] == b""
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(members[by_kind["decompression_bomb"]["member"]]))
    bomb = members[by_kind["decompression_bomb"]["member"]]
    assert len(bomb) < 200_000 and bomb[16:24] == (30000).to_bytes(4, "big") * 2
    with pytest.raises(Exception):
        Image.open(io.BytesIO(members[by_kind["not_an_image"]["member"]])).load()
    with pytest.raises(OSError):
        Image.open(io.BytesIO(members[by_kind["truncated_jpeg"]["member"]])).load()


def test_cli_writes_shards_and_manifest(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--shards", "1", "--per-shard", "3", "--seed", "5"]) == 0
    assert sorted(os.listdir(tmp_path)) == [MANIFEST, "shard-000000.tar"]
    assert json.loads(capsys.readouterr().out)["expected"]["records"] == 3
