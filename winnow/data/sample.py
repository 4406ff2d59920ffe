"""Sample WebDataset shards for demos and tests: real JPEG/PNG/WebP images with captions and
metadata, planted near-duplicates and, on request, corrupt members and bad shards.

Captions (see :data:`CAPTION_SOURCES`): most records have a ``.txt``, some only a ``caption``
field in their ``.json``, some a blank ``.txt`` or none at all. Half the captions name the colour
and kind of the largest shapes drawn (they match the picture), half are random words.

Keys are 9 digits ``SSSSIIIII``: the shard number (4 digits) then the member position in that
shard (5 digits), e.g. ``000200017``; unique across shards, like img2dataset's keys. Output is
byte-identical for one seed (fixed tar mtimes, owners and member order).

    python -m winnow.data.sample --out DIR --shards 4 --per-shard 100 --seed 0 [--corrupt] [--bad-shards]
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import random
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from winnow.schemas import IMAGE_EXTENSIONS

MANIFEST = "_sample_manifest.json"
_MTIME = 1_700_000_000  # fixed so that tars are byte-identical per seed
_WORDS = ["red", "blue", "green", "amber", "violet", "teal", "small", "large", "bright", "dark", "soft", "sharp", "striped", "dotted", "round", "square", "wave", "circle", "line", "field", "sky", "river", "stone", "glass", "cloud", "shadow", "pattern", "noise", "light", "grain"]
# (container format, PIL mode) of normal records, cycled by a seeded choice.
_KINDS = (
    ("jpg", "RGB"), ("jpg", "RGB"), ("jpg", "L"), ("jpg", "CMYK"), ("jpeg", "RGB"),
    ("png", "RGB"), ("png", "RGBA"), ("png", "P"), ("png", "LA"), ("png", "L"),
    ("webp", "RGB"), ("webp", "RGBA"),
)
# The source of a planted near-duplicate stays in colour: a grey or palette original and its
# RGB re-encode are different pictures, not near-duplicates.
_COLOUR_KINDS = tuple(k for k in _KINDS if k[1] == "RGB")


#: Curation params that suit this sample data with the tiny random-weight model
#: (``winnow-tiny-vit``): each filter drops some records and dedup finds the planted copies
#: (the random model puts distinct images at cosine ~0.97-0.9995, the planted copies above).
#: Used by the demo and the benchmarks; meaningless for real data.
TINY_MODEL_PARAMS = {
    "model": "winnow-tiny-vit",
    "pretrained": "random",
    "allow_random_weights": True,
    "aesthetic_threshold": 7.4,
    "nsfw_threshold": 0.45,
    "dedup_eps": 0.0002,
}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def make_key(shard: int, position: int) -> str:
    return f"{shard:04d}{position:05d}"


# ---- pictures ------------------------------------------------------------------------------


def _picture(seed: int) -> Image.Image:
    """A visually distinct RGB picture: a gradient, shapes, a stripe field and noise, mixed
    in seeded proportions so that different seeds look different even to a random CLIP."""
    return _draw(seed)[0]


def _draw(seed: int) -> tuple[Image.Image, dict[str, Any]]:
    """:func:`_picture` and what it drew: ``shapes`` as (kind, RGB colour, area in pixels),
    ``stripes`` and ``blurred``, for captions that describe the picture."""
    drawn: dict[str, Any] = {"shapes": [], "stripes": False, "blurred": False}
    rng = np.random.default_rng(seed)
    r = random.Random(seed)
    w, h = r.randint(48, 512), r.randint(48, 512)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)  # float32 throughout: 2x faster than float64
    angle = r.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1.0) / 2.0
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    if r.random() < 0.6:  # a sinusoidal stripe field of random frequency and direction
        fx, fy = rng.uniform(-0.3, 0.3, 2)
        stripes = np.sin(xx * fx + yy * fy + r.uniform(0, 6.3))
        img += stripes[..., None] * rng.uniform(-80, 80, 3).astype(np.float32)[None, None, :]
        drawn["stripes"] = True
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(r.uniform(0, 40))  # noise
    pic = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pic)
    for _ in range(r.randint(1, 8)):
        box = sorted((r.randint(0, w), r.randint(0, w))), sorted((r.randint(0, h), r.randint(0, h)))
        xy = [box[0][0], box[1][0], box[0][1], box[1][1]]
        colour = tuple(r.randint(0, 255) for _ in range(3))
        shape = r.choice(("ellipse", "rectangle", "polygon", "line"))
        if shape == "ellipse":
            draw.ellipse(xy, fill=colour)
            area = (xy[2] - xy[0]) * (xy[3] - xy[1]) * np.pi / 4
        elif shape == "rectangle":
            draw.rectangle(xy, fill=colour)
            area = (xy[2] - xy[0]) * (xy[3] - xy[1])
        elif shape == "polygon":
            points = [(r.randint(0, w), r.randint(0, h)) for _ in range(r.randint(3, 6))]
            draw.polygon(points, fill=colour)
            area = abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]))) / 2
        else:
            width = r.randint(1, 12)
            draw.line(xy, fill=colour, width=width)
            area = width * float(np.hypot(xy[2] - xy[0], xy[3] - xy[1]))
        drawn["shapes"].append((shape, colour, float(area)))
    if r.random() < 0.3:
        pic = pic.filter(ImageFilter.GaussianBlur(r.uniform(0.5, 3)))
        drawn["blurred"] = True
    return pic, drawn


def _encode(pic: Image.Image, fmt: str, mode: str, quality: int) -> bytes:
    out = io.BytesIO()
    if mode == "P":
        img = pic.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    elif mode == "LA":
        img = Image.merge("LA", (pic.convert("L"), pic.convert("L").point(lambda v: 255 - v // 2)))
    elif mode == "RGBA":
        alpha = pic.convert("L").point(lambda v: 128 + v // 2)
        img = pic.copy()
        img.putalpha(alpha)
    else:
        img = pic.convert(mode)
    if fmt in ("jpg", "jpeg"):
        img.save(out, "JPEG", quality=quality)
    elif fmt == "png":
        img.save(out, "PNG", compress_level=1)
    else:
        img.save(out, "WEBP", quality=quality, method=0)
    return out.getvalue()


@functools.lru_cache(maxsize=4)
def decompression_bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 1-bit greyscale PNG that declares ``width x height`` pixels in ~100 KB: decoders
    that skip the pixel-count check would allocate about ``width*height`` bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte + packed zero bits
    comp = zlib.compressobj(9)
    rows = [comp.compress(row * 1000) for _ in range(height // 1000)]
    rows.append(comp.compress(row * (height % 1000)))
    rows.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(rows)) + chunk(b"IEND", b"")


# ---- shards --------------------------------------------------------------------------------


@dataclass
class _Shard:
    members: list[tuple[str, bytes]] = field(default_factory=list)

    def add(self, name: str, data: bytes) -> None:
        self.members.append((name, data))

    def tar_bytes(self) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in self.members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
        return out.getvalue()


def _caption(r: random.Random) -> str:
    """A caption of random words: it does not describe the picture (a mismatch)."""
    return " ".join(r.choice(_WORDS) for _ in range(r.randint(3, 9)))


#: Colour names and a typical RGB of each, for captions that name what a picture shows.
_COLOUR_NAMES = {
    "red": (210, 40, 40), "orange": (240, 140, 30), "yellow": (235, 220, 50), "green": (50, 170, 60),
    "teal": (30, 150, 150), "blue": (40, 70, 210), "purple": (130, 50, 180), "pink": (240, 140, 190),
    "brown": (130, 80, 40), "black": (20, 20, 20), "grey": (128, 128, 128), "white": (240, 240, 240),
}
_SHAPE_WORDS = {"ellipse": "oval", "rectangle": "rectangle", "polygon": "polygon", "line": "line"}


def colour_name(rgb: tuple[int, int, int]) -> str:
    """The nearest name in :data:`_COLOUR_NAMES` (RGB distance)."""
    return min(_COLOUR_NAMES, key=lambda n: sum((a - b) ** 2 for a, b in zip(rgb, _COLOUR_NAMES[n])))


def _matching_caption(r: random.Random, drawn: dict[str, Any]) -> str:
    """A caption naming the colour and kind of the largest shapes drawn (a match)."""
    shapes = sorted(drawn["shapes"], key=lambda s: -s[2])[: r.randint(1, 2)]
    text = " and ".join(f"a {colour_name(colour)} {_SHAPE_WORDS[kind]}" for kind, colour, _ in shapes)
    if drawn["stripes"]:
        text += " on a striped background"
    if drawn["blurred"]:
        text += ", blurred"
    return r.choice(("", "a picture of ", "an image with ")) + text


#: Where a sample record's caption is, by share of records: a ``.txt`` sidecar, only the
#: ``.json`` field ``caption``, a ``.txt`` of whitespace only (no caption), or nowhere.
CAPTION_SOURCES = (("txt", 0.70), ("json", 0.15), ("blank_txt", 0.05), ("none", 0.10))


def _caption_members(r: random.Random, key: str, drawn: dict[str, Any], meta: dict[str, Any]) -> tuple[list[tuple[str, bytes]], str, str | None]:
    """(sidecar members, caption source, ``match``/``mismatch`` or None) of one record; half the
    captions describe the picture, half are random words. Some ``.txt`` captions come with a
    different ``caption`` in the ``.json`` too (the ``.txt`` one counts)."""
    u, source = r.random(), CAPTION_SOURCES[-1][0]
    for name, share in CAPTION_SOURCES:
        if u < share:
            source = name
            break
        u -= share
    kind: str | None = None
    meta = dict(meta)
    members: list[tuple[str, bytes]] = []
    if source in ("txt", "json"):
        kind = "match" if r.random() < 0.5 else "mismatch"
        caption = _matching_caption(r, drawn) if kind == "match" else _caption(r)
        if source == "txt":
            members.append((f"{key}.txt", caption.encode()))
            if r.random() < 0.2:
                meta["caption"] = _caption(r)
        else:
            meta["caption"] = caption
    elif source == "blank_txt":
        members.append((f"{key}.txt", r.choice((b"   ", b"  \n", b"\t \r\n"))))
    members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
    return members, source, kind


def _write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _plant_corrupt(
    target: _Shard, *, seed: int, per_shard: int, expected: dict[str, int], listed: list[dict[str, str]]
) -> None:
    """Append the corrupt members (one of each kind) to shard 0, after its normal records, and an
    exact duplicate (byte-identical image, new key) of its first record."""
    position = per_shard
    name, data = target.members[0]
    first = (name.rsplit(".", 1)[1], data)
    good = _encode(_picture(hash_seed(seed, -1)), "jpg", "RGB", 90)

    def plant(kind: str, name: str, data: bytes, key: str, *, record: bool = True, caption: bool = True) -> None:
        target.add(name, data)
        if caption:
            target.add(f"{key}.txt", f"planted {kind}".encode())
        listed.append({"kind": kind, "shard": shard_name(0), "key": key, "member": name})
        if record:
            expected["records"] += 1

    def next_key() -> str:
        nonlocal position
        position += 1
        return make_key(0, position - 1)

    k = next_key()
    plant("truncated_jpeg", f"{k}.jpg", good[: len(good) // 2], k)
    k = next_key()
    plant("zero_byte_image", f"{k}.jpg", b"", k)
    k = next_key()
    plant("not_an_image", f"{k}.jpg", b"this is plain text, not a JPEG\n" * 4, k)
    k = next_key()
    plant("decompression_bomb", f"{k}.png", decompression_bomb_png(), k)
    k = next_key()
    plant("orphan_txt", f"{k}.txt", b"a caption with no image", k, record=False, caption=False)
    expected["members_without_image"] += 1
    k = f"../../escape/{next_key()}"
    plant("parent_traversal_name", f"{k}.jpg", good, k)
    k = f"/absolute/{next_key()}"
    plant("absolute_name", f"{k}.jpg", _encode(_picture(hash_seed(seed, -2)), "jpg", "RGB", 90), k)
    # The bytes of the shard's first image again, under a new key: an exact duplicate.
    k = next_key()
    plant("exact_duplicate", f"{k}.{first[0]}", first[1], k)
    expected["exact_duplicates"] += 1
    # A key repeated later in the same shard: the index keeps the first one.
    dup = make_key(0, 0)
    plant("duplicate_key", f"{dup}.jpg", good, dup, record=False, caption=False)
    expected["duplicate_keys"] += 1


def generate_sample(
    out_dir: str,
    *,
    shards: int,
    per_shard: int,
    seed: int,
    corrupt: bool = False,
    bad_shards: bool = False,
) -> dict[str, Any]:
    """Write ``shards`` WebDataset shards of ``per_shard`` image records each into ``out_dir``
    and return the manifest (also written to ``<out_dir>/_sample_manifest.json``).

    The manifest lists shards, near-duplicate key pairs, corrupt members by kind, bad shards,
    record counts by caption source and match (``captions``) and ``expected`` index counts (with
    bad shards skipped; ``captions`` / ``no_caption``: indexed records with / without a caption).
    """
    if shards < 1 or per_shard < 1:
        raise ValueError(f"shards and per_shard must be >= 1, got shards={shards}, per_shard={per_shard}")
    if shards > 9999 or per_shard > 99000:
        raise ValueError("at most 9999 shards of 99000 records (keys are SSSSIIIII)")
    os.makedirs(out_dir, exist_ok=True)
    r = random.Random(seed)
    total = shards * per_shard
    # Near-duplicates: record `dup` shows the picture of record `src`, re-encoded or resized.
    n_dups = min(total // 2, max(1, total // 40)) if total >= 2 else 0
    picked = r.sample(range(total), 2 * n_dups)
    dup_of = {picked[2 * i + 1]: picked[2 * i] for i in range(n_dups)}
    dup_sources = set(dup_of.values())
    formats: dict[str, int] = {}
    near_duplicates: list[dict[str, Any]] = []
    corrupt_members: list[dict[str, str]] = []
    expected = {"records": total, "members_without_image": 0, "duplicate_keys": 0, "exact_duplicates": 0}
    # Records by caption source (txt, json, blank_txt, none) and, when captioned, match/mismatch.
    captions = {name: 0 for name, _ in CAPTION_SOURCES} | {"match": 0, "mismatch": 0}
    names = [shard_name(s) for s in range(shards)]
    first_shard, first_members = b"", [0, 0]
    first_shard_image = ("", b"")  # (extension, bytes) of shard 0's second image
    # One shard in memory at a time: a 10k-image sample stays small.
    for s in range(shards):
        shard = _Shard()
        for g in range(s * per_shard, (s + 1) * per_shard):
            key = make_key(s, g - s * per_shard)
            rr = random.Random(f"{seed}/{g}")
            if g in dup_of:
                src = dup_of[g]
                pic, drawn = _draw(hash_seed(seed, src))
                if rr.random() < 0.5:
                    f = rr.choice((0.94, 0.96, 1.04, 1.06))
                    size = (max(8, round(pic.width * f)), max(8, round(pic.height * f)))
                    pic = pic.resize(size, Image.Resampling.BICUBIC)
                    how = f"resized x{f}"
                else:
                    how = "re-encoded"
                fmt, mode, quality = "jpg", "RGB", rr.choice((60, 70, 80))
                near_duplicates.append({"keys": [make_key(*divmod(src, per_shard)), key], "how": how})
            else:
                pic, drawn = _draw(hash_seed(seed, g))
                fmt, mode = rr.choice(_COLOUR_KINDS if g in dup_sources else _KINDS)
                quality = rr.choice((85, 90, 95))
            data = _encode(pic, fmt, mode, quality)
            formats[f"{fmt}/{mode}"] = formats.get(f"{fmt}/{mode}", 0) + 1
            meta = {"key": key, "width": pic.width, "height": pic.height, "format": fmt, "mode": mode}
            shard.add(f"{key}.{fmt}", data)
            sidecars, source, kind = _caption_members(rr, key, drawn, meta)
            for name, sidecar in sidecars:
                shard.add(name, sidecar)
            captions[source] += 1
            if kind is not None:
                captions[kind] += 1
        if s == 1 and corrupt:
            # Across shards: the bytes of shard 0's second image under a key of this shard.
            key = make_key(s, per_shard)
            shard.add(f"{key}.{first_shard_image[0]}", first_shard_image[1])
            shard.add(f"{key}.txt", b"planted exact_duplicate")
            corrupt_members.append({"kind": "exact_duplicate", "shard": names[s], "key": key,
                                    "member": f"{key}.{first_shard_image[0]}"})
            expected["records"] += 1
            expected["exact_duplicates"] += 1
            captions["txt"] += 1
            captions["mismatch"] += 1
        if s == 0 and corrupt:
            image_members = [(n, d) for n, d in shard.members if n.rsplit(".", 1)[1] in IMAGE_EXTENSIONS]
            first_shard_image = (image_members[1][0].rsplit(".", 1)[1], image_members[1][1])
            before = expected["records"]
            _plant_corrupt(shard, seed=seed, per_shard=per_shard, expected=expected, listed=corrupt_members)
            # Every planted record has a .txt of random words ("planted <kind>").
            captions["txt"] += expected["records"] - before
            captions["mismatch"] += expected["records"] - before
        tar = shard.tar_bytes()
        if s == 0:
            first_shard = tar
            first_members = [len(data) for _, data in shard.members[:2]]
        _write(os.path.join(out_dir, names[s]), tar)
    bad: list[dict[str, str]] = []
    if bad_shards:
        truncated = shard_name(shards)
        # Cut inside the second member's data so that a header promises bytes that are gone.
        cut = 512 + (-(-first_members[0] // 512) * 512) + 512 + max(1, first_members[1] // 2)
        _write(os.path.join(out_dir, truncated), first_shard[: min(cut, len(first_shard) - 1)])
        bad.append({"kind": "truncated_tar", "shard": truncated})
        zero = shard_name(shards + 1)
        _write(os.path.join(out_dir, zero), b"")
        bad.append({"kind": "zero_byte_tar", "shard": zero})
    expected.update(
        {
            "shards": len(names) + len(bad),
            "zero_byte_shards": 1 if bad_shards else 0,
            "bad_shards": 1 if bad_shards else 0,
            # Indexed records with a caption (.txt, else the .json "caption") and without one.
            "captions": captions["txt"] + captions["json"],
            "no_caption": captions["blank_txt"] + captions["none"],
        }
    )
    manifest = {
        "seed": seed,
        "shards": names,
        "per_shard": per_shard,
        "key_format": "SSSSIIIII: 4-digit shard number, 5-digit position in the shard",
        "near_duplicates": near_duplicates,
        "corrupt": corrupt_members,
        "bad_shards": bad,
        "formats": dict(sorted(formats.items())),
        "captions": captions,
        "expected": expected,
    }
    _write(os.path.join(out_dir, MANIFEST), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def hash_seed(seed: int, index: int) -> int:
    """A stable per-record seed (Python's ``hash`` is salted per process, so not that)."""
    return zlib.crc32(f"{seed}:{index}".encode()) | (seed & 0xFFFF) << 32


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m winnow.data.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write shard-NNNNNN.tar into")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--per-shard", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corrupt", action="store_true", help="plant corrupt members (see the manifest)")
    parser.add_argument("--bad-shards", action="store_true", help="add a truncated tar and a zero-byte tar")
    args = parser.parse_args(argv)
    manifest = generate_sample(
        args.out, shards=args.shards, per_shard=args.per_shard, seed=args.seed,
        corrupt=args.corrupt, bad_shards=args.bad_shards,
    )
    print(json.dumps({"out": args.out, "shards": len(manifest["shards"]), "expected": manifest["expected"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
