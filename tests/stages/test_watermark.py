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


# ---- the watermark filter's compute: the embed stage, one decode for both models -----------------


def encoded(image: np.ndarray, fmt: str = "JPEG") -> bytes:
    import io

    out = io.BytesIO()
    Image.fromarray(image).save(out, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return out.getvalue()


#: Records of the embed tests: JPEGs and a PNG of several sizes, one undecodable, one missing.
RECORDS = [encoded(IMAGES[0]), encoded(IMAGES[1], "PNG"), b"not an image", encoded(IMAGES[2]),
           encoded(photo(3, 120, 330)), None]


class CountingDecodeImageForTests:
    """Test-only fake: wraps :func:`winnow.stages.decode.decode_image` (every Pillow decode of a
    record's bytes) and counts its calls per input, so a test sees how often each record is decoded."""

    def __init__(self, real):
        self.real = real
        self.calls: list[bytes | None] = []

    def __call__(self, data, **kw):
        self.calls.append(data)  # list.append is atomic: the decoder's threads may call at once
        return self.real(data, **kw)


@pytest.fixture
def count_decodes(monkeypatch):
    import winnow.stages.decode as decode

    counter = CountingDecodeImageForTests(decode.decode_image)
    monkeypatch.setattr(decode, "decode_image", counter)
    return counter


def watermark_stage(**kw):
    from winnow.stages.embed import EmbedConfig, EmbedStage
    from winnow.stages.models import TINY_MODEL

    base = dict(model=TINY_MODEL, pretrained="random", allow_random_weights=True, batch_size=4,
                decode_backend="pillow", device="cpu", watermark=True)
    return EmbedStage(EmbedConfig(**(base | kw)))


@pytest.fixture(scope="module")
def stage():
    """The embed stage with the filter on, set up once (the tiny CLIP model and the detector)."""
    s = watermark_stage()
    s.setup()
    return s


def reference_scores(model, records: list, batch_size: int = 4) -> np.ndarray:
    """P(watermark) of each record as the published pipeline computes it: Pillow decode, then
    the published transform (watermark_pixels) and the model; NaN where it does not decode."""
    from winnow.stages.decode import decode_image

    out = np.full(len(records), np.nan, np.float32)
    decoded = [(i, img) for i, (img, _) in enumerate(decode_image(r) for r in records) if img is not None]
    for start in range(0, len(decoded), batch_size):  # the stage's batches of decoded images
        part = decoded[start : start + batch_size]
        out[[i for i, _ in part]] = score_watermark(model, watermark_pixels([img for _, img in part]),
                                                    batch_size=batch_size)
    return out


def test_embed_stage_with_the_filter_on_scores_each_image_from_its_one_decode(stage, random_model, count_decodes):
    import pyarrow as pa

    table = stage.embed_table(pa.array(range(len(RECORDS)), pa.int64()), pa.array([f"k{i}" for i in range(6)]), RECORDS)
    # Every record went through the decoder exactly once, though two models read each image.
    assert sorted(map(id, count_decodes.calls)) == sorted(map(id, RECORDS))
    assert table.schema.field("watermark_score").type == pa.float32()
    scores = table.column("watermark_score").to_pylist()
    embedded = table.column("embedding").is_valid().to_pylist()
    # Null exactly where there is no embedding (undecodable, missing bytes).
    assert [s is not None for s in scores] == embedded == [True, True, False, True, True, False]
    want = reference_scores(random_model[0], RECORDS)
    got = np.array([np.nan if s is None else s for s in scores], np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.ptp(want[~np.isnan(want)]) > 1e-3  # the images do not all score alike


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["nvimgcodec", "dali-gpu", "pillow"])
def test_embed_stage_on_gpu_scores_each_image_from_its_one_gpu_decode(random_model, count_decodes, backend):
    """On the GPU the decoder hands the detector its view of the same decoded image (nvImageCodec:
    the decoded tensor resized twice; DALI: a second output): no record is decoded twice, and the
    scores match the CPU reference within bf16 and GPU-resampling noise."""
    import pyarrow as pa

    from winnow.stages.decode import backend_available

    if not backend_available(backend, gpu=True):
        pytest.skip(f"decode backend {backend} is not installed")
    stage = watermark_stage(device="cuda", decode_backend=backend)
    stage.setup()
    assert stage.decode_backend == backend
    count_decodes.calls.clear()
    table = stage.embed_table(pa.array(range(len(RECORDS)), pa.int64()), pa.array([f"k{i}" for i in range(6)]), RECORDS)
    calls = [id(c) for c in count_decodes.calls]
    assert len(calls) == len(set(calls))  # Pillow decoded no record twice
    if backend != "pillow":
        assert not {id(RECORDS[i]) for i in (0, 3, 4)} & set(calls)  # the JPEGs: GPU-decoded only
    scores = table.column("watermark_score").to_pylist()
    assert [s is not None for s in scores] == table.column("embedding").is_valid().to_pylist()
    got = np.array([np.nan if s is None else s for s in scores], np.float32)
    np.testing.assert_allclose(got, reference_scores(random_model[0], RECORDS), rtol=0, atol=0.06)


def test_embed_output_and_fingerprint_gain_the_watermark_only_while_the_filter_is_on():
    from winnow.schemas import embed_schema

    on, off = watermark_stage(), watermark_stage(watermark=False)
    assert off.output_schema() == embed_schema(off.embed_dim) and "watermark" not in off.fingerprint_config()
    assert on.output_schema().names == [*embed_schema(on.embed_dim).names, "watermark_score"]
    wm = on.fingerprint_config()["watermark"]
    assert wm["weights_digest"] == f"random-seed{RANDOM_SEED}" and wm["preprocess"]["size"] == [256, 256]
    assert {k: v for k, v in on.fingerprint_config().items() if k != "watermark"} == off.fingerprint_config()


def test_the_watermark_column_is_the_filters_and_the_view_is_the_published_transform():
    from winnow.filters import BY_NAME
    from winnow.stages.decode import PillowBatchDecoder, normalize_batch
    from winnow.stages.models import PreprocessConfig
    from winnow.stages.watermark import SCORE_COLUMN, WATERMARK_PREPROCESS

    assert BY_NAME["watermark"].column_names == (SCORE_COLUMN,) == ("watermark_score",)
    clip = PreprocessConfig(size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    batch = PillowBatchDecoder(clip, extra=(WATERMARK_PREPROCESS,)).decode([encoded(a) for a in IMAGES])
    (view,) = batch.views
    assert batch.pixels.shape == (3, 64, 64, 3) and view.shape == (3, 256, 256, 3)
    from winnow.stages.decode import decode_image

    published = watermark_pixels([decode_image(encoded(a))[0] for a in IMAGES])
    assert torch.equal(normalize_batch(view, WATERMARK_PREPROCESS), published)


def test_fused_worker_with_the_filter_on_commits_the_per_row_group_stages_scores(tmp_path, stage, count_decodes):
    """The fused worker (reads, decode, both models, commits overlapped) on CPU: its tables equal
    the per-row-group stage's bit for bit, scores included, and each record is decoded once."""
    from winnow.data.index import IndexConfig, build_index
    from winnow.data.sample import generate_sample
    from winnow.execution import LOCAL
    from winnow.ray.runner import run_stage_partition
    from winnow.rowgroups import CommitStore
    from winnow.rowgroups.task import RowGroupTask

    generate_sample(str(tmp_path / "in"), shards=2, per_shard=3, seed=4, corrupt=True)
    run_root = str(tmp_path / "run")
    plan = build_index(run_root, IndexConfig(input_uri=str(tmp_path / "in"), buffer_size=4, max_partitions=1)).plan
    summary = run_stage_partition(stage, run_root=run_root, plan=plan, partition=0, execution=LOCAL)
    assert summary.ok and summary.computed == plan.num_row_groups >= 2, summary.to_dict()
    assert stage.row_group_pipeline().stats.row_groups >= 2  # the fused worker ran
    store = CommitStore(run_root)
    index = [store.read_table("index", 0, rg) for rg in plan.partition_row_groups(0)]
    decodable = sum(t.num_rows - t.column("exact_duplicate_of").is_valid().to_numpy(zero_copy_only=False).sum()
                    for t in index)
    assert len(count_decodes.calls) == decodable  # one decode per record (exact duplicates: none)
    for rg in plan.partition_row_groups(0):
        got = store.read_table("embed", 0, rg)
        want = stage.process(RowGroupTask(run_root, plan, 0, rg))
        assert got.equals(want), rg
        assert got.column("watermark_score").null_count == got.column("embedding").null_count


def test_fused_worker_in_gpu_mode_on_cpu_carries_scores_through_padded_batches(tmp_path, stage):
    """Fixed batches across row groups, the last padded, host buffers handed round (the GPU
    worker's shape, run on CPU): the scores land on their records."""
    from winnow.data.index import IndexConfig, build_index
    from winnow.data.sample import generate_sample
    from winnow.rowgroups import CommitStore
    from winnow.rowgroups.task import RowGroupTask
    from winnow.stages.embed_worker import HOST_BUFFERS, EmbedPipeline

    generate_sample(str(tmp_path / "in"), shards=1, per_shard=5, seed=6)
    run_root = str(tmp_path / "run")
    plan = build_index(run_root, IndexConfig(input_uri=str(tmp_path / "in"), buffer_size=2, max_partitions=1)).plan
    pipeline = EmbedPipeline(stage, fixed_batches=True, read_ahead=2)
    store = CommitStore(run_root)
    tasks = [RowGroupTask(run_root, plan, 0, rg) for rg in plan.partition_row_groups(0)]
    outcomes = list(pipeline.run(tasks, lambda t, table: store.commit_table("embed", 0, t.row_group, table)))
    assert all(o.ok for o in outcomes) and len(outcomes) == len(tasks) == 3
    assert pipeline.stats.padded_slots > 0 and pipeline._buffers.qsize() == HOST_BUFFERS
    for task in tasks:
        got = store.read_table("embed", 0, task.row_group).column("watermark_score").to_numpy(zero_copy_only=False)
        want = stage.process(task).column("watermark_score").to_numpy(zero_copy_only=False)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # other batch compositions: rounding only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_worker_on_gpu_commits_scores_that_match_the_cpu_stage(tmp_path, stage):
    """The GPU worker's shape for real: GPU decode (auto), fixed bf16 batches across row groups,
    pinned host buffers for embeddings and scores."""
    from winnow.data.index import IndexConfig, build_index
    from winnow.data.sample import generate_sample
    from winnow.execution import LOCAL
    from winnow.ray.runner import run_stage_partition
    from winnow.rowgroups import CommitStore
    from winnow.rowgroups.task import RowGroupTask

    generate_sample(str(tmp_path / "in"), shards=2, per_shard=5, seed=4, corrupt=True)
    run_root = str(tmp_path / "run")
    plan = build_index(run_root, IndexConfig(input_uri=str(tmp_path / "in"), buffer_size=3, max_partitions=1)).plan
    gpu = watermark_stage(device="cuda", decode_backend="auto")
    summary = run_stage_partition(gpu, run_root=run_root, plan=plan, partition=0, execution=LOCAL)
    assert summary.ok and summary.computed == plan.num_row_groups, summary.to_dict()
    assert gpu.fixed_batches and gpu.row_group_pipeline().stats.row_groups == plan.num_row_groups
    store = CommitStore(run_root)
    for rg in plan.partition_row_groups(0):
        got = store.read_table("embed", 0, rg)
        want = stage.process(RowGroupTask(run_root, plan, 0, rg))
        assert got.column("error").equals(want.column("error")), rg
        a = got.column("watermark_score").to_numpy(zero_copy_only=False)
        b = want.column("watermark_score").to_numpy(zero_copy_only=False)
        assert np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(
            np.isnan(a), got.column("embedding").is_null().to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(a, b, rtol=0, atol=0.06)


def test_run_config_turns_the_detector_on_with_the_filter_and_checks_its_weights(tmp_path):
    from tests._tiny import tiny_config
    from winnow.exceptions import ConfigError

    def cfg(**kw):
        return tiny_config(input_uri=str(tmp_path), output_root=str(tmp_path / "out"), run_key="r", **kw)

    path = tmp_path / "watermark_model_v1.pt"
    path.write_bytes(b"x")
    assert cfg().stage_config("embed").watermark is False
    # Off: a good file is not read (nothing loads it, nothing fingerprints it).
    off = cfg(watermark_weights=str(path), allow_random_weights=False).stage_config("embed")
    assert off.watermark is False and off.watermark_weights is None
    on = cfg(watermark_keep_fraction=0.5).stage_config("embed")
    assert on.watermark is True and on.watermark_weights is None  # random weights, allowed here
    assert cfg(watermark_threshold=0.5, watermark_weights=str(path)).stage_config("embed").watermark_weights == str(path)
    with pytest.raises(ConfigError, match="watermark_weights is not set") as err:
        cfg(watermark_threshold=0.5, allow_random_weights=False).stage_config("embed")
    assert "allow_random_weights" in str(err.value)
    # A wrong path is refused on or off, naming the param and the path.
    for on_or_off in ({"watermark_threshold": 0.5}, {}):
        with pytest.raises(ConfigError, match="watermark_weights: no such file .*nope.pt"):
            cfg(watermark_weights=str(tmp_path / "nope.pt"), **on_or_off).stage_config("embed")
        with pytest.raises(ConfigError, match="watermark_weights: 's3://b/w.pt' is a URI; .*local files only"):
            cfg(watermark_weights="s3://b/w.pt", **on_or_off).stage_config("embed")


# ---- the filter in a whole run ---------------------------------------------------------------------


def _files(run_root: str, stage: str) -> list[str]:
    import os

    return sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(run_root, stage))
                  for f in fs if f.startswith("rg") and f.endswith(".parquet"))


def test_a_run_with_the_watermark_filter_drops_the_most_watermarked_and_counts_them(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests._tiny import tiny_config
    from winnow.data.sample import generate_sample
    from winnow.pipeline import run_all

    generate_sample(str(tmp_path / "in"), shards=2, per_shard=6, seed=2, corrupt=True)

    def cfg(run_key, **kw):
        return tiny_config(input_uri=str(tmp_path / "in"), output_root=str(tmp_path / "out"), run_key=run_key,
                           buffer_size=6, max_partitions=2, batch_size=4, **kw)

    off = cfg("off")
    run_all(off, backend="local")
    assert all("watermark_score" not in pq.read_schema(f).names for f in _files(off.run_root, "embed"))
    assert "watermark" not in json.loads((tmp_path / "out" / "off" / "embed" / "_stage.json").read_text())["config"]

    on = cfg("on", watermark_keep_fraction=0.5)
    summary = run_all(on, backend="local")
    embed = pa.concat_tables(pq.read_table(f) for f in _files(on.run_root, "embed"))
    scores = embed.column("watermark_score").to_numpy(zero_copy_only=False)
    assert np.array_equal(np.isnan(scores), embed.column("embedding").is_null().to_numpy(zero_copy_only=False))
    scored = scores[~np.isnan(scores)]
    thresholds = json.loads((tmp_path / "out" / "on" / "thresholds" / "thresholds.json").read_text())
    entry = thresholds["filters"]["watermark"]
    t = entry["threshold"]
    # The fraction keeps the lowest half of the scores (ties of the k-th included).
    assert entry["keep_count"] == round(len(scored) * 0.5) and (scored < t).sum() >= entry["keep_count"]
    assert (scored < t).sum() == (scored <= np.sort(scored)[entry["keep_count"] - 1]).sum()
    status = pa.concat_tables(pq.read_table(f) for f in _files(on.run_root, "status")).to_pylist()
    dropped = [r for r in status if r["outcome"] == "watermark"]
    assert dropped and summary["watermark_dropped"] == len(dropped)
    for r in dropped:
        assert r["watermark_score"] >= t
        assert r["reason"].startswith(f"watermark_score {r['watermark_score']:.4f} >= threshold ")
        assert "(watermark_keep_fraction=0.5)" in r["reason"]
    assert all(r["watermark_score"] < t for r in status if r["outcome"] in ("kept", "duplicate"))
    fingerprint = json.loads((tmp_path / "out" / "on" / "embed" / "_stage.json").read_text())["config"]
    assert fingerprint["watermark"]["weights_digest"] == f"random-seed{RANDOM_SEED}"
