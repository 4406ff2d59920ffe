"""Filters decided from the index, before any decode (winnow.filters: ``before_decode``).

A run with ``min_image_side=64, max_aspect_ratio=3`` drops exactly the records whose image header
breaks either, as ``image_size``, never reads nor decodes them, counts them in the summary and
says why in their status rows; every other record goes on as in a run with the filter off.
The expected set is computed here from the shards themselves (tarfile + Pillow), not by the
engine's code.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tests._tiny import tiny_config
from winnow.data.sample import generate_sample
from winnow.pipeline import load_plan, run_all
from winnow.rowgroups import CommitStore
from winnow.stages.status import iter_status

pytestmark = pytest.mark.timeout(600)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefilter")
    generate_sample(str(root / "input"), shards=2, per_shard=30, seed=7, corrupt=True)
    return root


def _headers(input_dir: Path) -> dict[str, tuple[int, int] | None]:
    """Each record key's (width, height), read by Pillow from the shard's own bytes (the first
    image of a key: the index keeps the first record of a repeated key)."""
    out: dict[str, tuple[int, int] | None] = {}
    for shard in sorted(input_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.isfile() and m.name.lower().endswith(IMAGE_EXTS) and m.name.rsplit(".", 1)[0] not in out:
                    data = tar.extractfile(m).read()
                    try:
                        with Image.open(io.BytesIO(data)) as img:
                            out[m.name.rsplit(".", 1)[0]] = img.size
                    except Exception:  # noqa: BLE001 - a corrupt member: size unknown
                        out[m.name.rsplit(".", 1)[0]] = None
    return out


def _run(root: Path, run_key: str, **params):
    cfg = tiny_config(input_uri=str(root / "input"), output_root=str(root / "out"), run_key=run_key, buffer_size=16,
                      max_partitions=2, batch_size=16, **params)
    summary = run_all(cfg, backend="local")
    rows = {r["key"]: r for t in iter_status(cfg.run_root) for r in t.to_pylist() if r["record_id"] is not None}
    store, plan = CommitStore(cfg.run_root), load_plan(cfg)
    embed = {}
    for p in range(plan.num_partitions):
        for rg in plan.partition_row_groups(p):
            embed.update({r["record_id"]: r for r in store.read_table("embed", p, rg).to_pylist()})
    return summary, rows, embed


def test_image_size_drops_exactly_the_records_whose_header_breaks_it_and_never_decodes_them(sample):
    headers = _headers(sample / "input")
    summary, rows, embed = _run(sample, "size", min_image_side=64, max_aspect_ratio=3)

    def breaks(wh):
        return wh is not None and (min(wh) < 64 or max(wh) / min(wh) > 3)

    expected = {k for k, wh in headers.items() if breaks(wh) and rows[k]["outcome"] != "exact_duplicate"}
    dropped = {k for k, r in rows.items() if r["outcome"] == "image_size"}
    assert expected and dropped == expected
    assert summary["image_size_dropped"] == len(expected)
    assert sum(summary[c] for c in ("exact_duplicates", "image_size_dropped", "undecodable", "aesthetic_dropped",
                                    "nsfw_dropped", "no_caption", "clip_score_dropped", "duplicates", "kept")) == \
        summary["records"]
    for k in dropped:
        r, (w, h) = rows[k], headers[k]
        assert (r["width"], r["height"]) == (w, h)
        side = f"shorter side {min(w, h)} < min_image_side 64" if min(w, h) < 64 else \
            f"aspect ratio {max(w, h) / min(w, h):.3g} > max_aspect_ratio 3"
        assert r["reason"] == f"{w}x{h} px: {side}", r["reason"]
        # Never read nor decoded: no embedding and no decode error.
        assert embed[r["record_id"]]["embedding"] is None and embed[r["record_id"]]["error"] is None
    # Every record the filter keeps carries its header size; unreadable headers are not dropped for size.
    for k, r in rows.items():
        if headers.get(k) is not None and r["outcome"] != "image_size":
            assert (r["width"], r["height"]) == headers[k]
    assert any(wh is None for wh in headers.values())  # the corrupt sample has unreadable images...
    assert all(rows[k]["outcome"] != "image_size" for k, wh in headers.items() if wh is None)  # ...kept for decode

    # With the filter off the same records are decoded (an embedding, or a decode error: a
    # truncated image's header can be whole) and judged by the other filters.
    off, off_rows, off_embed = _run(sample, "size-off")
    assert off["image_size_dropped"] == 0
    tried = [off_embed[off_rows[k]["record_id"]] for k in expected]
    assert all(e["embedding"] is not None or e["error"] is not None for e in tried)
    assert sum(e["embedding"] is not None for e in tried) > len(tried) // 2


def _captions(input_dir: Path) -> dict[str, str | None]:
    """Each record key's caption, read here from its sidecars: the .txt, else the .json's
    "caption" field (the first record of a repeated key)."""
    import json

    sidecars: dict[str, dict[str, bytes]] = {}
    for shard in sorted(input_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.isfile() and m.name.endswith((".txt", ".json")):
                    key, ext = m.name.rsplit(".", 1)
                    sidecars.setdefault(key, {}).setdefault(ext, tar.extractfile(m).read())
    out: dict[str, str | None] = {}
    for key, sc in sidecars.items():
        text = sc.get("txt", b"").decode("utf-8", "replace").strip() or None
        if text is None and "json" in sc:
            try:
                value = json.loads(sc["json"]).get("caption")
            except ValueError:
                value = None
            text = value.strip() or None if isinstance(value, str) else None
        out[key] = text
    return out


def test_caption_length_drops_exactly_the_records_with_fewer_words_and_never_decodes_them(sample):
    captions = _captions(sample / "input")
    summary, rows, embed = _run(sample, "words", min_caption_words=3)
    expected = {k for k, r in rows.items() if r["outcome"] != "exact_duplicate"
                and len((captions.get(k) or "").split()) < 3}
    dropped = {k for k, r in rows.items() if r["outcome"] == "caption_length"}
    assert expected and dropped == expected and len(expected) < len(rows)
    assert summary["caption_length_dropped"] == len(expected)
    assert any(captions.get(k) is None for k in expected)  # no caption at all: 0 words
    for k in dropped:
        r, words = rows[k], len((captions.get(k) or "").split())
        assert r["caption_words"] == (None if captions.get(k) is None else words)
        assert r["reason"] == f"caption of {words} words < min_caption_words 3", r["reason"]
        assert embed[r["record_id"]]["embedding"] is None and embed[r["record_id"]]["error"] is None
    for r in rows.values():
        if r["outcome"] not in ("caption_length", "exact_duplicate"):
            assert r["caption_words"] >= 3
