"""Image decoding (never raises), open_clip-exact preprocessing, and the DALI path against Pillow."""

from __future__ import annotations

import io
import random

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageFile

from winnow.data.sample import decompression_bomb_png
from winnow.stages.decode import (
    DaliBatchDecoder,
    PillowBatchDecoder,
    PillowPreprocessor,
    dali_available,
    decode_image,
    make_batch_decoder,
    read_header,
)
from winnow.stages.models import TINY_MODEL, PreprocessConfig, register_model_configs

needs_dali_cpu = pytest.mark.skipif(not dali_available("cpu"), reason="nvidia-dali not importable")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

OPENAI_224 = PreprocessConfig(size=224, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: gradients, edges and mild noise (resize filters matter on it)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 / width, y * 255 / height, ((x // 7 + y // 5) % 2) * 200.0], -1)
    arr += rng.normal(0, 12, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


# ---- decode_image ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,mode",
    [("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "P"), ("PNG", "RGBA"), ("PNG", "LA"),
     ("PNG", "1"), ("GIF", "P"), ("WEBP", "RGB"), ("WEBP", "RGBA"), ("TIFF", "RGB"), ("BMP", "RGB")],
)
def test_decode_gives_rgb_for_every_common_mode(fmt, mode):
    data = encode(picture(40, 30).convert(mode), fmt)
    img, error = decode_image(data)
    assert error is None
    assert img.mode == "RGB" and img.size == (40, 30)


def test_transparent_pixels_are_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    img, _ = decode_image(encode(rgba, "PNG"))
    assert img.getpixel((1, 1)) == (255, 255, 255)
    assert img.getpixel((0, 0)) == (10, 20, 30)
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    img, _ = decode_image(encode(pal, "PNG", transparency=0))
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 0)) == (200, 0, 0)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(arr), "PNG")
    img, error = decode_image(data)
    assert error is None
    assert [img.getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]


@pytest.mark.parametrize(
    "data,prefix",
    [
        (None, "missing"),
        (b"", "empty"),
        (b"this is a caption, not a picture", "not an image"),
        (encode(picture(64, 64))[:40], "truncated header"),
    ],
)
def test_unusable_bytes_are_reported_not_raised(data, prefix):
    img, error = decode_image(data)
    assert img is None and error.startswith(prefix), error


def test_truncated_jpeg_body_is_an_error_even_with_load_truncated_images_on(monkeypatch):
    data = encode(picture(200, 150), quality=95)
    cut = data[: len(data) // 2]
    img, error = decode_image(cut)
    assert img is None and error.startswith("truncated JPEG"), error
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    img, error = decode_image(cut)
    assert img is None and error.startswith("truncated JPEG"), error
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_decompression_bomb_is_refused_from_the_header():
    img, error = decode_image(decompression_bomb_png(30000, 30000))
    assert img is None and error.startswith("too large: 900000000 pixels > max_pixels"), error
    header, error = read_header(encode(picture(20, 10)), max_pixels=199)
    assert header is None and "max_pixels 199" in error
    header, error = read_header(encode(picture(20, 10)), max_pixels=200)
    assert error is None and (header.width, header.height, header.format) == (20, 10, "JPEG")


def test_errors_are_the_same_text_for_the_same_bytes():
    data = b"\x89PNG\r\n\x1a\n garbage after a png signature"
    assert decode_image(data)[1] == decode_image(data)[1]
    assert "0x" not in decode_image(data)[1]


def test_mutated_images_never_raise():
    rnd = random.Random(7)
    good = [encode(picture(48, 32)), encode(picture(48, 32), "PNG"), encode(picture(48, 32), "WEBP")]
    for _ in range(150):
        data = bytearray(rnd.choice(good))
        for _ in range(rnd.randint(1, 8)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        data = bytes(data[: rnd.randint(1, len(data))])
        img, error = decode_image(data)
        assert (img is None) != (error is None)


# ---- preprocessing parity with open_clip ---------------------------------------------------


@pytest.mark.parametrize("size", [(640, 480), (300, 500), (33, 32), (20, 10), (224, 224)])
def test_preprocess_equals_open_clips_own_transform_for_the_tiny_model(size):
    register_model_configs()
    model, _, reference = open_clip.create_model_and_transforms(TINY_MODEL)
    ours = PillowPreprocessor(PreprocessConfig.from_open_clip(open_clip.get_model_preprocess_cfg(model)))
    for data in (encode(picture(*size), quality=90), encode(picture(*size, seed=3), "PNG")):
        img, _ = decode_image(data)
        expected = reference(Image.open(io.BytesIO(data)))
        assert (ours(img) - expected).abs().max().item() < 1e-6


@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_preprocess_equals_open_clip_image_transform_at_224(resize_mode, interpolation):
    cfg = PreprocessConfig(
        size=224, mean=OPENAI_224.mean, std=OPENAI_224.std, interpolation=interpolation, resize_mode=resize_mode
    )
    reference = open_clip.image_transform(
        224, is_train=False, mean=cfg.mean, std=cfg.std, resize_mode=resize_mode, interpolation=interpolation
    )
    ours = PillowPreprocessor(cfg)
    for w, h in [(640, 480), (250, 600)]:
        data = encode(picture(w, h))
        img, _ = decode_image(data)
        assert (ours(img) - reference(Image.open(io.BytesIO(data)))).abs().max().item() < 1e-6


def test_pillow_batch_decoder_keeps_positions_of_good_records():
    dec = PillowBatchDecoder(OPENAI_224, num_threads=2)
    batch = dec.decode([encode(picture(300, 200)), b"", None, encode(picture(200, 300), "PNG")])
    assert batch.index == [0, 3]
    assert batch.pixels.shape == (2, 224, 224, 3) and batch.pixels.dtype == torch.uint8
    assert batch.errors[0] is None and batch.errors[3] is None
    assert batch.errors[1].startswith("empty") and batch.errors[2].startswith("missing")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="decode_backend"):
        make_batch_decoder("opencv", OPENAI_224)


# ---- DALI -----------------------------------------------------------------------------------


@needs_dali_cpu
def test_auto_backend_on_cpu_is_dali_cpu():
    assert make_batch_decoder("auto", OPENAI_224, allow_gpu_decode=False).backend == "dali-cpu"


@needs_dali_cpu
def test_dali_cpu_pixels_match_pillow_within_resampling_noise():
    images = [encode(picture(w, h, seed=w), quality=90) for w, h in [(640, 480), (480, 640), (301, 300), (1000, 333)]]
    images.append(encode(picture(100, 60).convert("L")))
    pil = PillowBatchDecoder(OPENAI_224).decode(images)
    dali = DaliBatchDecoder(OPENAI_224, max_batch_size=8).decode(images)
    assert dali.index == pil.index == list(range(5))
    diff = (dali.pixels.int() - pil.pixels.int()).abs()
    assert diff.float().mean().item() < 0.5
    assert diff.max().item() <= 8


@needs_dali_cpu
def test_dali_routes_unusual_modes_to_pillow_and_keeps_order():
    images = [
        encode(picture(64, 48).convert("RGBA"), "PNG"),
        encode(picture(64, 48), quality=90),
        encode(picture(64, 48).convert("CMYK")),
        b"junk",
    ]
    pil = PillowBatchDecoder(OPENAI_224).decode(images)
    dali = DaliBatchDecoder(OPENAI_224, max_batch_size=4).decode(images)
    assert dali.index == pil.index == [0, 1, 2]
    assert dali.errors[3].startswith("not an image")
    # Alpha and CMYK images took the Pillow path: bit-identical.
    assert torch.equal(dali.pixels[0], pil.pixels[0]) and torch.equal(dali.pixels[2], pil.pixels[2])


@needs_dali_cpu
def test_dali_batch_failure_falls_back_to_pillow_for_that_batch():
    good = [encode(picture(120, 90, seed=i), quality=90) for i in range(5)]
    truncated = good[0][: len(good[0]) * 2 // 3]  # header intact: passes screening, fails decoding
    dec = DaliBatchDecoder(OPENAI_224, max_batch_size=3)
    batch = dec.decode(good[:2] + [truncated] + good[2:])
    assert dec.failed_batches == 1
    assert batch.index == [0, 1, 3, 4, 5]
    assert batch.errors[2].startswith("truncated JPEG"), batch.errors[2]
    # The pipeline was rebuilt and keeps working after the failure.
    again = dec.decode(good)
    assert again.index == list(range(5)) and dec.failed_batches == 1


@pytest.mark.gpu
@needs_cuda
def test_dali_mixed_decode_on_gpu_matches_pillow():
    images = [encode(picture(w, h, seed=w), quality=90) for w, h in [(640, 480), (480, 640), (1000, 333)]]
    pil = PillowBatchDecoder(OPENAI_224).decode(images + [b"x"])
    gpu = make_batch_decoder("dali-gpu", OPENAI_224, max_batch_size=4).decode(images + [b"x"])
    assert gpu.pixels.is_cuda and gpu.index == pil.index == [0, 1, 2]
    diff = (gpu.pixels.cpu().int() - pil.pixels.int()).abs()
    assert diff.float().mean().item() < 1.0  # nvJPEG's IDCT differs slightly from libjpeg-turbo


# ---- the backend set, owned here ---------------------------------------------------------------


def test_decode_backends_are_the_literal_type_and_validation_names_the_choices():
    from typing import get_args

    from winnow.stages.decode import (
        DECODE_BACKENDS,
        DecodeBackend,
        validate_decode_backend,
    )

    assert get_args(DecodeBackend) == DECODE_BACKENDS
    assert set(DECODE_BACKENDS) == {"auto", "nvimgcodec", "dali-gpu", "dali-cpu", "pillow"}
    assert validate_decode_backend("nvimgcodec") == "nvimgcodec"
    with pytest.raises(ValueError, match=r"decode_backend must be one of auto, nvimgcodec.*'opencv'"):
        validate_decode_backend("opencv")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_nvimgcodec_without_a_gpu_is_refused_with_the_fix():
    with pytest.raises(RuntimeError, match="nvimgcodec.*CUDA GPU.*'auto' or 'pillow'"):
        make_batch_decoder("nvimgcodec", OPENAI_224)


def test_auto_never_picks_a_gpu_decoder_for_a_cpu_model():
    assert make_batch_decoder("auto", OPENAI_224, allow_gpu_decode=False).backend in ("dali-cpu", "pillow")


# ---- GPU resize + crop and the nvImageCodec decoder's routing, on CPU ----------------------------


def torchvision_jpeg(datas: list[bytes]) -> list[torch.Tensor | None]:
    """A real JPEG decoder (libjpeg-turbo via torchvision) standing in for nvImageCodec on CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out = []
    for d in datas:
        try:
            out.append(decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB).permute(1, 2, 0))
        except RuntimeError:
            out.append(None)
    return out


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1000, 333), (100, 60), (224, 224), (20, 10)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_tensor_resize_and_crop_match_open_clips_preprocess(size, interpolation):
    from winnow.stages.decode import normalize_batch, resize_center_crop

    pre = PreprocessConfig(size=224, mean=OPENAI_224.mean, std=OPENAI_224.std, interpolation=interpolation)
    img = picture(*size, seed=size[0])
    reference = torch.from_numpy(PillowPreprocessor(pre).to_uint8(img))  # = open_clip's (tested above)
    ours = resize_center_crop([torch.from_numpy(np.array(img))], pre)[0]
    diff = (ours.int() - reference.int()).abs()
    # PIL resamples in fixed point, torch in float (both one axis at a time): a level apart at most
    # but for rare rounding ties.
    assert diff.float().mean().item() < 0.02 and diff.max().item() <= 2, (diff.float().mean().item(), diff.max().item())
    assert torch.allclose(normalize_batch(ours[None], pre), normalize_batch(reference[None], pre), atol=0.04)


def test_nvimgcodec_decoder_keeps_pillow_accounting_for_every_record_kind_cpu_stand_in():
    """The nvImageCodec decoder class with torchvision's CPU JPEG decoder in nvImageCodec's place:
    JPEGs take the tensor path; PNG, WebP, CMYK, alpha, a cut-off JPEG and junk take Pillow's."""
    from winnow.stages.decode import NvImageCodecBatchDecoder

    good = encode(picture(640, 480, seed=1), quality=90)
    images = [
        good,
        encode(picture(64, 48).convert("RGBA"), "PNG"),
        encode(picture(300, 200, seed=2), "WEBP"),
        encode(picture(64, 48).convert("CMYK")),
        good[: len(good) * 2 // 3],  # header intact, body cut off
        b"junk",
        None,
        encode(picture(100, 60).convert("L"), quality=90),
        encode(picture(480, 640, seed=3), quality=90),
    ]
    calls: list[int] = []

    def stand_in(datas):
        calls.append(len(datas))
        return torchvision_jpeg(datas)

    dec = NvImageCodecBatchDecoder(OPENAI_224, jpeg_decoder=stand_in)
    got = dec.decode(images)
    want = PillowBatchDecoder(OPENAI_224).decode(images)
    assert calls == [3]  # only the complete RGB/grey JPEGs went to the tensor path
    assert got.index == want.index and got.errors == want.errors
    assert got.errors[4].startswith("truncated") and got.errors[5].startswith("not an image")
    for k, i in enumerate(got.index):
        diff = (got.pixels[k].int() - want.pixels[k].int()).abs()
        if i in (1, 2, 3):  # Pillow path: bit-identical
            assert diff.max().item() == 0, i
        else:
            assert diff.float().mean().item() < 0.5 and diff.max().item() <= 8, i


def test_nvimgcodec_decoder_redoes_records_the_gpu_decoder_could_not_with_pillow_injected():
    """A stand-in decoder that returns nothing for one record (fault injection): Pillow decodes it."""
    from winnow.stages.decode import NvImageCodecBatchDecoder

    images = [encode(picture(120, 90, seed=i), quality=90) for i in range(4)]

    def fails_second(datas):
        out = torchvision_jpeg(datas)
        out[1] = None
        return out

    dec = NvImageCodecBatchDecoder(OPENAI_224, jpeg_decoder=fails_second)
    got = dec.decode(images)
    assert got.index == [0, 1, 2, 3] and got.errors == [None] * 4 and dec.gpu_failed == 1
    want = PillowBatchDecoder(OPENAI_224).decode(images[1:2])
    assert torch.equal(got.pixels[1], want.pixels[0])


# ---- on the GPU ---------------------------------------------------------------------------------

needs_nvimgcodec = pytest.mark.skipif(
    not (torch.cuda.is_available() and __import__("winnow.stages.decode", fromlist=["x"]).nvimgcodec_available()),
    reason="needs a CUDA GPU and nvidia-nvimgcodec",
)


@pytest.mark.gpu
@needs_nvimgcodec
@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1000, 333), (512, 384), (100, 60)])
def test_nvimgcodec_on_gpu_matches_open_clips_preprocess(size):
    from winnow.stages.decode import normalize_batch

    img = picture(*size, seed=size[1])
    data = encode(img, quality=90)
    batch = make_batch_decoder("nvimgcodec", OPENAI_224).decode([data, b"x"])
    assert batch.pixels.is_cuda and batch.index == [0] and batch.errors[1].startswith("not an image")
    ours = normalize_batch(batch.pixels, OPENAI_224)[0].cpu()
    reference = open_clip_preprocess(Image.open(io.BytesIO(data)))
    diff = (ours - reference).abs()
    # nvJPEG's IDCT and chroma upsampling differ slightly from libjpeg-turbo's; the resize too.
    assert diff.mean().item() < 0.03 and diff.max().item() < 0.5, (diff.mean().item(), diff.max().item())


def open_clip_preprocess(img: Image.Image) -> torch.Tensor:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg(size=224, mean=OPENAI_224.mean, std=OPENAI_224.std)
    return image_transform_v2(cfg, is_train=False)(img)


@pytest.mark.gpu
@needs_nvimgcodec
def test_nvimgcodec_on_gpu_keeps_pillow_accounting_for_every_record_kind():
    good = encode(picture(640, 480, seed=1), quality=90)
    images = [
        good, encode(picture(64, 48).convert("RGBA"), "PNG"), encode(picture(300, 200, seed=2), "WEBP"),
        encode(picture(64, 48).convert("CMYK")), good[: len(good) * 2 // 3], b"junk", None,
        encode(picture(100, 60).convert("L"), quality=90),
    ]
    got = make_batch_decoder("nvimgcodec", OPENAI_224).decode(images)
    want = PillowBatchDecoder(OPENAI_224).decode(images)
    assert got.index == want.index and got.errors == want.errors
    diff = (got.pixels.cpu().int() - want.pixels.int()).abs()
    assert diff.float().mean().item() < 1.0


@pytest.mark.gpu
@needs_nvimgcodec
def test_auto_prefers_nvimgcodec_for_a_gpu_model():
    assert make_batch_decoder("auto", OPENAI_224, allow_gpu_decode=True).backend == "nvimgcodec"


# ---- extra preprocessings: one decode, several models' inputs --------------------------------------

#: A second model's input, as the watermark detector takes it: 256 x 256 squash, bilinear.
SQUASH_256 = PreprocessConfig(size=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                              interpolation="bilinear", resize_mode="squash")


def extra_view_records() -> list[bytes | None]:
    good = encode(picture(640, 480, seed=1), quality=90)
    return [
        good,
        encode(picture(64, 48).convert("RGBA"), "PNG"),  # Pillow path on the bulk decoders
        good[: len(good) * 2 // 3],  # header intact, body cut off
        b"junk",
        None,
        encode(picture(100, 60).convert("L"), quality=90),
        encode(picture(300, 700, seed=3), quality=90),
    ]


def assert_views_match_pillow(got, want, pillow_rows: set[int]) -> None:
    """Same records, errors and row order as Pillow's; every view within resampling noise of
    Pillow's, bit-identical on the records the bulk decoder handed to Pillow."""
    assert got.index == want.index and got.errors == want.errors
    assert len(got.views) == len(want.views) == 1
    assert got.views[0].shape == want.views[0].shape == (len(want.index), 256, 256, 3)
    for k, i in enumerate(got.index):
        diff = (got.views[0][k].cpu().int() - want.views[0][k].int()).abs()
        if i in pillow_rows:
            assert diff.max().item() == 0, i
        else:
            assert diff.float().mean().item() < 0.5 and diff.max().item() <= 8, (i, diff.float().mean().item())


def test_pillow_decoder_gives_each_extra_preprocessing_from_one_decode(monkeypatch):
    import winnow.stages.decode as decode

    calls: list[object] = []
    real = decode.decode_image
    monkeypatch.setattr(decode, "decode_image", lambda data, **kw: (calls.append(data), real(data, **kw))[1])
    images = extra_view_records()
    plain = PillowBatchDecoder(OPENAI_224).decode(images)
    calls.clear()
    batch = PillowBatchDecoder(OPENAI_224, extra=(SQUASH_256,)).decode(images)
    assert len(calls) == len(images)  # one decode per record for both preprocessings
    assert batch.index == plain.index and batch.errors == plain.errors and torch.equal(batch.pixels, plain.pixels)
    (view,) = batch.views
    for k, i in enumerate(batch.index):
        img, _ = real(images[i])
        assert torch.equal(view[k], torch.from_numpy(PillowPreprocessor(SQUASH_256).to_uint8(img)))
    empty = PillowBatchDecoder(OPENAI_224, extra=(SQUASH_256,)).decode([b"junk"])
    assert empty.index == [] and empty.views[0].shape == (0, 256, 256, 3)


def test_nvimgcodec_decoder_resizes_the_one_decoded_tensor_for_each_preprocessing_cpu_stand_in():
    from winnow.stages.decode import NvImageCodecBatchDecoder

    images = extra_view_records()
    decoded: list[int] = []

    def stand_in(datas):
        decoded.extend(id(d) for d in datas)
        return torchvision_jpeg(datas)

    got = NvImageCodecBatchDecoder(OPENAI_224, jpeg_decoder=stand_in, extra=(SQUASH_256,)).decode(images)
    # The complete RGB/grey JPEGs were decoded once, by the tensor path, for both preprocessings.
    assert sorted(decoded) == sorted(id(images[i]) for i in (0, 5, 6))
    plain = NvImageCodecBatchDecoder(OPENAI_224, jpeg_decoder=torchvision_jpeg).decode(images)
    assert torch.equal(got.pixels, plain.pixels)
    assert_views_match_pillow(got, PillowBatchDecoder(OPENAI_224, extra=(SQUASH_256,)).decode(images), {1})


def test_nvimgcodec_decoder_keeps_views_on_their_records_when_pillow_redoes_one():
    from winnow.stages.decode import NvImageCodecBatchDecoder

    images = [encode(picture(120, 90, seed=i), quality=90) for i in range(4)]

    def fails_second(datas):
        out = torchvision_jpeg(datas)
        out[1] = None
        return out

    got = NvImageCodecBatchDecoder(OPENAI_224, jpeg_decoder=fails_second, extra=(SQUASH_256,)).decode(images)
    want = PillowBatchDecoder(OPENAI_224, extra=(SQUASH_256,)).decode(images)
    assert_views_match_pillow(got, want, {1})


@needs_dali_cpu
def test_dali_gives_each_extra_preprocessing_as_an_output_of_the_one_decode():
    images = extra_view_records()
    got = DaliBatchDecoder(OPENAI_224, max_batch_size=4, extra=(SQUASH_256,)).decode(images)
    plain = DaliBatchDecoder(OPENAI_224, max_batch_size=4).decode(images)
    assert torch.equal(got.pixels, plain.pixels)  # the main output is untouched by the extra one
    want = PillowBatchDecoder(OPENAI_224, extra=(SQUASH_256,)).decode(images)
    assert_views_match_pillow(got, want, {1})


@needs_dali_cpu
def test_dali_batch_failure_redoes_the_views_with_pillow_too():
    good = [encode(picture(120, 90, seed=i), quality=90) for i in range(3)]
    truncated = good[0][: len(good[0]) * 2 // 3]
    dec = DaliBatchDecoder(OPENAI_224, max_batch_size=4, extra=(SQUASH_256,))
    got = dec.decode([good[0], truncated, *good[1:]])
    assert dec.failed_batches == 1
    want = PillowBatchDecoder(OPENAI_224, extra=(SQUASH_256,)).decode([good[0], truncated, *good[1:]])
    assert_views_match_pillow(got, want, {0, 2, 3})


@pytest.mark.gpu
@needs_nvimgcodec
def test_nvimgcodec_on_gpu_gives_the_extra_view_of_the_same_decode():
    images = extra_view_records()
    got = make_batch_decoder("nvimgcodec", OPENAI_224, extra=(SQUASH_256,)).decode(images)
    assert got.pixels.is_cuda and got.views[0].is_cuda
    want = PillowBatchDecoder(OPENAI_224, extra=(SQUASH_256,)).decode(images)
    assert got.index == want.index and got.errors == want.errors
    diff = (got.views[0].cpu().int() - want.views[0].int()).abs()
    assert diff.float().mean().item() < 1.0  # nvJPEG's IDCT differs slightly from libjpeg-turbo's


@pytest.mark.gpu
@needs_cuda
@needs_dali_cpu
def test_dali_mixed_on_gpu_gives_the_extra_view_of_the_same_decode():
    images = extra_view_records()
    got = make_batch_decoder("dali-gpu", OPENAI_224, max_batch_size=8, extra=(SQUASH_256,)).decode(images)
    assert got.pixels.is_cuda and got.views[0].is_cuda
    want = PillowBatchDecoder(OPENAI_224, extra=(SQUASH_256,)).decode(images)
    assert got.index == want.index and got.errors == want.errors
    diff = (got.views[0].cpu().int() - want.views[0].int()).abs()
    assert diff.float().mean().item() < 1.0
