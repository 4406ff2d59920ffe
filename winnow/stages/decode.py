"""Image bytes to model input: safe decoding, open_clip-exact preprocessing, and GPU fast paths.

Undecodable images are reported as strings, never raised. Pillow is the reference path (it
reproduces open_clip's eval transform exactly); DALI and nvImageCodec decode the plain 8-bit
images in bulk and hand anything unusual to Pillow, record by record.

A decoder may feed more than one model: besides the main preprocessing it takes ``extra`` ones
(the watermark detector's 256 px squash) and returns each as a view of the same decoded image
(:attr:`DecodedBatch.views`). Every record is read and decoded once, whatever the backend.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Callable, Sequence
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
#: The decode backends; this module owns the set and its validation (:func:`validate_decode_backend`).
DecodeBackend = Literal["auto", "nvimgcodec", "dali-gpu", "dali-cpu", "pillow"]
DECODE_BACKENDS: tuple[str, ...] = get_args(DecodeBackend)
#: What ``auto`` tries, fastest first; GPU backends only when the model is on a GPU.
AUTO_ORDER: tuple[str, ...] = ("nvimgcodec", "dali-gpu", "dali-cpu", "pillow")
_GPU_BACKENDS = frozenset({"nvimgcodec", "dali-gpu"})


def validate_decode_backend(value: object, *, param: str = "decode_backend") -> DecodeBackend:
    """``value`` as a :data:`DecodeBackend`, or a ValueError naming the param and the choices."""
    if value not in DECODE_BACKENDS:
        raise ValueError(
            f"{param} must be one of {', '.join(DECODE_BACKENDS)}, got {value!r}; 'auto' picks the "
            "fastest one installed here"
        )
    return value  # type: ignore[return-value]


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
    # The same decoded images under each extra preprocessing the decoder was made with, in that
    # order: (len(index), h, w, 3) uint8 each, rows as ``pixels``, on the same device.
    views: tuple[torch.Tensor, ...] = ()


class BatchDecoder(Protocol):
    backend: str
    extra: tuple[PreprocessConfig, ...]  # the preprocessings of DecodedBatch.views, in order

    def decode(self, images: list[bytes | None]) -> DecodedBatch: ...


def _stack(rows: list[np.ndarray], hw: tuple[int, int]) -> torch.Tensor:
    if not rows:
        return torch.empty((0, hw[0], hw[1], 3), dtype=torch.uint8)
    return torch.from_numpy(np.stack(rows))


def _empty(preprocess: PreprocessConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.empty((0, *preprocess.height_width, 3), dtype=torch.uint8, device=device)


class PillowBatchDecoder:
    """Decode and preprocess with Pillow on a small thread pool (Pillow releases the GIL).

    :param extra: more preprocessings of the same decoded image (:attr:`DecodedBatch.views`).
    """

    backend = "pillow"

    def __init__(self, preprocess: PreprocessConfig, *, max_pixels: int = DEFAULT_MAX_PIXELS, num_threads: int = 2,
                 extra: Sequence[PreprocessConfig] = ()) -> None:
        self.preprocessor = PillowPreprocessor(preprocess)
        self.extra = tuple(extra)
        self._extra_preprocessors = [PillowPreprocessor(p) for p in self.extra]
        self.max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(max_workers=num_threads) if num_threads > 1 else None

    def _one(self, data: bytes | None) -> tuple[list[np.ndarray] | None, str | None]:
        """The record's pixels under every preprocessing, from one decode of its bytes."""
        img, error = decode_image(data, max_pixels=self.max_pixels)
        if img is None:
            return None, error
        try:
            return [pre.to_uint8(img) for pre in (self.preprocessor, *self._extra_preprocessors)], None
        except Exception as exc:  # noqa: BLE001 - a resize failure is still a record error
            return None, f"corrupt image: preprocessing failed: {_reason(exc)}"

    def decode(self, images: list[bytes | None]) -> DecodedBatch:
        results = list(self._pool.map(self._one, images)) if self._pool else [self._one(d) for d in images]
        index = [i for i, (arrays, _) in enumerate(results) if arrays is not None]
        stacks = [_stack([results[i][0][k] for i in index], pre.height_width)  # type: ignore[index]
                  for k, pre in enumerate((self.preprocessor.preprocess, *self.extra))]
        return DecodedBatch(stacks[0], index, [err for _, err in results], tuple(stacks[1:]))


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
    batch, that batch is redone with Pillow per record. Each ``extra`` preprocessing is one more
    output of the pipeline: a resize and crop of the same decoded image.
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
        extra: Sequence[PreprocessConfig] = (),
    ) -> None:
        for pre in (preprocess, *extra):
            check_tensor_preprocess(pre, "dali")
        self.backend = f"dali-{device}"
        self.preprocess = preprocess
        self.extra = tuple(extra)
        self.device = device
        self.device_id = (0 if device_id is None else device_id) if device == "gpu" else None
        self.max_batch_size = max_batch_size
        self.num_threads = num_threads
        self.max_pixels = max_pixels
        self.fallback = PillowBatchDecoder(preprocess, max_pixels=max_pixels, num_threads=num_threads, extra=extra)
        self.failed_batches = 0  # DALI batches redone with Pillow
        self._pipe = self._build()

    def _build(self) -> Any:
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        decode_device = "mixed" if self.device == "gpu" else "cpu"
        preprocessings = (self.preprocess, *self.extra)

        @pipeline_def(
            batch_size=self.max_batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=1,  # we feed one batch and run it; batches may be short
        )
        def pipe() -> Any:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            # adjust_orientation off: open_clip (Pillow) ignores EXIF rotation too.
            img = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, adjust_orientation=False)
            outputs = []
            # One output per preprocessing, each a resize + crop of the one decoded image.
            for k, pre in enumerate(preprocessings):
                h, w = pre.height_width
                interp = types.INTERP_CUBIC if pre.interpolation == "bicubic" else types.INTERP_LINEAR
                # Per-record resize target and crop position, computed from the header exactly as
                # torchvision's Resize and CenterCrop do, so both backends cut the same window.
                size = fn.external_source(name=f"size{k}", dtype=types.FLOAT, ndim=1)
                crop_y = fn.external_source(name=f"crop_y{k}", dtype=types.FLOAT, ndim=0)
                crop_x = fn.external_source(name=f"crop_x{k}", dtype=types.FLOAT, ndim=0)
                resized = fn.resize(img, size=size, interp_type=interp, antialias=True)
                # Crop only; normalisation is shared with the Pillow path (normalize_batch).
                outputs.append(fn.crop_mirror_normalize(
                    resized, crop=(h, w), crop_pos_x=crop_x, crop_pos_y=crop_y, dtype=types.UINT8, output_layout="HWC"
                ))
            return tuple(outputs)

        p = pipe()
        p.build()
        return p

    @staticmethod
    def _geometry(header: ImageHeader, preprocess: PreprocessConfig) -> tuple[np.ndarray, np.float32, np.float32]:
        """(resize target [h, w], crop_y, crop_x) as torchvision computes them for this size."""
        th, tw = preprocess.height_width
        if preprocess.resize_mode == "squash":
            return np.array([th, tw], np.float32), np.float32(0.5), np.float32(0.5)
        nh, nw, top, left = resize_geometry(header.height, header.width, preprocess)
        crop_y = top / (nh - th) if nh > th else 0.5
        crop_x = left / (nw - tw) if nw > tw else 0.5
        return np.array([nh, nw], np.float32), np.float32(crop_y), np.float32(crop_x)

    def _run_dali(self, encoded: list[bytes], headers: list[ImageHeader]) -> list[torch.Tensor]:
        """The pipeline's outputs for one batch: the main preprocessing's pixels, then each extra's."""
        self._pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in encoded])
        for k, pre in enumerate((self.preprocess, *self.extra)):
            geometry = [self._geometry(hd, pre) for hd in headers]
            self._pipe.feed_input(f"size{k}", [g[0] for g in geometry])
            self._pipe.feed_input(f"crop_y{k}", [g[1] for g in geometry])
            self._pipe.feed_input(f"crop_x{k}", [g[2] for g in geometry])
        outputs = self._pipe.run()
        if self.device == "gpu":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            tensors = []
            for out in outputs:
                tensor = out.as_tensor()
                pixels = torch.empty(tensor.shape(), dtype=torch.uint8, device=f"cuda:{self.device_id}")
                feed_ndarray(tensor, pixels, cuda_stream=torch.cuda.current_stream(self.device_id))
                tensors.append(pixels)
            return tensors
        return [torch.from_numpy(np.array(out.as_array())) for out in outputs]

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
        parts: list[_Part] = []
        for start in range(0, len(to_dali), self.max_batch_size):
            chunk = to_dali[start : start + self.max_batch_size]
            try:
                outputs = self._run_dali([images[i] for i in chunk], [headers[i] for i in chunk])  # type: ignore[misc]
                parts.append((chunk, outputs[0], tuple(outputs[1:])))
            except Exception as exc:  # noqa: BLE001 - one bad image fails DALI's whole batch
                self.failed_batches += 1
                first_line = str(exc).splitlines()[0] if str(exc) else exc
                logger.info("DALI failed a batch of %d (%s); decoding it with Pillow", len(chunk), first_line)
                self._pipe = self._build()  # a failed pipeline is not reusable
                to_pillow.extend(chunk)
        device = parts[0][1].device if parts else torch.device("cpu")
        redone = _decode_with_pillow(self.fallback, images, to_pillow, errors)
        if redone is not None:
            parts.append(redone)
        return _assemble(parts, errors, (self.preprocess, *self.extra), device)


#: Decoded records of one batch from one path: (their positions, pixels, views).
_Part = tuple[list[int], torch.Tensor, tuple[torch.Tensor, ...]]


def _decode_with_pillow(fallback: PillowBatchDecoder, images: list, positions: list[int],
                        errors: list[str | None]) -> _Part | None:
    """Decode the records at ``positions`` (of ``images``) with Pillow, for a GPU or DALI decoder
    that could not: their errors go into ``errors`` by position; returns the positions decoded
    with their pixels and views, or None when there is nothing to show."""
    if not positions:
        return None
    positions.sort()
    redone = fallback.decode([images[i] for i in positions])
    for j, err in enumerate(redone.errors):
        errors[positions[j]] = err
    if not redone.index:
        return None
    return [positions[j] for j in redone.index], redone.pixels, redone.views


def _assemble(parts: list[_Part], errors: list[str | None], preprocessings: tuple[PreprocessConfig, ...],
              device: torch.device) -> DecodedBatch:
    """One batch from the parts the decode paths gave (bulk, Pillow), on ``device``, in record
    order; every view's rows follow the pixels' rows."""
    if not parts:
        empty = [_empty(pre, device) for pre in preprocessings]
        return DecodedBatch(empty[0], [], errors, tuple(empty[1:]))
    index = [i for idx, _, _ in parts for i in idx]
    columns = [[pixels for _, pixels, _ in parts]] + [[views[k] for _, _, views in parts]
                                                     for k in range(len(preprocessings) - 1)]
    stacked = [torch.cat([t.to(device) for t in ts]) if len(ts) > 1 else ts[0].to(device) for ts in columns]
    order = sorted(range(len(index)), key=index.__getitem__)
    if order != list(range(len(index))):
        rows = torch.tensor(order, device=device)
        stacked = [t[rows] for t in stacked]
        index = [index[k] for k in order]
    return DecodedBatch(stacked[0], index, errors, tuple(stacked[1:]))


def check_tensor_preprocess(preprocess: PreprocessConfig, backend: str) -> None:
    """Refuse a preprocess the tensor (GPU) resize path does not reproduce, naming the fix."""
    h, w = preprocess.height_width
    if not (preprocess.resize_mode == "squash" or (preprocess.resize_mode == "shortest" and h == w)):
        raise ValueError(
            f"decode_backend {backend!r} supports resize_mode 'squash' or 'shortest' to a square, not "
            f"{preprocess.resize_mode!r} to {h}x{w}; use decode_backend='pillow'"
        )
    if preprocess.interpolation not in ("bicubic", "bilinear"):
        raise ValueError(
            f"decode_backend {backend!r} supports bicubic/bilinear, not {preprocess.interpolation!r}; "
            "use decode_backend='pillow'"
        )


def resize_geometry(height: int, width: int, preprocess: PreprocessConfig) -> tuple[int, int, int, int]:
    """(resized h, resized w, crop top, crop left) exactly as torchvision's Resize + CenterCrop
    compute them in open_clip's eval transform (``shortest`` or ``squash``)."""
    th, tw = preprocess.height_width
    if preprocess.resize_mode == "squash":
        return th, tw, 0, 0
    if width <= height:  # the short side gets the size; the long one is truncated, not rounded
        nw, nh = th, int(th * height / width)
    else:
        nh, nw = th, int(th * width / height)
    return nh, nw, int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))


def resize_center_crop(images: list[torch.Tensor], preprocess: PreprocessConfig) -> torch.Tensor:
    """(H, W, 3) uint8 tensors of any sizes -> (N, h, w, 3) uint8 model input, on their device.

    Antialiased bicubic (or bilinear) resize as PIL does it (torch's antialias kernels use PIL's
    filter; one axis at a time with 8-bit rounding between, like PIL), then the center crop.
    Images of one size are resized in one call, so a batch of same-size photos costs one kernel
    chain, not one per image.
    """
    th, tw = preprocess.height_width
    if not images:
        return torch.empty((0, th, tw, 3), dtype=torch.uint8)
    out = torch.empty((len(images), th, tw, 3), dtype=torch.uint8, device=images[0].device)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_size.setdefault((int(img.shape[0]), int(img.shape[1])), []).append(i)
    mode = "bicubic" if preprocess.interpolation == "bicubic" else "bilinear"
    for (h, w), rows in by_size.items():
        nh, nw, top, left = resize_geometry(h, w, preprocess)
        x = torch.stack([images[i] for i in rows]).permute(0, 3, 1, 2).to(torch.float32)
        # Horizontal pass, then vertical, each rounded and clipped to 8 bits as PIL does between
        # passes (one 2-D pass keeps bicubic overshoot and lands up to ~14 levels off at edges).
        for size in ((h, nw), (nh, nw)):
            if tuple(x.shape[2:]) != size:
                x = torch.nn.functional.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
                x = x.round_().clamp_(0, 255)
        x = x[:, :, top : top + th, left : left + tw].to(torch.uint8)
        out[torch.tensor(rows, device=out.device)] = x.permute(0, 2, 3, 1)
    return out


def _complete_jpeg(data: bytes) -> bool:
    """True when the JPEG ends with its end-of-image marker. A cut-off file goes to Pillow, which
    calls it truncated, so a GPU decoder that tolerates missing scans cannot hide it."""
    return data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


def nvimgcodec_available() -> bool:
    """True when nvImageCodec imports and a CUDA GPU is present (it needs a driver even on CPU)."""
    if not torch.cuda.is_available():
        return False
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is the same as none
        return False
    return True


#: Decodes a list of complete JPEGs to (H, W, 3) uint8 tensors; None where one failed.
JpegDecodeFn = Callable[[list[bytes]], list["torch.Tensor | None"]]


class NvImageCodecBatchDecoder:
    """JPEG decode on the GPU with nvImageCodec (nvJPEG, the A100/H100 hardware decoder where
    there is one), then resize and center crop on the GPU to the model's own preprocess.

    Records are screened with a Pillow header parse (format, mode, pixel limit), as for DALI:
    complete 8-bit RGB or grey JPEGs go to the GPU; PNG, WebP, CMYK, palette, alpha, cut-off files
    and any image the GPU decoder returns nothing for are decoded by Pillow one by one, so every
    record keeps the accounting (pixels or error text) the Pillow path gives it.

    ``jpeg_decoder`` replaces nvImageCodec by another JPEG decoder (tests run this class on CPU
    with torchvision's); ``device`` is where the pixels come out. Each ``extra`` preprocessing
    resizes the same decoded tensors once more (:attr:`DecodedBatch.views`).
    """

    backend = "nvimgcodec"

    def __init__(
        self,
        preprocess: PreprocessConfig,
        *,
        device_id: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        num_threads: int = 2,
        jpeg_decoder: JpegDecodeFn | None = None,
        device: str | torch.device | None = None,
        extra: Sequence[PreprocessConfig] = (),
    ) -> None:
        for pre in (preprocess, *extra):
            check_tensor_preprocess(pre, self.backend)
        self.preprocess = preprocess
        self.extra = tuple(extra)
        self.max_pixels = max_pixels
        self.fallback = PillowBatchDecoder(preprocess, max_pixels=max_pixels, num_threads=num_threads, extra=extra)
        self.gpu_failed = 0  # records the GPU decoder returned nothing for (redone by Pillow)
        if jpeg_decoder is not None:
            self.device = torch.device(device or "cpu")
            self._decode_jpegs = jpeg_decoder
            self._stream = None
            return
        from nvidia import nvimgcodec

        self.device = torch.device("cuda", 0 if device_id is None else device_id)
        self._nv = nvimgcodec
        # Pillow/open_clip ignore EXIF rotation, so the GPU path must too.
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB)
        self._decoder = self._make_decoder(num_threads)
        self._stream = torch.cuda.Stream(self.device)
        self._decode_jpegs = self._nvimgcodec_decode

    def _make_decoder(self, num_threads: int) -> Any:
        nv = self._nv
        # Fancy (interpolated) chroma upsampling is what libjpeg-turbo, hence Pillow, does.
        for options in (":fancy_upsampling=1", ""):
            try:
                return nv.Decoder(device_id=self.device.index, max_num_cpu_threads=num_threads, options=options)
            except Exception as exc:  # noqa: BLE001 - an older nvImageCodec without that option
                if not options:
                    raise
                logger.info("nvImageCodec refused options %r (%s); using its defaults", options, exc)
        raise AssertionError("unreachable")

    def _nvimgcodec_decode(self, encoded: list[bytes]) -> list[torch.Tensor | None]:
        assert self._stream is not None
        streams = [self._nv.CodeStream(b) for b in encoded]
        decoded = self._decoder.decode(streams, params=self._params, cuda_stream=self._stream.cuda_stream)
        out: list[torch.Tensor | None] = []
        for img in decoded:
            if img is None:
                out.append(None)
                continue
            try:
                t = torch.as_tensor(img, device=self.device)  # zero-copy (__cuda_array_interface__)
            except (AttributeError, RuntimeError, TypeError, ValueError):
                # An image a CPU codec produced in host memory: copy it over.
                t = torch.from_numpy(np.asarray(img.cpu())).to(self.device)
            if t.ndim == 2:
                t = t[:, :, None]
            if t.shape[2] == 1:
                t = t.expand(-1, -1, 3)
            out.append(t[:, :, :3] if t.shape[2] > 3 else t)
        self._keepalive = decoded  # nvImageCodec owns those buffers until the resize has read them
        return out

    def decode(self, images: list[bytes | None]) -> DecodedBatch:
        errors: list[str | None] = [None] * len(images)
        to_gpu: list[int] = []
        to_pillow: list[int] = []
        for i, data in enumerate(images):
            header, error = read_header(data, max_pixels=self.max_pixels)
            if header is None:
                errors[i] = error
            elif header.format == "JPEG" and header.mode in _DALI_MODES and _complete_jpeg(data):  # type: ignore[arg-type]
                to_gpu.append(i)
            else:
                to_pillow.append(i)
        parts: list[_Part] = []
        if to_gpu:
            stream_ctx = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
            with stream_ctx:
                try:
                    tensors = self._decode_jpegs([images[i] for i in to_gpu])  # type: ignore[misc]
                except Exception as exc:  # noqa: BLE001 - a batch-level failure: Pillow redoes it
                    logger.info("nvImageCodec failed a batch of %d (%s); decoding it with Pillow", len(to_gpu), exc)
                    tensors = [None] * len(to_gpu)
                ok = [(i, t) for i, t in zip(to_gpu, tensors) if t is not None]
                if ok:
                    # Each preprocessing resizes the same decoded tensors: one decode, several views.
                    decoded = [t for _, t in ok]
                    parts.append(([i for i, _ in ok], resize_center_crop(decoded, self.preprocess),
                                  tuple(resize_center_crop(decoded, pre) for pre in self.extra)))
            if self._stream is not None:
                # The decoded images are released next: their buffers must have been read.
                self._stream.synchronize()
                self._keepalive = None
            failed = [i for i, t in zip(to_gpu, tensors) if t is None]
            self.gpu_failed += len(failed)
            to_pillow.extend(failed)
        redone = _decode_with_pillow(self.fallback, images, to_pillow, errors)
        if redone is not None:
            parts.append(redone)
        return _assemble(parts, errors, (self.preprocess, *self.extra), self.device)


def backend_available(backend: str, *, gpu: bool) -> bool:
    """Whether ``backend`` can run here (``gpu``: the model is on a CUDA device)."""
    if backend == "pillow":
        return True
    if backend in _GPU_BACKENDS and not gpu:
        return False
    if backend == "nvimgcodec":
        return nvimgcodec_available()
    return dali_available(backend.removeprefix("dali-"))


def make_batch_decoder(
    backend: str,
    preprocess: PreprocessConfig,
    *,
    max_batch_size: int = 64,
    num_threads: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device_id: int | None = None,
    allow_gpu_decode: bool = True,
    extra: Sequence[PreprocessConfig] = (),
) -> BatchDecoder:
    """The decoder for ``backend``; ``auto`` takes the first of :data:`AUTO_ORDER` that is
    installed and works here (GPU decoders only when ``allow_gpu_decode``), Pillow at worst.
    ``extra``: more preprocessings of each decoded image (:attr:`DecodedBatch.views`), e.g. a
    second model's input; every backend decodes each record once for all of them.

    Only the backend asked for is imported: ``pillow`` (or ``auto`` where neither nvImageCodec nor
    DALI is installed) never imports DALI.
    """
    backend = validate_decode_backend(backend)
    if backend == "auto":
        for candidate in AUTO_ORDER:
            if not backend_available(candidate, gpu=allow_gpu_decode):
                continue
            try:
                return _make(candidate, preprocess, max_batch_size, num_threads, max_pixels, device_id, extra)
            except Exception as exc:  # noqa: BLE001 - auto falls through to the next backend
                logger.warning("decode backend %s unavailable (%s); trying the next one", candidate, exc)
        raise AssertionError("unreachable: pillow always works")
    if not backend_available(backend, gpu=True):
        needs = {
            "nvimgcodec": "nvidia-nvimgcodec-cu13 (or -cu12) with nvidia-nvjpeg, and a CUDA GPU",
            "dali-gpu": "nvidia-dali (pip install nvidia-dali-cuda120) and a CUDA GPU",
            "dali-cpu": "nvidia-dali (pip install nvidia-dali-cuda120)",
        }[backend]
        raise RuntimeError(f"decode_backend {backend!r} needs {needs}; use decode_backend='auto' or 'pillow'")
    return _make(backend, preprocess, max_batch_size, num_threads, max_pixels, device_id, extra)


def _make(
    backend: str, preprocess: PreprocessConfig, max_batch_size: int, num_threads: int, max_pixels: int,
    device_id: int | None, extra: Sequence[PreprocessConfig] = (),
) -> BatchDecoder:
    if backend == "pillow":
        return PillowBatchDecoder(preprocess, max_pixels=max_pixels, num_threads=num_threads, extra=extra)
    if backend == "nvimgcodec":
        return NvImageCodecBatchDecoder(preprocess, device_id=device_id, max_pixels=max_pixels, num_threads=num_threads,
                                        extra=extra)
    device = backend.removeprefix("dali-")
    return DaliBatchDecoder(
        preprocess, device=device, device_id=device_id,  # type: ignore[arg-type]
        max_batch_size=max_batch_size, num_threads=num_threads, max_pixels=max_pixels, extra=extra,
    )
