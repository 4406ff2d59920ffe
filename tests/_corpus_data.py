"""Test data for the corpus: one input folder per logical date, whose later dates hold copies of
earlier dates' records.

``make_dates(root)`` writes ``root/<date>/shard-*.tar`` for each date:

- every date holds a fresh :func:`winnow.data.sample.generate_sample` sample (date *i* uses seed
  ``seed + 1000 * i``: its planted near duplicates, its caption sources, blank and missing
  captions) with the keys made unique across dates (``<YYYYMMDD>_<sample key>``) and a ``url``
  field in every ``.json`` sidecar (``https://img.example.com/<date>/<key>.<ext>``);
- every date also holds two planted records that :data:`RUN_PARAMS` drops before any decode:
  ``<YYYYMMDD>_tiny`` (a 40x28 px JPEG with a 4-word caption: outcome ``image_size``) and
  ``<YYYYMMDD>_short`` (a normal picture with a one-word caption: outcome ``caption_length``);
- every date after the first has one more shard, ``shard-<shards:06d>.tar``, of copies of each
  earlier date's records, new keys (``<YYYYMMDD>_c<of YYYYMMDD>_<n>``) and new urls, ``.txt`` and
  ``.json`` siblings copied (json re-keyed): per earlier date a byte-identical copy and two
  re-encoded copies (decoded with PIL, saved as JPEG at quality 70 and 85: the tiny model puts
  them within 0.00018 cosine distance of their original, inside ``dedup_eps`` 0.0002; a resize, even
  by 2 %, is not reliably inside it) of records a run keeps, and a byte-identical and a re-encoded copy of each planted
  record that it drops.

Which records a run keeps is predicted, not computed: a copied "kept" original is a record of the
fresh sample that is in no planted near-duplicate pair, has an RGB picture and a ``.txt`` caption
of at least 3 words; with :data:`RUN_PARAMS` on top of ``tests._tiny.tiny_config`` (where only
dedup drops records otherwise) it is kept. The tests of the corpus check that prediction.

Everything is deterministic: the same arguments give the same bytes.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image

from winnow.data.sample import _picture, generate_sample, hash_seed, shard_name
from winnow.data.tarscan import image_uid, split_key
from winnow.schemas import IMAGE_EXTENSIONS

#: Run params (on top of ``tests._tiny.tiny_config``) under which the planted records are dropped
#: before decode: the tiny image for its size, the one-word caption for its length. The sample's
#: own pictures are at least 48 px on their shorter side, so ``min_image_side`` drops none of them;
#: ``min_caption_words`` also drops the sample's records with a blank or missing caption.
RUN_PARAMS: dict[str, Any] = {"min_image_side": 48, "min_caption_words": 2}
DATES = ("2025-03-01", "2025-03-02", "2025-03-03")
URL_FIELD = "url"
_MTIME = 1_700_000_000


def _compact(date: str) -> str:
    return date.replace("-", "")


def url_of(date: str, key: str, ext: str) -> str:
    return f"https://img.example.com/{date}/{key}.{ext}"


def _read_tar(path: Path) -> list[tuple[str, bytes]]:
    out = []
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            if info.isfile():
                out.append((info.name, tar.extractfile(info).read()))
    return out


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return sink.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _group(members: list[tuple[str, bytes]]) -> dict[str, dict[str, Any]]:
    """key -> {"ext", "image", "txt", "json"} in member order (the first image of a key wins)."""
    records: dict[str, dict[str, Any]] = {}
    for name, data in members:
        key, ext = split_key(name)
        rec = records.setdefault(key, {"ext": None, "image": None, "txt": None, "json": None})
        if ext in IMAGE_EXTENSIONS and rec["image"] is None:
            rec["ext"], rec["image"] = ext, data
        elif ext in ("txt", "json") and rec[ext] is None:
            rec[ext] = data
    return {k: r for k, r in records.items() if r["image"] is not None}


def _members(key: str, rec: dict[str, Any]) -> list[tuple[str, bytes]]:
    out = [(f"{key}.{rec['ext']}", rec["image"])]
    if rec["txt"] is not None:
        out.append((f"{key}.txt", rec["txt"]))
    if rec["json"] is not None:
        out.append((f"{key}.json", rec["json"]))
    return out


def _with_meta(json_bytes: bytes | None, **fields: Any) -> bytes:
    meta = json.loads(json_bytes) if json_bytes else {}
    meta.update(fields)
    return json.dumps(meta, sort_keys=True).encode()


def _jpeg(img: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    img.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def _reencoded(data: bytes, quality: int, scale: float = 1.0) -> tuple[bytes, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if scale != 1.0:
            img = img.resize((max(8, round(img.width * scale)), max(8, round(img.height * scale))),
                             Image.Resampling.BICUBIC)
        return _jpeg(img, quality), img.size


def _words(rec: dict[str, Any]) -> int:
    if rec["txt"] is None:
        return 0
    return len(rec["txt"].decode("utf-8", errors="replace").split())


def _is_rgb(rec: dict[str, Any]) -> bool:
    meta = json.loads(rec["json"]) if rec["json"] else {}
    return meta.get("mode") == "RGB"


def _date_records(root: Path, date: str, i: int, *, seed: int, per_shard: int, shards: int) -> dict[str, Any]:
    """Write the fresh sample of one date (re-keyed, urls added, planted records appended)."""
    compact = _compact(date)
    date_seed = seed + 1000 * i
    gen_dir = root / f".gen-{date}"
    sample = generate_sample(str(gen_dir), shards=shards, per_shard=per_shard, seed=date_seed)
    near = {k for pair in sample["near_duplicates"] for k in pair["keys"]}
    out_dir = root / date
    records: dict[str, dict[str, Any]] = {}
    candidates: list[str] = []
    for s, name in enumerate(sample["shards"]):
        members: list[tuple[str, bytes]] = []
        for old_key, rec in _group(_read_tar(gen_dir / name)).items():
            key = f"{compact}_{old_key}"
            url = url_of(date, key, rec["ext"])
            rec = {**rec, "json": _with_meta(rec["json"], key=key, url=url)}
            members.extend(_members(key, rec))
            records[key] = {**rec, "url": url, "uid": image_uid(rec["image"]), "shard": shard_name(s)}
            if old_key not in near and _is_rgb(rec) and _words(rec) >= 3:
                candidates.append(key)
                records[key]["expect"] = "kept"
        if s == shards - 1:
            for key, rec in _planted(date, compact, date_seed).items():
                members.extend(_members(key, rec))
                records[key] = {**rec, "uid": image_uid(rec["image"]), "shard": shard_name(s)}
        _write(out_dir / name, _tar_bytes(members))
    shutil.rmtree(gen_dir)
    return {"records": records, "candidates": candidates, "near_duplicates": sample["near_duplicates"]}


def _planted(date: str, compact: str, date_seed: int) -> dict[str, dict[str, Any]]:
    """The two records :data:`RUN_PARAMS` drop: a tiny image and a one-word caption."""
    out = {}
    tiny_key, short_key = f"{compact}_tiny", f"{compact}_short"
    tiny = _picture(hash_seed(date_seed, 90_001)).resize((40, 28), Image.Resampling.BICUBIC)
    url = url_of(date, tiny_key, "jpg")
    out[tiny_key] = {"ext": "jpg", "image": _jpeg(tiny, 90), "txt": b"a tiny planted picture",
                     "json": _with_meta(None, key=tiny_key, url=url, width=40, height=28), "url": url,
                     "expect": "image_size"}
    pic = _picture(hash_seed(date_seed, 90_002))
    url = url_of(date, short_key, "jpg")
    out[short_key] = {"ext": "jpg", "image": _jpeg(pic, 90), "txt": b"sky",
                      "json": _with_meta(None, key=short_key, url=url, width=pic.width, height=pic.height),
                      "url": url, "expect": "caption_length"}
    return out


def make_dates(root: Path, *, dates: tuple[str, ...] = DATES, seed: int = 7, per_shard: int = 12,
               shards: int = 2) -> dict[str, Any]:
    """Write one input folder per date under ``root`` (see the module docstring) and return the
    manifest (also written to ``root/_corpus_manifest.json``)::

        {"run_params": RUN_PARAMS, "url_field": "url",
         "dates": {date: {"input_uri", "seed", "records": {key: {"uid", "url", "shard", "expect"?}},
                          "planted": {"tiny": key, "short_caption": key},
                          "near_duplicates": [...], "copies": [copy...]}}}

    (a record's ``expect``: the outcome a run with :data:`RUN_PARAMS` gives it, where the data
    predicts it: ``kept`` for the fresh records copies are drawn from, ``image_size`` /
    ``caption_length`` for the planted ones; absent for the rest), where each copy is
    ``{"key", "uid", "url", "of_date", "of_key", "of_uid", "how": "bytes" | "reencoded",
    "of_outcome": "kept" | "image_size" | "caption_length"}`` (``of_outcome``: what a run with
    :data:`RUN_PARAMS` does with the original).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    made: dict[str, dict[str, Any]] = {}
    manifest: dict[str, Any] = {"run_params": dict(RUN_PARAMS), "url_field": URL_FIELD, "dates": {}}
    for i, date in enumerate(dates):
        made[date] = _date_records(root, date, i, seed=seed, per_shard=per_shard, shards=shards)
        compact = _compact(date)
        copies: list[dict[str, Any]] = []
        members: list[tuple[str, bytes]] = []
        for earlier in dates[:i]:
            src = made[earlier]
            r = random.Random(f"{seed}/{date}/{earlier}")
            kept = r.sample(src["candidates"], 3)
            picks = [(kept[0], "bytes", 0, 1.0), (kept[1], "reencoded", 70, 1.0), (kept[2], "reencoded", 85, 1.0)]
            ec = _compact(earlier)
            for planted in (f"{ec}_tiny", f"{ec}_short"):
                picks += [(planted, "bytes", 0, 1.0), (planted, "reencoded", 75, 1.0)]
            for n, (of_key, how, quality, scale) in enumerate(picks):
                orig = src["records"][of_key]
                key = f"{compact}_c{ec}_{n:02d}"
                if how == "bytes":
                    image, ext = orig["image"], orig["ext"]
                    extra: dict[str, Any] = {}
                else:
                    image, (w, h) = _reencoded(orig["image"], quality, scale)
                    ext, extra = "jpg", {"width": w, "height": h, "format": "jpg", "mode": "RGB"}
                url = url_of(date, key, ext)
                rec = {"ext": ext, "image": image, "txt": orig["txt"],
                       "json": _with_meta(orig["json"], key=key, url=url, **extra)}
                members.extend(_members(key, rec))
                copies.append({"key": key, "uid": image_uid(image), "url": url, "of_date": earlier, "of_key": of_key,
                               "of_uid": orig["uid"], "how": how, "of_outcome": orig.get("expect", "kept")})
        if members:
            _write(root / date / shard_name(shards), _tar_bytes(members))
        manifest["dates"][date] = {
            "input_uri": str(root / date),
            "seed": seed + 1000 * i,
            "records": {k: {"uid": v["uid"], "url": v["url"], "shard": v["shard"],
                            **({"expect": v["expect"]} if "expect" in v else {})}
                        for k, v in made[date]["records"].items()},
            "planted": {"tiny": f"{compact}_tiny", "short_caption": f"{compact}_short"},
            "near_duplicates": made[date]["near_duplicates"],
            "copies": copies,
        }
    _write(root / "_corpus_manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest
