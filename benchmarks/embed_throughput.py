"""Embed throughput: the embed stage through the row-group runner vs the raw open_clip model.

    python benchmarks/embed_throughput.py [--model ViT-B-32] [--pretrained random] [--images 192]
        [--batch-size 64] [--buffer-size 64] [--device auto] [--decode-backend auto] [--repeats 3]
    GPU session: python benchmarks/embed_throughput.py --model ViT-L-14-quickgelu --device cuda

In one process and on the same images it times, each ``--repeats`` times, interleaved (median
reported):
  pipeline   run_stage_partition (backend ray) over every partition: the fused embed worker
             (ranged shard reads ahead, decode overlapping the model, Parquet commits on a
             writer thread), Ray scheduling. The model is loaded once per Ray
             worker process and cached there (a warm-up pass pays it), as in a real run;
  raw        the fair baseline: the same image bytes in memory, decoded by the same decoder
             (backend, threads) and run through the same model in a plain loop: same batch
             size, same torch threads, same precision (bf16 autocast on CUDA);
  model      the model alone on already decoded uint8 images (normalise, encode, L2-normalise,
             float16 to host): the compute floor, reported separately.
Prints a Markdown row for BENCHMARKS.md with pipeline/raw (target >= 0.85 on CPU) and the
model-only images/s (per GPU on CUDA). Use a model where the model dominates (ViT-B-32 on CPU).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from winnow.data.index import IndexConfig, build_index  # noqa: E402
from winnow.execution import Execution  # noqa: E402
from winnow.stages.decode import PillowPreprocessor, decode_image  # noqa: E402
from winnow.stages.embed import EmbedConfig, EmbedStage  # noqa: E402

HEADER = (
    "| model | device | decode | torch threads | images | batch | pipeline img/s | raw decode+model img/s "
    "| pipeline/raw | model-only img/s |\n|---|---|---|---|---|---|---|---|---|---|"
)


def photo(seed: int, width: int, height: int) -> bytes:
    """A 640x480-style JPEG with gradients and noise (compresses and decodes like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 / width, y * 255 / height, ((x // 9 + y // 7) % 2) * (seed % 200 + 40.0)], -1)
    arr += rng.normal(0, 10, arr.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_shards(folder: str, images: list[bytes], per_shard: int = 1000) -> None:
    os.makedirs(folder, exist_ok=True)
    for s in range(0, len(images), per_shard):
        with tarfile.open(os.path.join(folder, f"bench-{s // per_shard:05d}.tar"), "w") as tar:
            for i in range(s, min(s + per_shard, len(images))):
                info = tarfile.TarInfo(f"{i:08d}.jpg")
                info.size = len(images[i])
                tar.addfile(info, io.BytesIO(images[i]))




def time_pipeline(stage: EmbedStage, run_root: str, plan, execution: Execution) -> float:
    from winnow.ray.runner import run_stage_partition

    shutil.rmtree(os.path.join(run_root, stage.name), ignore_errors=True)
    t0 = time.perf_counter()
    records = 0
    for p in range(plan.num_partitions):
        summary = run_stage_partition(
            stage, run_root=run_root, plan=plan, partition=p, execution=execution, log=lambda _line: None,
        )
        if summary.failed:
            raise RuntimeError(f"partition {p} failed row groups: {summary.failed}")
        records += summary.records_in
    seconds = time.perf_counter() - t0
    if records != plan.num_records:
        raise RuntimeError(f"pipeline embedded {records} records, expected {plan.num_records}")
    return seconds


def _timed_forward(stage: EmbedStage, pixel_batches) -> float:
    """Seconds to run the model over uint8 pixel batches exactly as ``embed_images`` does.

    ``pixel_batches`` is lazy, so whatever produces a batch (decoding) is inside the clock.
    """
    from _common import sync

    device = stage.device
    sync(device)
    t0 = time.perf_counter()
    outs = []
    with torch.inference_mode():
        for pixels in pixel_batches:
            # The stage's own forward: normalise, tower (bf16 autocast on CUDA), L2, float16.
            outs.append(stage.forward(pixels))
        for o in outs:
            o.cpu()
    sync(device)
    return time.perf_counter() - t0


def time_raw(stage: EmbedStage, images: list[bytes], batch_size: int) -> float:
    """Decode with the stage's decoder and run the model, in a plain loop: the fair baseline."""
    decoder = stage._decoder
    assert decoder is not None
    batches = (decoder.decode(images[s : s + batch_size]).pixels for s in range(0, len(images), batch_size))
    return _timed_forward(stage, batches)


def time_model(stage: EmbedStage, decoded: torch.Tensor, batch_size: int) -> float:
    """The image tower alone on decoded uint8 images, as embed_images calls it."""
    return _timed_forward(stage, (decoded[s : s + batch_size] for s in range(0, len(decoded), batch_size)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pretrained", default="random", help="weights file, tag (with --model-dir) or 'random'")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--image-size", default="640x480", help="WxH of the generated JPEGs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--buffer-size", type=int, default=64, help="records per row group")
    ap.add_argument("--max-partitions", type=int, default=1, help="1: one task's worth of row groups")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--decode-backend", default="auto")
    ap.add_argument("--backend", default="ray", choices=("ray", "local"))
    ap.add_argument("--ray-address", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where shards and the run root go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the measurements to this file")
    from _common import add_smoke, apply_smoke

    add_smoke(ap)
    args = ap.parse_args(argv)
    apply_smoke(args, model="winnow-tiny-vit", pretrained="random", images=6, image_size="64x48", batch_size=3,
                buffer_size=3, device="cpu", decode_backend="pillow", backend="local", repeats=1)
    if args.repeats < 3 and not args.smoke:
        ap.error("--repeats must be at least 3 (the median of fewer runs is noise)")
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    from _common import describe, machine

    start_machine = machine()  # the load at the start (the machine may be shared)

    config = EmbedConfig(
        model=args.model, pretrained=args.pretrained, model_dir=args.model_dir,
        allow_random_weights=args.pretrained.startswith("random"), batch_size=args.batch_size,
        decode_backend=args.decode_backend, device=args.device,
    )
    stage = EmbedStage(config)
    workdir = args.workdir or tempfile.mkdtemp(prefix="winnow-embed-bench-")
    images = [photo(i, width, height) for i in range(args.images)]
    write_shards(os.path.join(workdir, "shards"), images)
    run_root = os.path.join(workdir, "run")
    plan = build_index(run_root, IndexConfig(
            input_uri=os.path.join(workdir, "shards"), buffer_size=args.buffer_size, max_partitions=args.max_partitions
        )).plan

    # Same threads as the pipeline's model worker: on CPU it gets every core (OMP_NUM_THREADS).
    if stage.device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    stage.setup()  # for the in-process baselines; the pipeline's Ray worker loads its own copy
    pre = PillowPreprocessor(stage._loaded.preprocess)
    decoded = torch.from_numpy(np.stack([pre.to_uint8(decode_image(b)[0]) for b in images]))
    if stage.device.type == "cuda":
        decoded = decoded.pin_memory()
    execution = Execution(backend=args.backend, ray_address=args.ray_address)
    if execution.backend == "ray":
        from winnow.ray.cluster import connect

        connect(execution.ray_address)  # Ray start is a per-process cost, not a per-stage one

    # Warm-up: first CUDA kernels, Ray worker processes, page cache.
    time_model(stage, decoded[: args.batch_size], args.batch_size)
    time_raw(stage, images[: args.batch_size], args.batch_size)
    time_pipeline(stage, run_root, plan, execution)

    runs: dict[str, list[float]] = {"pipeline": [], "raw": [], "model": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits all three alike
        runs["model"].append(len(images) / time_model(stage, decoded, args.batch_size))
        runs["raw"].append(len(images) / time_raw(stage, images, args.batch_size))
        runs["pipeline"].append(len(images) / time_pipeline(stage, run_root, plan, execution))
    med = {k: statistics.median(v) for k, v in runs.items()}

    device = str(stage.device)
    if stage.device.type == "cuda":
        device = torch.cuda.get_device_name(stage.device)
    else:
        device = f"cpu ({os.cpu_count()} cores, {platform.machine()})"
    row = (
        f"| {args.model} ({'random' if stage.spec.is_random else 'weights'}) | {device} | {stage.decode_backend} "
        f"| {torch.get_num_threads()} | {len(images)} x {width}x{height} JPEG | {args.batch_size} "
        f"| {med['pipeline']:.1f} | {med['raw']:.1f} | {med['pipeline'] / med['raw']:.2f} | {med['model']:.1f} |"
    )
    print(f"machine at start: {describe(start_machine)}")
    print(f"runs (img/s): {json.dumps({k: [round(x, 1) for x in v] for k, v in runs.items()})}")
    per_round = [round(p / r, 2) for p, r in zip(runs["pipeline"], runs["raw"])]
    print(f"pipeline/raw per round: {per_round}; images/s are per GPU when --device cuda (one model worker per GPU)")
    print(f"backend={args.backend}, row groups={plan.num_row_groups}, partitions={plan.num_partitions}")
    print(HEADER)
    print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine_start": start_machine, "runs": runs, "median": med,
                       "device": device, "row": row}, f, indent=2)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
