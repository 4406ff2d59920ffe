"""The LAION watermark detector (LAION-AI/LAION-5B-WatermarkDetection) as plain compute: the model,
its weight loading, its preprocessing of decoded RGB images, and P(watermark) per image.

Architecture, as the published ``inference.py`` / ``example_use.py`` build it: timm
``efficientnet_b3a`` (timm now names that architecture ``efficientnet_b3``; same layers, same
state-dict keys) with its classifier replaced by Linear(1536, 625) - ReLU - Dropout(0.3) -
Linear(625, 256) - ReLU - Linear(256, 2). Input: the RGB image resized to 256 x 256 (torchvision
``Resize((256, 256))`` on a PIL image: Pillow bilinear, aspect ratio not kept, no crop), scaled to
[0, 1] and normalised with the ImageNet mean/std. Output: softmax over the two logits; column 0 is
P(watermark), column 1 P(clear) (the published inference writes them as "P Watermark", "P Clean").

Weights come from local files only (``.safetensors``, or a ``.pt``/``.pth`` state dict read with
``weights_only=True``), such as the published ``watermark_model_v1.pt``. Seeded random weights are
for tests and demos and are refused unless asked for. Nothing here imports Ray or Airflow.

It is the compute of the ``watermark`` filter (:data:`FILTER`): while the filter is on, the embed
stage loads the detector beside the CLIP tower and feeds it the same decoded images (the decoder's
view under :data:`WATERMARK_PREPROCESS`), writing :data:`SCORE_COLUMN` into its row groups.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from winnow.exceptions import ConfigError, HeadError
from winnow.filters import BY_NAME
from winnow.stages.decode import normalize_batch
from winnow.stages.device import resolve_device
from winnow.stages.models import PreprocessConfig, file_sha256

log = logging.getLogger(__name__)

#: The timm architecture of the published detector (timm's current name for ``efficientnet_b3a``,
#: which timm maps to it with a deprecation warning).
WATERMARK_ARCH = "efficientnet_b3"
#: Width of the backbone's pooled features, the classifier's input.
WATERMARK_FEATURES = 1536
#: Widths of the classifier: 1536 -> 625 -> 256 -> 2.
WATERMARK_HIDDEN = (625, 256)
#: Dropout after the first classifier layer (acts in training only).
WATERMARK_DROPOUT = 0.3
#: Side of the square model input, in pixels.
WATERMARK_INPUT_PX = 256
#: ImageNet normalisation, as the published transform uses.
WATERMARK_MEAN = (0.485, 0.456, 0.406)
WATERMARK_STD = (0.229, 0.224, 0.225)
#: What each softmax column means, in column order.
WATERMARK_CLASSES = ("watermark", "clear")
#: The softmax column that is P(watermark).
WATERMARK_COLUMN = 0
#: Weight files accepted.
WATERMARK_WEIGHT_EXTENSIONS = (".safetensors", ".pt", ".pth")
#: Seed of the random stand-in weights (the aesthetic and nsfw heads use 0 and 1).
RANDOM_SEED = 2
#: The param that names the weights file in a run.
WEIGHTS_PARAM = "watermark_weights"

# Images per forward pass in score_watermark unless the caller says otherwise.
DEFAULT_BATCH_SIZE = 64

#: The filter this module computes the value of (winnow.filters), and the column it reads.
FILTER = BY_NAME["watermark"]
SCORE_COLUMN = FILTER.column_names[0]

#: The published transform as a decoder preprocessing: torchvision ``Resize((256, 256))`` on the
#: PIL image (bilinear, antialiased, aspect ratio not kept, no crop), then ToTensor + Normalize.
#: The embed stage's decoders give the detector this view of each decoded image.
WATERMARK_PREPROCESS = PreprocessConfig(size=WATERMARK_INPUT_PX, mean=WATERMARK_MEAN, std=WATERMARK_STD,
                                        interpolation="bilinear", resize_mode="squash")


# ---- the filter in a run -----------------------------------------------------------------------


_ON = " or ".join((f"{FILTER.threshold.name} > {FILTER.off:g}", *(f"{p.name} set" for p in FILTER.params[1:])))


def watermark_on(values: Mapping[str, Any]) -> bool:
    """Whether the watermark filter is on for these param values (threshold > 0 or a keep fraction)."""
    return FILTER.enabled(values)


def watermark_settings(run: Any) -> tuple[bool, str | None]:
    """``(on, weights)`` of a run's ``CurationConfig``: whether the filter is on and, when it is,
    its weights file (None: random weights, allowed). Checked as the heads' weights are, before the
    model is resolved, each a :class:`ConfigError` naming the param: a ``watermark_weights`` that is
    a URI or no file (on or off: a wrong path is a mistake either way), and, while the filter is
    on, one unset without ``allow_random_weights``. While the filter is off a good file is not read
    (nothing loads it, nothing fingerprints it)."""
    weights = getattr(run, WEIGHTS_PARAM)
    if weights is not None:
        if "://" in weights:
            raise ConfigError(f"{WEIGHTS_PARAM}: {weights!r} is a URI; weights are read from local files only and "
                              "never downloaded: copy the file (e.g. watermark_model_v1.pt) to local disk")
        if not os.path.isfile(weights):
            raise ConfigError(f"{WEIGHTS_PARAM}: no such file {weights!r}")
    if not watermark_on({p.name: getattr(run, p.name) for p in FILTER.params}):
        return False, None
    if weights is None and not run.allow_random_weights:
        raise ConfigError(
            f"{WEIGHTS_PARAM} is not set while the watermark filter is on ({_ON}): give the path of the LAION "
            "watermark detector's weights file (watermark_model_v1.pt), or set allow_random_weights=true for a "
            "test run (scores are then meaningless)")
    return True, weights


def watermark_fingerprint(weights_digest: str) -> dict[str, Any]:
    """What of the detector changes its scores, for the embed stage's fingerprint (only while the
    filter is on)."""
    return {"model": f"laion-watermark-{WATERMARK_ARCH}", "weights_digest": weights_digest,
            "preprocess": WATERMARK_PREPROCESS.to_dict()}


# ---- the model ---------------------------------------------------------------------------------


def build_watermark_model() -> nn.Module:
    """The detector's layout with timm's default (untrained) initialisation, fp32, on the CPU, in
    eval mode. State-dict keys match the published checkpoint: the timm backbone's own keys, then
    ``classifier.{0,3,5}.{weight,bias}``."""
    import timm

    model = timm.create_model(WATERMARK_ARCH, pretrained=False, num_classes=len(WATERMARK_CLASSES))
    hidden1, hidden2 = WATERMARK_HIDDEN
    # Assigned as ``classifier`` (not wrapped) so the keys are the published ones.
    model.classifier = nn.Sequential(
        nn.Linear(WATERMARK_FEATURES, hidden1),
        nn.ReLU(),
        nn.Dropout(WATERMARK_DROPOUT),
        nn.Linear(hidden1, hidden2),
        nn.ReLU(),
        nn.Linear(hidden2, len(WATERMARK_CLASSES)),
    )
    return model.eval()


def _random_model() -> nn.Module:
    # A private RNG state, so the weights depend on the seed only, not on what ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = build_watermark_model()
        # timm's init shrinks activations ~3x per stage, so an untrained model scores every image
        # the same (to 4 decimals) and a test could not tell one image from another. A
        # variance-keeping init (He, fan-in) gives image-dependent scores; the layout is unchanged.
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
    return model.eval()


def _check_source(weights: str) -> None:
    if "://" in weights:
        raise HeadError(
            f"watermark weights {weights!r} (param '{WEIGHTS_PARAM}') is a URI: weights are read "
            "from local files only and never downloaded. Copy the file (e.g. the published "
            "watermark_model_v1.pt) to local disk and give its path."
        )
    if not os.path.isfile(weights):
        raise HeadError(
            f"watermark weights not found: {weights} (param '{WEIGHTS_PARAM}') is not a file. "
            f"Give the path of a local {', '.join(WATERMARK_WEIGHT_EXTENSIONS)} file."
        )


def watermark_weights_digest(weights: str | None, *, allow_random_weights: bool) -> str:
    """What identifies the detector's weights in a stage fingerprint: ``sha256:<hex>`` of the file,
    or ``random-seed<k>``. Raises :class:`HeadError` for a URI, a missing file or unasked-for random
    weights, so a misconfigured run fails before any row group is touched."""
    if weights is None:
        if not allow_random_weights:
            raise HeadError(
                f"no weights given for the watermark detector (param '{WEIGHTS_PARAM}'). Point it "
                "at a local .safetensors/.pt/.pth file of the published LAION watermark model "
                "(watermark_model_v1.pt), or set allow_random_weights=true (param "
                "'allow_random_weights') for a test or demo run (scores are then meaningless)."
            )
        return f"random-seed{RANDOM_SEED}"
    _check_source(weights)
    return file_sha256(weights)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path, device="cpu")
        elif path.endswith((".pt", ".pth")):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise HeadError(
                f"watermark weights {path} (param '{WEIGHTS_PARAM}'): unknown file type; use "
                f"{', '.join(WATERMARK_WEIGHT_EXTENSIONS)}"
            )
    except HeadError:
        raise
    except Exception as exc:  # a corrupt file surfaces as many different exception types
        raise HeadError(f"could not read watermark weights {path} (param '{WEIGHTS_PARAM}'): {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # {"state_dict": {...}}
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HeadError(f"watermark weights {path} hold no tensor state dict (param '{WEIGHTS_PARAM}')")
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    expected = model.state_dict()
    # BatchNorm's step counter does nothing in eval mode; a converted file may leave it out.
    # In the model's own order, so the first missing key says where the layouts part.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        def short(keys: list[str]) -> str:
            return f"{keys[:8]}{f' and {len(keys) - 8} more' if len(keys) > 8 else ''}" if keys else "none"

        shapes = [(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong[:8]]
        raise HeadError(
            f"watermark weights {path} (param '{WEIGHTS_PARAM}') do not fit the detector's layout "
            f"(timm {WATERMARK_ARCH} with a {WATERMARK_FEATURES}-{WATERMARK_HIDDEN[0]}-"
            f"{WATERMARK_HIDDEN[1]}-{len(WATERMARK_CLASSES)} classifier, {len(expected)} tensors): "
            f"missing keys {short(missing)}; unexpected keys {short(unexpected)}; wrong shapes "
            f"(key, file, expected) {shapes or 'none'}{' ...' if len(wrong) > 8 else ''}. Use the published "
            "LAION watermark_model_v1.pt or a state dict of this layout."
        )
    converted = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(converted, strict=False)


def load_watermark_model(
    weights: str | None, *, allow_random_weights: bool, device: str | torch.device = "auto"
) -> tuple[nn.Module, str]:
    """The detector in eval mode, fp32, on ``device``; returns ``(model, weights_digest)``.

    Raises :class:`HeadError` naming the file when it is a URI, missing, unreadable or of another
    layout, and naming the param when random weights were not asked for.
    """
    digest = watermark_weights_digest(weights, allow_random_weights=allow_random_weights)
    if weights is None:
        log.warning(
            "watermark detector: using RANDOM weights (seed %d) because allow_random_weights is set; "
            "its scores mean nothing. Give real weights (param '%s') for a production run.",
            RANDOM_SEED, WEIGHTS_PARAM,
        )
        model = _random_model()
    else:
        state = _read_state_dict(weights)
        model = build_watermark_model()
        _load_into(model, state, weights)
    target = resolve_device(device)
    model = model.to(target).eval().requires_grad_(False)
    if target.type == "cuda":
        # cuDNN's convolutions are fastest on NHWC; the input is made to match in score_watermark.
        model = model.to(memory_format=torch.channels_last)
    return model, digest


# ---- preprocessing -----------------------------------------------------------------------------


ImageLike = Image.Image | np.ndarray | torch.Tensor


def _as_pil(image: ImageLike, i: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"image {i}: a torch tensor must be uint8 (3, H, W) (channels first, as "
                f"torchvision's decoders give), got {image.dtype} {tuple(image.shape)}"
            )
        image = image.detach().permute(1, 2, 0).cpu().numpy()
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {i}: a numpy array must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
    else:
        raise TypeError(f"image {i}: expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    return Image.fromarray(np.ascontiguousarray(image))  # (H, W, 3) uint8 is RGB


def _resized(image: ImageLike, i: int) -> np.ndarray:
    pil = _as_pil(image, i)
    side = WATERMARK_INPUT_PX
    # torchvision's Resize((256, 256)) on a PIL image is exactly this: Pillow bilinear (which
    # filters when shrinking), both sides to 256, aspect ratio not kept.
    if pil.size != (side, side):
        pil = pil.resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(pil, dtype=np.uint8)


def watermark_pixels(images: Sequence[ImageLike], *, num_threads: int = 1) -> torch.Tensor:
    """Decoded RGB images -> the detector's input: ``(N, 3, 256, 256)`` float32 on the CPU.

    ``images`` holds PIL images (other modes are converted to RGB), ``(H, W, 3)`` uint8 numpy
    arrays or ``(3, H, W)`` uint8 torch tensors: the decoded image at its own size, not the CLIP
    model's resized and cropped input. Each is resized as the published transform does and
    normalised with the ImageNet mean/std (ToTensor then Normalize arithmetic). ``num_threads``
    resizes in parallel (Pillow releases the GIL).

    >>> watermark_pixels([np.zeros((10, 20, 3), np.uint8)]).shape
    torch.Size([1, 3, 256, 256])
    """
    side = WATERMARK_INPUT_PX
    if len(images) == 0:
        return torch.empty((0, 3, side, side), dtype=torch.float32)
    if num_threads > 1 and len(images) > 1:
        with ThreadPoolExecutor(max_workers=min(num_threads, len(images))) as pool:
            rows = list(pool.map(_resized, images, range(len(images))))
    else:
        rows = [_resized(image, i) for i, image in enumerate(images)]
    x = torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    mean = torch.tensor(WATERMARK_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(WATERMARK_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


# ---- scoring -----------------------------------------------------------------------------------


def watermark_probabilities(model: nn.Module, pixels: torch.Tensor, *, bf16: bool = False) -> torch.Tensor:
    """P(watermark) of a decoder's view under :data:`WATERMARK_PREPROCESS`: ``(N, 256, 256, 3)``
    uint8 on the model's device -> ``(N,)`` float32 there, without a host sync (the embed stage's
    batches). The arithmetic of :func:`watermark_pixels` then :func:`score_watermark`."""
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (WATERMARK_INPUT_PX, WATERMARK_INPUT_PX, 3):
        raise ValueError(f"pixels must be (N, {WATERMARK_INPUT_PX}, {WATERMARK_INPUT_PX}, 3) uint8, got "
                         f"{tuple(pixels.shape)}")
    x = normalize_batch(pixels, WATERMARK_PREPROCESS)
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
    return torch.softmax(logits.float(), dim=1)[:, WATERMARK_COLUMN]


def score_watermark(
    model: nn.Module, pixels: torch.Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE, bf16: bool | None = None
) -> np.ndarray:
    """P(watermark) per image, float32 in [0, 1], for the ``(N, 3, 256, 256)`` output of
    :func:`watermark_pixels`, in batches of ``batch_size`` on the model's device.

    ``bf16``: bf16 autocast for the model (the softmax is always float32); ``None`` means on CUDA
    only, as the embed stage does.
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (N, 3, H, W) from watermark_pixels, got {tuple(pixels.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = int(pixels.shape[0])
    out = np.empty(n, dtype=np.float32)
    if n == 0:
        return out
    device = next(model.parameters()).device
    use_bf16 = device.type == "cuda" if bf16 is None else bf16
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    results: list[tuple[int, torch.Tensor]] = []
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            x = pixels[start : start + batch_size]
            if device.type == "cuda" and x.device.type == "cpu":
                x = x.pin_memory()  # lets the copy overlap the previous batch's compute
            x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(x)
            # Kept on the device until the end: no sync per batch.
            results.append((start, torch.softmax(logits.float(), dim=1)[:, WATERMARK_COLUMN]))
        for start, p in results:
            out[start : start + len(p)] = p.cpu().numpy()
    return out
