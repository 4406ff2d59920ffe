"""The LAION watermark detector's compute: model layout, weight loading rules, preprocessing and
P(watermark) (CPU; efficientnet-b3 at 256 px, so a few images per test)."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from winnow.exceptions import HeadError
from winnow.stages.watermark import (
    RANDOM_SEED,
    WATERMARK_INPUT_PX,
    build_watermark_model,
    load_watermark_model,
    score_watermark,
    watermark_pixels,
    watermark_weights_digest,
)


def photo(seed: int, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8: gradients, stripes and noise, so images differ in content and layout."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 / width, y * 255 / height, ((x // (5 + seed) + y // 7) % 2) * (60.0 + 40 * seed)], -1)
    return np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8)


IMAGES = [photo(0, 300, 200), photo(1, 180, 240), photo(2, 256, 256)]


@pytest.fixture(scope="module")
def random_model():
    model, digest = load_watermark_model(None, allow_random_weights=True, device="cpu")
    return model, digest


@pytest.fixture(scope="module")
def pixels():
    return watermark_pixels(IMAGES)


@pytest.fixture(scope="module")
def random_scores(random_model, pixels):
    return score_watermark(random_model[0], pixels)


def test_model_has_the_published_classifier_on_an_efficientnet_b3_backbone():
    shapes = {k: tuple(v.shape) for k, v in build_watermark_model().state_dict().items()}
    assert {k: v for k, v in shapes.items() if k.startswith("classifier.")} == {
        "classifier.0.weight": (625, 1536), "classifier.0.bias": (625,),
        "classifier.3.weight": (256, 625), "classifier.3.bias": (256,),
        "classifier.5.weight": (2, 256), "classifier.5.bias": (2,),
    }
    # The backbone is timm's own (its keys are the published checkpoint's): stem, blocks, head.
    assert shapes["conv_stem.weight"] == (40, 3, 3, 3) and shapes["conv_head.weight"] == (1536, 384, 1, 1)


def test_random_model_scores_are_probabilities_that_depend_on_the_image(random_model, random_scores):
    _, digest = random_model
    assert digest == f"random-seed{RANDOM_SEED}"
    assert random_scores.dtype == np.float32 and random_scores.shape == (len(IMAGES),)
    assert np.all((random_scores >= 0) & (random_scores <= 1))
    assert np.ptp(random_scores) > 1e-3, random_scores  # not one constant for every image


def test_random_weights_are_the_same_on_every_load_whatever_the_global_rng(random_model):
    torch.manual_seed(12345)
    again, _ = load_watermark_model(None, allow_random_weights=True, device="cpu")
    first = random_model[0].state_dict()
    assert all(torch.equal(first[k], v) for k, v in again.state_dict().items())


def test_random_weights_log_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="winnow.stages.watermark"):
        load_watermark_model(None, allow_random_weights=True, device="cpu")
    assert "RANDOM weights" in caplog.text


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_saved_state_dict_loads_and_scores_exactly_as_the_model_it_came_from(
    suffix, tmp_path, random_model, pixels, random_scores
):
    from safetensors.torch import save_file

    path = tmp_path / f"watermark{suffix}"
    state = {k: v.contiguous() for k, v in random_model[0].state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model, digest = load_watermark_model(str(path), allow_random_weights=False, device="cpu")
    assert digest == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == watermark_weights_digest(str(path), allow_random_weights=False)
    np.testing.assert_array_equal(score_watermark(model, pixels), random_scores)


def test_state_dict_wrapped_in_a_checkpoint_dict_loads(tmp_path, random_model):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": random_model[0].state_dict()}, path)
    model, _ = load_watermark_model(str(path), allow_random_weights=False, device="cpu")
    assert torch.equal(model.state_dict()["classifier.5.weight"], random_model[0].state_dict()["classifier.5.weight"])


def test_random_weights_are_refused_unless_asked_for():
    with pytest.raises(HeadError, match="allow_random_weights") as err:
        load_watermark_model(None, allow_random_weights=False, device="cpu")
    assert "watermark_weights" in str(err.value)
    with pytest.raises(HeadError, match="allow_random_weights"):
        watermark_weights_digest(None, allow_random_weights=False)


@pytest.mark.parametrize("weights", ["s3://bucket/watermark_model_v1.pt", "https://example.org/watermark_model_v1.pt"])
def test_uri_weights_are_refused_as_not_local(weights):
    with pytest.raises(HeadError, match="local files only") as err:
        load_watermark_model(weights, allow_random_weights=True, device="cpu")
    assert weights in str(err.value)


def test_missing_weights_file_is_refused_naming_it(tmp_path):
    missing = str(tmp_path / "nope" / "watermark_model_v1.pt")
    with pytest.raises(HeadError, match="not found") as err:
        load_watermark_model(missing, allow_random_weights=True, device="cpu")
    assert missing in str(err.value) and "watermark_weights" in str(err.value)
    with pytest.raises(HeadError, match="not found"):
        watermark_weights_digest(missing, allow_random_weights=True)


def test_unknown_file_type_is_refused(tmp_path):
    path = tmp_path / "watermark.onnx"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(HeadError, match="unknown file type"):
        load_watermark_model(str(path), allow_random_weights=False, device="cpu")


def test_corrupt_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "watermark.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(HeadError, match="could not read") as err:
        load_watermark_model(str(path), allow_random_weights=False, device="cpu")
    assert str(path) in str(err.value)


def test_wrong_shape_state_dict_is_refused_naming_the_file_key_and_expected_shape(tmp_path, random_model):
    state = dict(random_model[0].state_dict())
    state["classifier.5.weight"] = torch.zeros(3, 256)  # a 3-class head
    path = tmp_path / "three_classes.pt"
    torch.save(state, path)
    with pytest.raises(HeadError, match="do not fit") as err:
        load_watermark_model(str(path), allow_random_weights=False, device="cpu")
    message = str(err.value)
    assert str(path) in message and "classifier.5.weight" in message and "(3, 256)" in message and "(2, 256)" in message


def test_state_dict_of_another_model_is_refused_listing_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "aesthetic.pt"
    torch.save({"layers.0.weight": torch.zeros(1024, 768), "layers.0.bias": torch.zeros(1024)}, path)
    with pytest.raises(HeadError) as err:
        load_watermark_model(str(path), allow_random_weights=False, device="cpu")
    message = str(err.value)
    assert "missing keys ['conv_stem.weight', 'bn1.weight'" in message and "more" in message
    assert "unexpected keys ['layers.0.weight', 'layers.0.bias']" in message and str(path) in message


def test_state_dict_without_batchnorm_step_counters_loads(tmp_path, random_model):
    state = {k: v for k, v in random_model[0].state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "no_counters.pt"
    torch.save(state, path)
    load_watermark_model(str(path), allow_random_weights=False, device="cpu")


def test_pixels_are_the_same_from_pil_numpy_and_chw_tensor_input(pixels):
    pil = watermark_pixels([Image.fromarray(a) for a in IMAGES])
    chw = watermark_pixels([torch.from_numpy(a).permute(2, 0, 1) for a in IMAGES])
    assert pixels.shape == (len(IMAGES), 3, WATERMARK_INPUT_PX, WATERMARK_INPUT_PX) and pixels.dtype == torch.float32
    assert torch.equal(pil, pixels) and torch.equal(chw, pixels)
    assert torch.equal(watermark_pixels(IMAGES, num_threads=3), pixels)


def test_pixels_equal_the_published_torchvision_transform(pixels):
    from torchvision import transforms as T

    published = T.Compose([
        T.Resize((WATERMARK_INPUT_PX, WATERMARK_INPUT_PX)),
        T.ToTensor(),
        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    expected = torch.stack([published(Image.fromarray(a)) for a in IMAGES])
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-6)


def test_non_rgb_pil_images_are_converted_to_rgb():
    grey = Image.fromarray(IMAGES[0]).convert("L")
    out = watermark_pixels([grey, grey.convert("RGBA")])
    assert out.shape == (2, 3, WATERMARK_INPUT_PX, WATERMARK_INPUT_PX)
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize(
    "bad",
    [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), torch.zeros(8, 8, 3, dtype=torch.uint8), "img.jpg"],
    ids=["grey-array", "float-array", "hwc-tensor", "path"],
)
def test_malformed_inputs_are_refused_naming_the_image(bad):
    with pytest.raises((ValueError, TypeError), match="image 1"):
        watermark_pixels([IMAGES[0], bad])


def test_no_images_give_empty_pixels_and_scores(random_model):
    empty = watermark_pixels([])
    assert empty.shape == (0, 3, WATERMARK_INPUT_PX, WATERMARK_INPUT_PX)
    assert score_watermark(random_model[0], empty).shape == (0,)


def test_batched_scores_equal_per_image_scores(random_model, pixels, random_scores):
    one_by_one = score_watermark(random_model[0], pixels, batch_size=1)
    np.testing.assert_allclose(one_by_one, random_scores, rtol=0, atol=1e-5)


def test_scores_are_softmax_column_zero_of_the_logits(random_model, pixels, random_scores):
    with torch.no_grad():
        logits = random_model[0](pixels)
    np.testing.assert_allclose(torch.softmax(logits, 1)[:, 0].numpy(), random_scores, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_scores_match_cpu_fp32_scores(random_model, pixels, random_scores):
    model, _ = load_watermark_model(None, allow_random_weights=True, device="cuda")
    batch = pixels.repeat(4, 1, 1, 1)  # 12 images: several batches of 5
    scores = score_watermark(model, batch, batch_size=5)
    assert scores.dtype == np.float32 and np.all((scores >= 0) & (scores <= 1))
    np.testing.assert_allclose(scores, np.tile(random_scores, 4), rtol=0, atol=0.05)
    fp32 = score_watermark(model, pixels, bf16=False)
    np.testing.assert_allclose(fp32, random_scores, rtol=0, atol=1e-3)
