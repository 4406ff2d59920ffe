"""Watermark throughput: images/s of the LAION watermark detector next to the embed stage's image
tower, on the same decoded images and the same device.

    python benchmarks/watermark_throughput.py [--model ViT-B-32] [--weights FILE] [--images 64]
        [--batch-size 32] [--devices auto] [--threads N] [--repeats 3] [--json FILE]
    GPU session: python benchmarks/watermark_throughput.py --model ViT-L-14-quickgelu \\
        --images 4096 --batch-size 256 --devices cuda

Measured per device (``auto``: the CPU, then CUDA where there is one), each ``--repeats`` times,
interleaved (median reported), as images/s:
  watermark_preprocess  ``watermark_pixels`` on decoded RGB PIL images (resize to 256 x 256,
                        normalise; on the CPU, ``--threads`` threads): the detector's own input
                        preparation, not shared with the embed stage's;
  watermark_model       ``score_watermark`` on ready pixels already on the device (bf16 autocast
                        on CUDA, softmax, P(watermark) to host): the detector's compute;
  embed_model           the embed stage's ``forward`` on decoded uint8 images already resized
                        for its model, on the device (normalise, image tower, L2, float16 to
                        host): the embed stage's compute floor.
Both models run at the same batch size and torch threads. ``watermark_over_embed`` is
watermark_model / embed_model: above 1, the watermark filter costs less than the embedding it
runs beside. Weights are random unless given (the compute does not depend on them).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from winnow.stages.decode import PillowPreprocessor, decode_image  # noqa: E402
from winnow.stages.embed import EmbedConfig, EmbedStage  # noqa: E402
from winnow.stages.watermark import load_watermark_model, score_watermark, watermark_pixels  # noqa: E402

HEADER = (
    "| device | torch threads | images | batch | watermark preprocess img/s | watermark model img/s "
    "| embed model img/s | watermark/embed |\n|---|---|---|---|---|---|---|---|"
)
#: Distinct generated images; more are repeats of these (model throughput does not depend on
#: content, and generating thousands of JPEGs would dominate a GPU run).
DISTINCT = 64


def photo(seed: int, width: int, height: int) -> bytes:
    """A photo-like JPEG (gradients, stripes, noise; q90)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 / width, y * 255 / height, ((x // 9 + y // 7) % 2) * (seed % 200 + 40.0)], -1)
    out = io.BytesIO()
    Image.fromarray(np.clip(arr + rng.normal(0, 10, arr.shape), 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()




def time_preprocess(images: list[Image.Image], threads: int) -> float:
    t0 = time.perf_counter()
    watermark_pixels(images, num_threads=threads)
    return time.perf_counter() - t0


def time_watermark(model: torch.nn.Module, pixels: torch.Tensor, batch_size: int, device: torch.device) -> float:
    from _common import sync

    sync(device)
    t0 = time.perf_counter()
    score_watermark(model, pixels, batch_size=batch_size)  # ends with the copy to host
    sync(device)
    return time.perf_counter() - t0




def measure(args, device: torch.device, decoded: list[Image.Image]) -> dict:
    """Every figure for one device."""
    from _common import time_image_tower

    threads = torch.get_num_threads()
    n, batch = len(decoded), args.batch_size
    model, digest = load_watermark_model(args.weights, allow_random_weights=args.weights is None, device=device)
    stage = EmbedStage(EmbedConfig(
        model=args.model, pretrained=args.pretrained, model_dir=args.model_dir,
        allow_random_weights=args.pretrained.startswith("random"), batch_size=batch, device=str(device),
        decode_backend="pillow",
    ))
    stage.setup()
    pre = PillowPreprocessor(stage._loaded.preprocess)
    resized: dict[int, np.ndarray] = {}  # the images repeat: resize each distinct one once
    for img in decoded:
        if id(img) not in resized:
            resized[id(img)] = pre.to_uint8(img)
    embed_pixels = torch.from_numpy(np.stack([resized[id(img)] for img in decoded])).to(device)
    wm_pixels = watermark_pixels(decoded, num_threads=threads).to(device)

    # Warm-up: first kernels, allocator, cuDNN algorithm choice.
    time_watermark(model, wm_pixels[:batch], batch, device)
    time_image_tower(stage, embed_pixels[:batch], batch)
    time_preprocess(decoded[:batch], threads)

    runs: dict[str, list[float]] = {"watermark_preprocess": [], "watermark_model": [], "embed_model": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits all three alike
        runs["watermark_preprocess"].append(n / time_preprocess(decoded, threads))
        runs["watermark_model"].append(n / time_watermark(model, wm_pixels, batch, device))
        runs["embed_model"].append(n / time_image_tower(stage, embed_pixels, batch))
    med = {k: statistics.median(v) for k, v in runs.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, {platform.machine()})"
    result = {
        "device": name,
        "torch_threads": threads,
        "images": n,
        "batch_size": batch,
        "embed_model": f"{args.model} ({'random' if stage.spec.is_random else 'weights'})",
        "watermark_weights": digest,
        "img_s": {k: round(v, 1) for k, v in med.items()},
        "watermark_over_embed": round(med["watermark_model"] / med["embed_model"], 3),
        "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "row": (f"| {name} | {threads} | {n} x {args.image_size} JPEG | {batch} | {med['watermark_preprocess']:.1f} "
                f"| {med['watermark_model']:.1f} | {med['embed_model']:.1f} ({args.model}) "
                f"| {med['watermark_model'] / med['embed_model']:.3f} |"),
    }
    del model, stage, embed_pixels, wm_pixels
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-B-32", help="the embed stage's model, timed beside the detector")
    ap.add_argument("--pretrained", default="random", help="its weights file, tag (with --model-dir) or 'random'")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--weights", default=None, help="the watermark detector's weights file (default: random)")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--image-size", default="640x480", help="WxH of the generated JPEGs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--devices", default="auto", help="'auto' (cpu, and cuda where there is one), 'cpu', 'cuda' or 'cpu,cuda'")
    ap.add_argument("--threads", type=int, default=None, help="torch and resize threads (default: every core)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the measurements to this file")
    from _common import add_smoke, apply_smoke

    add_smoke(ap)
    args = ap.parse_args(argv)
    apply_smoke(args, model="winnow-tiny-vit", pretrained="random", images=4, image_size="64x48", batch_size=2,
                devices="cpu", threads=1, repeats=1)
    if args.repeats < 3 and not args.smoke:
        ap.error("--repeats must be at least 3 (the median of fewer runs is noise)")
    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    from _common import describe, machine

    start_machine = machine()  # the load at the start (the machine may be shared)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    distinct = []
    for i in range(min(args.images, DISTINCT)):
        img, error = decode_image(photo(i, width, height))
        assert img is not None, error
        distinct.append(img)
    decoded = [distinct[i % len(distinct)] for i in range(args.images)]

    results = [measure(args, torch.device(d), decoded) for d in devices]
    print(f"machine at start: {describe(start_machine)}")
    print(f"machine at end:   {describe(machine())}")
    for r in results:
        print(f"runs on {r['device']} (img/s): {json.dumps(r['runs'])}")
    print(HEADER)
    for r in results:
        print(r["row"])
    report = {"args": vars(args), "machine_start": start_machine, "results": results, "smoke": bool(args.smoke)}
    print(json.dumps({"watermark_throughput": [{k: r[k] for k in ("device", "img_s", "watermark_over_embed")} for r in results]}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
