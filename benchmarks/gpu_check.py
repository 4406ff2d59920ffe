"""GPU check: the embed stage's images/s per GPU against the model-only ceiling, in one process.

    python benchmarks/gpu_check.py             # on a GPU box (benchmarks/gpu_check.sh sets it up)
    python benchmarks/gpu_check.py --dry-run   # same code path on CPU: tiny model, 200 images

On the same generated 512x384 JPEG shards it measures, in this order:
  model_only   the image tower alone on decoded uint8 images already on the device (normalise,
               bf16 autocast, L2 norm, float16): batch 256 and 512, eager and torch.compile'd,
               timed with CUDA events: the ceiling;
  gpu_decode   the nvImageCodec decoder alone (decode + GPU resize/crop), batch 256;
  pipeline     the embed stage through the runner (local backend, fused worker): shard reads,
               decode, model, Parquet commits, with nvImageCodec. Ratio = pipeline / model-only
               at the same batch size and compile mode (compiled where that was faster);
  dedup        k-means + pairwise duplicate search on synthetic 768-d embeddings (1M on a GPU);
  text_tower   the clip_score stage's text tower against the image tower (text_tower.py);
  watermark    the LAION watermark detector against the image tower, model-only and its
               256 px preprocessing (watermark_throughput.py);
  cpu decode   the pipeline again with Pillow decoding on all CPU cores, for comparison.
One copy of the model weights serves every variant. Prints one JSON line (``GPU_CHECK {...}``)
and writes ``$OUT/gpu_check.json`` when ``OUT`` is set, after every step (a run cut short keeps
what it measured; ``complete`` says whether it finished).
Imports neither Ray nor DALI (the GPU check machine has neither); the JSON says so.
A variant that fails is recorded with its error; the others still run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from winnow.data.index import IndexConfig, build_index  # noqa: E402
from winnow.execution import LOCAL  # noqa: E402
from winnow.ray.runner import run_stage_partition  # noqa: E402
from winnow.stages.decode import NvImageCodecBatchDecoder, PillowBatchDecoder  # noqa: E402
from winnow.stages.embed import EmbedConfig, EmbedStage  # noqa: E402

FULL = dict(model="ViT-L-14-quickgelu", images=20_480, batch_sizes=(256, 512), buffer_size=1024, dedup_n=1_000_000)
DRY = dict(model="winnow-tiny-vit", images=200, batch_sizes=(32, 64), buffer_size=48, dedup_n=5_000)
WIDTH, HEIGHT = 512, 384


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- data --------------------------------------------------------------------------------------


def make_jpegs(n: int, *, seed: int = 0) -> list[bytes]:
    """n distinct photo-like 512x384 JPEGs (q90): windows of a few noisy gradient canvases,
    encoded on all cores (Pillow releases the GIL while encoding)."""
    rng = np.random.default_rng(seed)
    canvases = []
    for c in range(8):
        y, x = np.mgrid[0 : HEIGHT * 2, 0 : WIDTH * 2]
        arr = np.stack([x * 255 / (WIDTH * 2), y * 255 / (HEIGHT * 2), ((x // (7 + c) + y // 5) % 2) * 180.0], -1)
        canvases.append(np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8))
    offsets = rng.integers(0, [HEIGHT, WIDTH], size=(n, 2))

    def one(i: int) -> bytes:
        top, left = offsets[i]
        window = canvases[i % len(canvases)][top : top + HEIGHT, left : left + WIDTH]
        out = io.BytesIO()
        Image.fromarray(window).save(out, "JPEG", quality=90)
        return out.getvalue()

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(one, range(n)))


def write_shards(folder: str, images: list[bytes], per_shard: int = 1000) -> None:
    os.makedirs(folder, exist_ok=True)
    for s in range(0, len(images), per_shard):
        with tarfile.open(os.path.join(folder, f"gpu-check-{s // per_shard:05d}.tar"), "w") as tar:
            for i in range(s, min(s + per_shard, len(images))):
                info = tarfile.TarInfo(f"{i:08d}.jpg")
                info.size = len(images[i])
                tar.addfile(info, io.BytesIO(images[i]))


# ---- timing helpers ----------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(fn, arg, iters: int, device: torch.device) -> float:
    """Seconds per call: CUDA events on a GPU, the wall clock on a CPU."""
    with torch.inference_mode():
        fn(arg)  # warm-up (and the compile, when compiled)
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn(arg)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(arg)
        return (time.perf_counter() - t0) / iters


def embed_config(mode: dict, device: str, batch: int, **kw) -> EmbedConfig:
    return EmbedConfig(
        model=mode["model"], pretrained="random", allow_random_weights=True, batch_size=batch, device=device, **kw
    )


# ---- the measurements --------------------------------------------------------------------------


class Stages:
    """One set-up EmbedStage per (batch, compiled), shared by the model-only and pipeline runs so
    ViT-L is built (and compiled) once per variant, not once per measurement."""

    def __init__(self, mode: dict, device: torch.device) -> None:
        self.mode, self.device, self.stages = mode, device, {}

    def get(self, batch: int, compiled: bool) -> EmbedStage:
        key = (batch, compiled)
        if key not in self.stages:
            # decode 'auto': the pipeline swaps decoders per variant; auto shows what a run would pick.
            stage = EmbedStage(embed_config(self.mode, str(self.device), batch, compile=compiled, decode_backend="auto"))
            shared = next(iter(self.stages.values()), None)  # one copy of the weights for all variants
            stage.setup(model=shared._loaded if shared is not None else None)
            self.auto_decode_backend = stage.decode_backend
            self.stages[key] = stage
        return self.stages[key]

    def keep_only(self, key: tuple[int, bool]) -> None:
        for k in [k for k in self.stages if k != key]:
            del self.stages[k]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def model_only(stages: Stages, pixels: torch.Tensor, compile_modes: list[bool], iters: int, deadline: float) -> dict:
    """img/s of EmbedStage.forward (normalise, tower, L2, fp16) on device-resident uint8 images.
    A variant that would start after ``deadline`` (perf_counter) is skipped."""
    out = {}
    device = stages.device
    for batch in stages.mode["batch_sizes"]:
        for compiled in compile_modes:
            name = f"{'compiled' if compiled else 'eager'}_b{batch}"
            if time.perf_counter() > deadline:
                out[name] = {"img_s": None, "error": "skipped: the model-only time budget is spent"}
                log(f"model-only {name}: skipped (time budget)")
                continue
            try:
                t0 = time.perf_counter()
                stage = stages.get(batch, compiled)
                x = pixels.to(device)
                if x.shape[0] < batch:
                    x = x.repeat((batch + x.shape[0] - 1) // x.shape[0], 1, 1, 1)
                x = x[:batch]
                seconds = timed_calls(lambda t, s=stage: s.forward(t, fixed=True), x, iters, device)
                out[name] = {"img_s": round(batch / seconds, 1), "setup_and_compile_s": round(time.perf_counter() - t0, 1)}
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory at 512: keep the others
                out[name] = {"img_s": None, "error": f"{type(exc).__name__}: {exc}"[:500]}
            log(f"model-only {name}: {out[name]}")
    return out


def gpu_decoder(preprocess, device: torch.device, dry: bool) -> NvImageCodecBatchDecoder:
    """nvImageCodec + GPU resize/crop. Dry run: the same class with torchvision's CPU JPEG decoder
    in nvImageCodec's place (routing, resize/crop and fallback are the same code)."""
    if dry:
        return NvImageCodecBatchDecoder(preprocess, jpeg_decoder=torchvision_jpeg, device="cpu")
    return NvImageCodecBatchDecoder(preprocess, device_id=device.index or 0, num_threads=os.cpu_count() or 1)


def gpu_decode(images: list[bytes], preprocess, device: torch.device, batch: int, dry: bool) -> dict:
    """The GPU decoder alone, batch by batch over every image."""
    dec = gpu_decoder(preprocess, device, dry)
    with torch.inference_mode():
        dec.decode(images[:batch])  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for s in range(0, len(images), batch):
            out = dec.decode(images[s : s + batch])
            assert len(out.index) == len(images[s : s + batch]), "every generated JPEG must decode"
        sync(device)
        seconds = time.perf_counter() - t0
    label = "nvImageCodec + GPU resize/crop" if not dry else "NvImageCodecBatchDecoder, torchvision CPU JPEG decode (dry-run stand-in)"
    return {"img_s": round(len(images) / seconds, 1), "decoder": label, "gpu_failed": dec.gpu_failed}


def torchvision_jpeg(datas: list[bytes]) -> list[torch.Tensor | None]:
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = []
    for d in datas:
        try:
            out.append(decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB).permute(1, 2, 0))
        except RuntimeError:
            out.append(None)
    return out


def pipeline(stage: EmbedStage, decoder, run_root: str, plan, repeats: int) -> dict:
    """The embed stage through the runner (local backend, fused worker) with ``decoder``: best of
    ``repeats`` timed runs after one warm-up run (``repeats=0``: the one run, warm-up included)."""
    device = stage.device
    stage._decoder = decoder  # the stage's model (and compiled graph) is shared across decoders
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for attempt in range(repeats + 1):
        shutil.rmtree(os.path.join(run_root, "embed"), ignore_errors=True)
        before = stage.row_group_pipeline().stats.to_dict()
        t0 = time.perf_counter()
        records = 0
        for p in range(plan.num_partitions):
            summary = run_stage_partition(stage, run_root=run_root, plan=plan, partition=p, execution=LOCAL,
                                          log=lambda _line: None)
            if summary.failed:
                raise RuntimeError(f"partition {p}: failed row groups {summary.failed}")
            records += summary.records_in
        seconds = time.perf_counter() - t0
        after = stage.row_group_pipeline().stats.to_dict()
        delta = {k: round(after[k] - before[k], 3) for k in after if isinstance(after[k], (int, float)) and k != "gpu_busy"}
        if delta.get("wall_seconds") and delta.get("model_gpu_seconds"):
            delta["gpu_busy"] = round(delta["model_gpu_seconds"] / delta["wall_seconds"], 3)
        runs.append({"img_s": round(records / seconds, 1), "seconds": round(seconds, 2), "stats": delta})
        log(f"pipeline ({decoder.backend}) run {attempt}: {runs[-1]['img_s']} img/s {delta}")
    best = max(runs[1:], key=lambda r: r["img_s"]) if len(runs) > 1 else runs[0]
    result = {
        "img_s": best["img_s"], "runs_img_s": [r["img_s"] for r in runs[1:]], "warmup_img_s": runs[0]["img_s"],
        "decoder": decoder.backend, "compiled": stage.config.compile, "batch": stage.config.batch_size,
        "stats": best["stats"], "gpu_busy": best["stats"].get("gpu_busy"),
    }
    if isinstance(decoder, PillowBatchDecoder):
        result["decode_threads"] = decoder._pool._max_workers if decoder._pool else 1
    if device.type == "cuda":
        result["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def dedup_figure(n: int, d: int, device: torch.device, *, planted: int = 1000, seed: int = 0) -> dict:
    """k-means + pairwise duplicate search on n synthetic unit vectors with ``planted`` near copies;
    checks that every planted copy is found."""
    from winnow.stages.dedup import auto_clusters, dedup_clusters, spherical_kmeans

    g = torch.Generator(device="cpu").manual_seed(seed)
    src = torch.randperm(n, generator=g)[: 2 * planted]
    gd = torch.Generator(device=device).manual_seed(seed)  # 1M x 768 drawn where it is used
    x = torch.randn(n, d, generator=gd, device=device)
    x[src[planted:].to(device)] = x[src[:planted].to(device)] + 1e-3 * torch.randn(planted, d, generator=gd, device=device)
    x = torch.nn.functional.normalize(x, dim=1)
    ids = np.arange(n, dtype=np.int64)
    k = auto_clusters(n)
    sync(device)
    t0 = time.perf_counter()
    centroids, assignment = spherical_kmeans(x, k, seed=seed, max_iter=20)
    sync(device)
    t1 = time.perf_counter()
    result = dedup_clusters(x, ids, centroids, assignment, eps=1e-3)
    sync(device)
    t2 = time.perf_counter()
    pairs = {frozenset((int(a), int(b))) for a, b in zip(result.record_id, result.duplicate_of)}
    found = sum(frozenset((int(a), int(b))) in pairs for a, b in zip(src[:planted], src[planted:]))
    return {
        "n": n, "d": d, "clusters": k, "kmeans_iters_max": 20, "kmeans_s": round(t1 - t0, 2),
        "pairwise_s": round(t2 - t1, 2), "planted": planted, "planted_found": found,
        "duplicates": int(len(result.record_id)),
    }


def text_tower_figure(mode: dict, device: torch.device, workdir: str) -> dict:
    """benchmarks/text_tower.py in this process: records/s of the text tower (captions, with
    tokenisation) next to the image tower's (decoded images), same model, batch and device."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import text_tower

    path = os.path.join(workdir, "text_tower.json")
    records = 512 if device.type == "cpu" else 8192
    text_tower.main(["--model", mode["model"], "--pretrained", "random", "--records", str(records),
                     "--batch-size", str(mode["batch_sizes"][0]), "--device", str(device), "--repeats", "3",
                     "--json", path])
    with open(path) as f:
        out = json.load(f)
    return {k: out.get(k) for k in ("records_per_s", "text_over_image", "batch_size", "records", "device")}


def watermark_figure(mode: dict, device: torch.device, workdir: str) -> dict:
    """benchmarks/watermark_throughput.py in this process: images/s of the LAION watermark
    detector (efficientnet-b3, 256 px, bf16 on a GPU) next to the embed stage's image tower, same
    batch and device, on decoded images of the check's size."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import watermark_throughput

    path = os.path.join(workdir, "watermark.json")
    images, batch = (16, 8) if device.type == "cpu" else (4096, mode["batch_sizes"][0])
    watermark_throughput.main(["--model", mode["model"], "--pretrained", "random", "--images", str(images),
                               "--image-size", f"{WIDTH}x{HEIGHT}", "--batch-size", str(batch),
                               "--devices", device.type, "--repeats", "3", "--json", path])
    with open(path) as f:
        (out,) = json.load(f)["results"]
    return {k: out.get(k) for k in ("img_s", "watermark_over_embed", "batch_size", "images", "device")}


def save(report: dict) -> str:
    """The report as one JSON line, also written to $OUT/gpu_check.json when OUT is set: after
    every step, so a run cut short by a time limit still leaves what it measured."""
    line = json.dumps(report, sort_keys=True, default=str)
    if os.environ.get("OUT"):
        os.makedirs(os.environ["OUT"], exist_ok=True)
        tmp = os.path.join(os.environ["OUT"], ".gpu_check.json.tmp")
        with open(tmp, "w") as f:
            f.write(line + "\n")
        os.replace(tmp, os.path.join(os.environ["OUT"], "gpu_check.json"))
    return line


# ---- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 200 images (< 2 min)")
    ap.add_argument("--images", type=int, default=None, help="override the number of images")
    ap.add_argument("--compile", choices=("auto", "yes", "no"), default="auto",
                    help="measure compiled variants (auto: on a GPU only; CPU inductor compiles take minutes)")
    ap.add_argument("--tests-rc", type=int, default=None, help="exit status of the gpu tests (set by gpu_check.sh)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip what would start after this many seconds (default 330; dry run 300, for loaded CI machines)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if args.budget_s is None:
        args.budget_s = 300.0 if args.dry_run else 330.0
    mode = dict(DRY if args.dry_run else FULL)
    if args.images:
        mode["images"] = args.images
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run with --dry-run on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda:0")
    compile_modes = [False, True] if (args.compile == "yes" or (args.compile == "auto" and device.type == "cuda")) else [False]
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    report: dict = {
        "check": "gpu_check", "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()], "model": f"{mode['model']} (random weights)",
        "images": mode["images"], "image_size": f"{WIDTH}x{HEIGHT} JPEG q90", "gpu_tests_rc": args.tests_rc,
        "errors": {}, "complete": False,
    }

    def attempt(name: str, fn):
        if time.perf_counter() - t_start > args.budget_s:
            report["errors"][name] = f"skipped: past the {args.budget_s:.0f} s budget"
            log(report["errors"][name] + f" ({name})")
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - one variant's failure must not lose the others
            report["errors"][name] = f"{type(exc).__name__}: {exc}"[:1500]
            log(f"{name} failed:\n{traceback.format_exc(limit=8)}")
            return None

    workdir = tempfile.mkdtemp(prefix="winnow-gpu-check-")
    try:
        log(f"generating {mode['images']} JPEGs on {os.cpu_count()} cores")
        images = make_jpegs(mode["images"])
        write_shards(os.path.join(workdir, "shards"), images)
        run_root = os.path.join(workdir, "run")
        plan = build_index(run_root, IndexConfig(input_uri=os.path.join(workdir, "shards"),
                                                 buffer_size=mode["buffer_size"], max_partitions=1)).plan
        log(f"{len(images)} images in {plan.num_row_groups} row groups of {mode['buffer_size']}")
        report["row_groups"] = plan.num_row_groups
        report["setup_s"] = round(time.perf_counter() - t_start, 1)

        probe = EmbedStage(embed_config(mode, "cpu", 1, decode_backend="pillow"))
        preprocess = probe.spec.preprocess
        cpu_decoder = PillowBatchDecoder(preprocess, num_threads=os.cpu_count() or 1)
        sample = cpu_decoder.decode(images[: max(mode["batch_sizes"])]).pixels
        stages = Stages(mode, device)
        iters = 5 if args.dry_run else 20
        deadline = t_start + args.budget_s * 0.5  # the pipeline and dedup need the other half
        report["model_only"] = attempt("model_only", lambda: model_only(stages, sample, compile_modes, iters, deadline)) or {}
        save(report)
        report["auto_decode_backend"] = getattr(stages, "auto_decode_backend", None)
        report["gpu_decode"] = attempt("gpu_decode", lambda: gpu_decode(images, preprocess, device, mode["batch_sizes"][0], args.dry_run))

        # The pipeline runs at the first batch size, compiled when that was faster model-only.
        batch = mode["batch_sizes"][0]
        eager = (report["model_only"].get(f"eager_b{batch}") or {}).get("img_s") or 0
        comp = (report["model_only"].get(f"compiled_b{batch}") or {}).get("img_s") or 0
        compiled = comp > eager
        ceiling = max(eager, comp) or None
        stages.keep_only((batch, compiled))
        report["pipeline_batch"], report["pipeline_compiled"] = batch, compiled
        repeats = 0 if args.dry_run else 2
        report["pipeline_gpu_decode"] = attempt("pipeline_gpu_decode", lambda: pipeline(
            stages.get(batch, compiled), gpu_decoder(preprocess, device, args.dry_run), run_root, plan, repeats))
        save(report)
        best = report["pipeline_gpu_decode"] or {}
        report["model_only_ceiling_img_s"] = ceiling
        report["pipeline_img_s"] = best.get("img_s")
        report["pipeline_over_model_only"] = round(best["img_s"] / ceiling, 3) if best.get("img_s") and ceiling else None
        report["gpu_busy"] = best.get("gpu_busy")
        report["peak_gpu_mem_gib"] = (
            round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
        )
        save(report)
        report["dedup"] = attempt("dedup", lambda: dedup_figure(mode["dedup_n"], 768, device))
        save(report)
        # The clip_score stage's text tower against the image tower, same model and device.
        report["text_tower"] = attempt("text_tower", lambda: text_tower_figure(mode, device, workdir))
        save(report)
        # The watermark filter's image model against the embed stage's, same batch and device.
        report["watermark"] = attempt("watermark", lambda: watermark_figure(mode, device, workdir))
        save(report)
        # Last: the least important figure, the first to go when time runs short.
        report["pipeline_cpu_decode"] = attempt("pipeline_cpu_decode", lambda: pipeline(
            stages.get(batch, compiled), cpu_decoder, run_root, plan, 0 if args.dry_run else 1))
        stages.keep_only((-1, False))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["ray_imported"] = any(m == "ray" or m.startswith("ray.") for m in sys.modules)
    report["dali_imported"] = any(m.startswith("nvidia.dali") for m in sys.modules)
    report["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)  # wall time on a loaded box misleads
    report["complete"] = True
    line = save(report)
    print(f"GPU_CHECK {line}", flush=True)
    # Ray: never on the local backend. DALI: only where auto chose it (installed here).
    dali_chosen = str(report.get("auto_decode_backend") or "").startswith("dali")
    ok = not report["errors"] and not report["ray_imported"] and (dali_chosen or not report["dali_imported"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
