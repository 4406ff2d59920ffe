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
        "parent_traversal_name", "absolute_name", "duplicate_key", "exact_duplicate",
    }
    # Two exact duplicates: one inside shard 0, one in shard 1 of shard 0's bytes.
    exact = [c for c in manifest["corrupt"] if c["kind"] == "exact_duplicate"]
    assert [c["shard"] for c in exact] == [manifest["shards"][0], manifest["shards"][1]]
    assert manifest["expected"]["exact_duplicates"] == 2
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
    normal = [s for s in normal if "json" in s]  # the planted duplicate_key member has no sidecar
    assert len(normal) == 48
    for s in normal:
        image_ext = [e for e in ("jpg", "jpeg", "png", "webp") if e in s]
        assert len(image_ext) == 1 and "json" in s
        meta = json.loads(s["json"])
        with Image.open(io.BytesIO(s[image_ext[0]])) as im:
            assert im.size == (meta["width"], meta["height"])
            assert 45 <= im.width <= 545 and 45 <= im.height <= 545


def _caption_of(sample: dict) -> tuple[str | None, str]:
    """(caption, source) as the clip_score stage reads it: the .txt, else the json "caption"."""
    txt = sample.get("txt", b"").decode().strip()
    if txt:
        return txt, "txt"
    if "txt" in sample:
        return None, "blank_txt"
    caption = json.loads(sample["json"]).get("caption")
    return (caption, "json") if caption else (None, "none")


def test_captions_come_from_txt_or_json_or_nowhere_and_the_manifest_counts_them(corrupt_sample):
    out, manifest = corrupt_sample
    samples = [
        s for s in wds.WebDataset([os.path.join(out, x) for x in manifest["shards"]], shardshuffle=False, empty_check=False)
        if s["__key__"].isdigit() and int(s["__key__"][4:]) < 16 and "json" in s
    ]
    sources = [_caption_of(s)[1] for s in samples]
    planted = sum(1 for c in manifest["corrupt"] if c["kind"] not in ("orphan_txt", "duplicate_key"))
    counts = manifest["captions"]
    assert {k: sources.count(k) for k in ("json", "blank_txt", "none")} == {k: counts[k] for k in ("json", "blank_txt", "none")}
    assert sources.count("txt") + planted == counts["txt"]
    assert min(counts.values()) >= 1, counts  # 48 records show every source and both kinds
    assert counts["match"] + counts["mismatch"] == counts["txt"] + counts["json"]
    expected = manifest["expected"]
    assert expected["captions"] == counts["txt"] + counts["json"]
    assert expected["captions"] + expected["no_caption"] == expected["records"]
    # Some records carry a caption in both places: the .txt one is what counts.
    both = [s for s in samples if s.get("txt", b"").strip() and "caption" in json.loads(s["json"])]
    assert both and all(json.loads(s["json"])["caption"] != s["txt"].decode() for s in both)


def test_matching_captions_name_a_colour_and_shape_drawn(tmp_path):
    from winnow.data.sample import _COLOUR_NAMES, _SHAPE_WORDS, _WORDS

    manifest = generate_sample(str(tmp_path), shards=1, per_shard=40, seed=1)
    shapes, colours = set(_SHAPE_WORDS.values()), set(_COLOUR_NAMES)
    described = random_words = 0
    for s in wds.WebDataset([os.path.join(str(tmp_path), manifest["shards"][0])], shardshuffle=False, empty_check=False):
        caption, _ = _caption_of(s)
        if caption is None:
            continue
        words = set(caption.replace(",", "").split())
        if words <= set(_WORDS):
            random_words += 1
        else:
            assert words & shapes and words & colours, caption
            described += 1
    assert described == manifest["captions"]["match"] and random_words == manifest["captions"]["mismatch"]
    assert described >= 5 and random_words >= 5


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
