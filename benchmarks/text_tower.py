"""Text tower vs image tower: records/s of the clip_score stage's text side against the embed
stage's image side, for the same open_clip model on the same device.

    python benchmarks/text_tower.py [--model ViT-B-32] [--pretrained random] [--records 256]
        [--batch-size 64] [--device cpu] [--repeats 3] [--threads N] [--json FILE]

Measured in one process, each ``--repeats`` times, interleaved (median reported), as records/s:
  image_model  the embed stage's ``forward`` on already decoded uint8 images (normalise, image
               tower, L2-normalise, float16 to host): the embed stage's compute floor;
  text         the clip_score stage's ``encode_texts`` on caption strings (BPE tokenisation,
               text tower, L2-normalise, float32 to host): its whole per-caption cost;
  text_model   the text tower alone on already tokenised captions.
Both towers run with the same batch size, torch threads and precision. Prints one JSON object
(``text_over_image``: how many captions are scored in the time of one image embedding).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from winnow.stages.clip_score import ClipScoreConfig, ClipScoreStage  # noqa: E402
from winnow.stages.embed import EmbedConfig, EmbedStage  # noqa: E402

WORDS = (
    "a", "photo", "of", "the", "red", "blue", "green", "small", "large", "dog", "cat", "house", "tree", "river",
    "mountain", "city", "street", "at", "night", "in", "winter", "with", "two", "people", "on", "beach", "sunset",
    "close", "up", "painting", "old", "wooden",
)


def captions(n: int, seed: int = 0) -> list[str]:
    """Captions of 4-20 words, like alt texts."""
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(4, 20))) for _ in range(n)]






def time_text(stage: ClipScoreStage, texts: list[str]) -> float:
    t0 = time.perf_counter()
    stage.encode_texts(texts)  # tokenises, encodes in batch_size chunks, copies to host
    return time.perf_counter() - t0


def time_text_model(stage: ClipScoreStage, tokens: torch.Tensor, batch_size: int) -> float:
    from _common import sync

    loaded = stage.loaded
    device = stage.device
    tokens = tokens.to(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        outs = [loaded.model.encode_text(tokens[s : s + batch_size]) for s in range(0, len(tokens), batch_size)]
        for o in outs:
            o.cpu()
    sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    from _common import time_image_tower

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pretrained", default="random", help="weights file, tag (with --model-dir) or 'random'")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--records", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the measurements to this file")
    from _common import add_smoke, apply_smoke

    add_smoke(ap)
    args = ap.parse_args(argv)
    apply_smoke(args, model="winnow-tiny-vit", pretrained="random", records=8, batch_size=4, device="cpu",
                threads=1, repeats=1)
    if args.repeats < 3 and not args.smoke:
        ap.error("--repeats must be at least 3 (the median of fewer runs is noise)")
    from _common import describe, machine

    start_machine = machine()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    common = dict(model=args.model, pretrained=args.pretrained, model_dir=args.model_dir,
                  allow_random_weights=args.pretrained.startswith("random"), batch_size=args.batch_size,
                  device=args.device, precision=args.precision)
    image_stage = EmbedStage(EmbedConfig(**common, decode_backend="pillow"))
    text_stage = ClipScoreStage(ClipScoreConfig(**common))
    image_stage.setup()
    text_stage.setup()
    height, width = image_stage.spec.preprocess.height_width
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (args.records, height, width, 3), dtype=np.uint8))
    texts = captions(args.records)
    tokens = text_stage.loaded.tokenize(texts)

    # Warm-up: first kernels, allocator, tokenizer cache.
    time_image_tower(image_stage, pixels[: args.batch_size], args.batch_size)
    time_text(text_stage, texts[: args.batch_size])
    time_text_model(text_stage, tokens[: args.batch_size], args.batch_size)

    runs: dict[str, list[float]] = {"image_model": [], "text": [], "text_model": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits all alike
        runs["image_model"].append(args.records / time_image_tower(image_stage, pixels, args.batch_size))
        runs["text"].append(args.records / time_text(text_stage, texts))
        runs["text_model"].append(args.records / time_text_model(text_stage, tokens, args.batch_size))
    med = {k: statistics.median(v) for k, v in runs.items()}
    device = (torch.cuda.get_device_name(text_stage.device) if text_stage.device.type == "cuda"
              else f"cpu ({os.cpu_count()} cores, {platform.machine()})")
    result = {
        "model": args.model,
        "weights": "random" if text_stage.spec.is_random else "file",
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "records": args.records,
        "batch_size": args.batch_size,
        "context_length": text_stage.tokenizer.context_length,
        "image_size": [height, width],
        "records_per_s": {k: round(v, 1) for k, v in med.items()},
        "text_over_image": round(med["text"] / med["image_model"], 2),
        "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "machine_start": describe(start_machine),
        "smoke": bool(args.smoke),
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
