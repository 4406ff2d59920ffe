"""Image bytes to model input: safe decoding, open_clip-exact preprocessing, and a DALI fast path.

Undecodable images are reported as strings, never raised. Pillow is the reference path (it
reproduces open_clip's eval transform exactly); DALI decodes the plain 8-bit images in bulk.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from winnow.stages.models import PreprocessConfig

logger = logging.getLogger(__name__)

#: Pillow's own decompression-bomb limit, used as ours by default.
DEFAULT_MAX_PIXELS = 89_478_485
DecodeBackend = Literal["auto", "dali-gpu", "dali-cpu", "pillow"]
#: The decode backends; this module owns the list and its check (``check_decode_backend``).
DecodeBackend = Literal["auto", "dali-gpu", "dali-cpu", "pillow"]
DECODE_BACKENDS: tuple[str, ...] = get_args(DecodeBackend)

# Images DALI gets: plain 8-bit colour or grey in its well-trodden formats. Palette, alpha,
# CMYK and 16-bit images go to Pillow so both backends agree on how they become RGB.
_DALI_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
_DALI_MODES = frozenset({"RGB", "L"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, read without decoding pixels."""

    format: str
    mode: str
    width: int
    height: int


def _reason(exc: BaseException) -> str:
    """Exception text without object addresses, so the same bad file gives the same error."""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc)).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def _open(data: bytes | None, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    """Open lazily (header only) and refuse what is empty, not an image, or too large."""
    if data is None:
        return None, "missing: no bytes for this record"
    if len(data) == 0:
        return None, "empty: zero bytes"
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below decides; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        # Pillow's own hard stop (2x Image.MAX_IMAGE_PIXELS) fired before ours could.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = found.group(1) if found else "too many"
        return None, f"too large: {pixels} pixels > max_pixels {max_pixels} (decompression-bomb guard)"
    except UnidentifiedImageError:
        return None, f"not an image: unrecognised format (first bytes {data[:8].hex()})"
    except Exception as exc:  # noqa: BLE001 - any parser failure is a record-level error
        reason = _reason(exc)
        return None, f"{'truncated' if 'truncated' in reason.lower() else 'corrupt'} header: {reason}"
    width, height = img.size
    if width <= 0 or height <= 0:
        return None, f"not an image: declared size {width}x{height}"
    if width * height > max_pixels:
        return None, (
            f"too large: {width}x{height} = {width * height} pixels > max_pixels {max_pixels} "
            "(decompression-bomb guard)"
        )
    return img, None


def read_header(data: bytes | None, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[ImageHeader | None, str | None]:
    """Parse only the header: (format, mode, size) or the reason the record is refused."""
    img, error = _open(data, max_pixels)
    if img is None:
        return None, error
    return ImageHeader(str(img.format), img.mode, img.size[0], img.size[1]), None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB. Transparency is composited on white (what a viewer shows;
    the colour under fully transparent pixels is often arbitrary)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        # High bit depth grey: scale to 8 bits rather than letting convert() clip at 255.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if (mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        grey = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")


def decode_image(
    data: bytes | None, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image | None, str | None]:
    """Decode to an RGB Pillow image, or return (None, why not). Never raises.

    The declared size is checked against ``max_pixels`` before any pixel is decoded. Animated
    images give their first frame. Alpha is composited on white; CMYK, palette, grey and 16-bit
    grey become 8-bit RGB.
    """
    img, error = _open(data, max_pixels)
    if img is None:
        return None, error
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        if previous:  # someone turned it on process-wide; a truncated file must still be an error
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        img.load()
        return _to_rgb(img), None
    except Exception as exc:  # noqa: BLE001 - never raise on bad data
        reason = _reason(exc)
        kind = "truncated" if "truncated" in reason.lower() else "corrupt"
        return None, f"{kind} {img.format or 'image'}: {reason}"
    finally:
        if previous:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


class PillowPreprocessor:
    """open_clip's eval transform for one model, split so normalisation runs batched on device.

    The geometric part (resize with the configured interpolation, center crop or pad) is taken
    from ``open_clip.image_transform_v2`` itself; the to-tensor and normalise steps are done by
    :func:`normalize_batch` with the same arithmetic, so results equal open_clip's to float32
    rounding.
    """

    def __init__(self, preprocess: PreprocessConfig) -> None:
        from open_clip.transform import PreprocessCfg, image_transform_v2
        from torchvision.transforms import Normalize

        self.preprocess = preprocess
        cfg = PreprocessCfg(
            size=preprocess.size,
            mean=preprocess.mean,
            std=preprocess.std,
            interpolation=preprocess.interpolation,
            resize_mode=preprocess.resize_mode,
            fill_color=preprocess.fill_color,
        )
        full = image_transform_v2(cfg, is_train=False)
        # Keep only the steps that act on the PIL image's geometry.
        tail = {"MaybeConvertMode", "MaybeToTensor", "ToTensor", "Normalize"}
        self._geometry = [t for t in full.transforms if type(t).__name__ not in tail]
        if not any(isinstance(t, Normalize) for t in full.transforms):
            raise RuntimeError("open_clip's eval transform changed shape; update PillowPreprocessor")

    def to_uint8(self, img: Image.Image) -> np.ndarray:
        """(H, W, 3) uint8 of the resized and cropped RGB image."""
        for step in self._geometry:
            img = step(img)
        return np.array(img.convert("RGB"), dtype=np.uint8)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """(3, H, W) float32, as open_clip's preprocess would return for this RGB image."""
        return normalize_batch(torch.from_numpy(self.to_uint8(img))[None], self.preprocess)[0]


def normalize_batch(pixels: torch.Tensor, preprocess: PreprocessConfig) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 normalised, on the tensor's device.

    Same operations as torchvision's ToTensor then Normalize: divide by 255, subtract mean,
    divide by std.
    """
    x = pixels.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    mean = torch.tensor(preprocess.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


@dataclass
class DecodedBatch:
    """Model input for the decodable records of a batch; the others carry an error."""

    pixels: torch.Tensor  # (len(index), H, W, 3) uint8, normalise with normalize_batch
    index: list[int]  # positions in the input list that ``pixels`` rows belong to
    errors: list[str | None]  # one per input record; None where it decoded


class BatchDecoder(Protocol):
    backend: str

    def decode(self, images: list[bytes | None]) -> DecodedBatch: ...


def _stack(rows: list[np.ndarray], hw: tuple[int, int]) -> torch.Tensor:
    if not rows:
        return torch.empty((0, hw[0], hw[1], 3), dtype=torch.uint8)
    return torch.from_numpy(np.stack(rows))


class PillowBatchDecoder:
    """Decode and preprocess with Pillow on a small thread pool (Pillow releases the GIL)."""

    backend = "pillow"

    def __init__(self, preprocess: PreprocessConfig, *, max_pixels: int = DEFAULT_MAX_PIXELS, num_threads: int = 2) -> None:
        self.preprocessor = PillowPreprocessor(preprocess)
        self.max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(max_workers=num_threads) if num_threads > 1 else None

    def _one(self, data: bytes | None) -> tuple[np.ndarray | None, str | None]:
        img, error = decode_image(data, max_pixels=self.max_pixels)
        if img is None:
            return None, error
        try:
            return self.preprocessor.to_uint8(img), None
        except Exception as exc:  # noqa: BLE001 - a resize failure is still a record error
            return None, f"corrupt image: preprocessing failed: {_reason(exc)}"

    def decode(self, images: list[bytes | None]) -> DecodedBatch:
        results = list(self._pool.map(self._one, images)) if self._pool else [self._one(d) for d in images]
        index = [i for i, (arr, _) in enumerate(results) if arr is not None]
        pixels = _stack([results[i][0] for i in index], self.preprocessor.preprocess.height_width)
        return DecodedBatch(pixels, index, [err for _, err in results])


def dali_available(device: str = "cpu") -> bool:
    """True when DALI imports and (for ``gpu``) CUDA is present."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is the same as none
        return False
    return device == "cpu" or torch.cuda.is_available()


class DaliBatchDecoder:
    """DALI decode + resize + crop from in-memory encoded bytes (external source).

    DALI fails a whole batch on one bad image, so records are screened first with a Pillow header
    parse (format, mode, pixel limit); unusual images go to Pillow; and if DALI still fails a
    batch, that batch is redone with Pillow per record.
    """

    def __init__(
        self,
        preprocess: PreprocessConfig,
        *,
        device: Literal["cpu", "gpu"] = "cpu",
        device_id: int | None = None,
        max_batch_size: int = 64,
        num_threads: int = 2,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        h, w = preprocess.height_width
        if not (preprocess.resize_mode == "squash" or (preprocess.resize_mode == "shortest" and h == w)):
            raise ValueError(
                f"DALI path supports resize_mode 'squash' or 'shortest' to a square, not "
                f"{preprocess.resize_mode!r} to {h}x{w}; use decode_backend='pillow'"
            )
        if preprocess.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"DALI path supports bicubic/bilinear, not {preprocess.interpolation!r}")
        self.backend = f"dali-{device}"
        self.preprocess = preprocess
        self.device = device
        self.device_id = (0 if device_id is None else device_id) if device == "gpu" else None
        self.max_batch_size = max_batch_size
        self.num_threads = num_threads
        self.max_pixels = max_pixels
        self.fallback = PillowBatchDecoder(preprocess, max_pixels=max_pixels, num_threads=num_threads)
        self.failed_batches = 0  # DALI batches redone with Pillow
        self._pipe = self._build()

    def _build(self) -> Any:
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        h, w = self.preprocess.height_width
        interp = types.INTERP_CUBIC if self.preprocess.interpolation == "bicubic" else types.INTERP_LINEAR
        decode_device = "mixed" if self.device == "gpu" else "cpu"

        # prefetch depth 1: we feed one batch and run it, batches may be short.
        @pipeline_def(
            batch_size=self.max_batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=1,  # we feed one batch and run it; batches may be short
        )
        def pipe() -> Any:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            # Per-record resize target and crop position, computed from the header exactly as
            # torchvision's Resize and CenterCrop do, so both backends cut the same window.
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            crop_y = fn.external_source(name="crop_y", dtype=types.FLOAT, ndim=0)
            crop_x = fn.external_source(name="crop_x", dtype=types.FLOAT, ndim=0)
            # adjust_orientation off: open_clip (Pillow) ignores EXIF rotation too.
            img = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, adjust_orientation=False)
            img = fn.resize(img, size=size, interp_type=interp, antialias=True)
            # Crop only; normalisation is shared with the Pillow path (normalize_batch).
            return fn.crop_mirror_normalize(
                img, crop=(h, w), crop_pos_x=crop_x, crop_pos_y=crop_y, dtype=types.UINT8, output_layout="HWC"
            )

        p = pipe()
        p.build()
        return p

    def _geometry(self, header: ImageHeader) -> tuple[np.ndarray, np.float32, np.float32]:
        """(resize target [h, w], crop_y, crop_x) as torchvision computes them for this size."""
        th, tw = self.preprocess.height_width
        if self.preprocess.resize_mode == "squash":
            return np.array([th, tw], np.float32), np.float32(0.5), np.float32(0.5)
        width, height = header.width, header.height
        if width <= height:  # torchvision: the short side gets the size, the long one truncates
            nw, nh = th, int(th * height / width)
        else:
            nh, nw = th, int(th * width / height)
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        crop_y = top / (nh - th) if nh > th else 0.5
        crop_x = left / (nw - tw) if nw > tw else 0.5
        return np.array([nh, nw], np.float32), np.float32(crop_y), np.float32(crop_x)

    def _run_dali(self, encoded: list[bytes], headers: list[ImageHeader]) -> torch.Tensor:
        geometry = [self._geometry(hd) for hd in headers]
        self._pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in encoded])
        self._pipe.feed_input("size", [g[0] for g in geometry])
        self._pipe.feed_input("crop_y", [g[1] for g in geometry])
        self._pipe.feed_input("crop_x", [g[2] for g in geometry])
        (out,) = self._pipe.run()
        if self.device == "gpu":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            tensor = out.as_tensor()
            pixels = torch.empty(tensor.shape(), dtype=torch.uint8, device=f"cuda:{self.device_id}")
            feed_ndarray(tensor, pixels, cuda_stream=torch.cuda.current_stream(self.device_id))
            return pixels
        return torch.from_numpy(np.array(out.as_array()))

    def decode(self, images: list[bytes | None]) -> DecodedBatch:
        errors: list[str | None] = [None] * len(images)
        to_dali: list[int] = []
        to_pillow: list[int] = []
        headers: dict[int, ImageHeader] = {}
        for i, data in enumerate(images):
            header, error = read_header(data, max_pixels=self.max_pixels)
            if header is None:
                errors[i] = error
            elif header.format in _DALI_FORMATS and header.mode in _DALI_MODES:
                to_dali.append(i)
                headers[i] = header
            else:
                to_pillow.append(i)
        parts: list[tuple[list[int], torch.Tensor]] = []
        for start in range(0, len(to_dali), self.max_batch_size):
            chunk = to_dali[start : start + self.max_batch_size]
            try:
                parts.append((chunk, self._run_dali([images[i] for i in chunk], [headers[i] for i in chunk])))  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001 - one bad image fails DALI's whole batch
                self.failed_batches += 1
                logger.info("DALI failed a batch of %d (%s); decoding it with Pillow", len(chunk), str(exc).splitlines()[0] if str(exc) else exc)
                self._pipe = self._build()  # a failed pipeline is not reusable
                to_pillow.extend(chunk)
        if to_pillow:
            to_pillow.sort()
            fallback = self.fallback.decode([images[i] for i in to_pillow])
            for j, err in enumerate(fallback.errors):
                errors[to_pillow[j]] = err
            if fallback.index:
                pixels = fallback.pixels
                if parts and parts[0][1].is_cuda:
                    pixels = pixels.to(parts[0][1].device)
                parts.append(([to_pillow[j] for j in fallback.index], pixels))
        if not parts:
            return DecodedBatch(_stack([], self.preprocess.height_width), [], errors)
        index = [i for idx, _ in parts for i in idx]
        pixels = torch.cat([p for _, p in parts]) if len(parts) > 1 else parts[0][1]
        order = sorted(range(len(index)), key=index.__getitem__)
        if order != list(range(len(index))):
            pixels = pixels[torch.tensor(order, device=pixels.device)]
            index = [index[k] for k in order]
        return DecodedBatch(pixels, index, errors)


def make_batch_decoder(
    backend: str,
    preprocess: PreprocessConfig,
    *,
    max_batch_size: int = 64,
    num_threads: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device_id: int | None = None,
    allow_gpu_decode: bool = True,
) -> BatchDecoder:
    """The decoder for ``backend``; ``auto`` prefers DALI on GPU (when ``allow_gpu_decode``),
    then DALI on CPU, then Pillow."""
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"decode_backend {backend!r} is not one of {', '.join(DECODE_BACKENDS)}")
    kwargs = dict(max_batch_size=max_batch_size, num_threads=num_threads, max_pixels=max_pixels)
    if backend == "pillow":
        return PillowBatchDecoder(preprocess, max_pixels=max_pixels, num_threads=num_threads)
    if backend in ("dali-gpu", "dali-cpu"):
        device = backend.removeprefix("dali-")
        if not dali_available(device):
            raise RuntimeError(
                f"decode_backend {backend!r} needs nvidia-dali (pip install nvidia-dali-cuda120)"
                + (" and a CUDA GPU" if device == "gpu" else "")
                + "; use decode_backend='auto' or 'pillow'"
            )
        return DaliBatchDecoder(preprocess, device=device, device_id=device_id, **kwargs)  # type: ignore[arg-type]
    # auto: the fastest path that works here, never an error.
    for device in ("gpu", "cpu") if allow_gpu_decode else ("cpu",):
        if dali_available(device):
            try:
                return DaliBatchDecoder(preprocess, device=device, device_id=device_id, **kwargs)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - fall through to the next backend
                logger.warning("DALI %s decoding unavailable (%s); trying the next backend", device, exc)
    return PillowBatchDecoder(preprocess, max_pixels=max_pixels, num_threads=num_threads)
