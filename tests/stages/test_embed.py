"""The embed stage with the tiny open_clip config and seeded random weights, on real bytes."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from tests.data._shards import write_tar
from winnow.data.index import IndexConfig, build_index
from winnow.exceptions import ModelError
from winnow.rowgroups.task import RowGroupTask, Stage
from winnow.schemas import embed_schema
from winnow.stages.decode import dali_available
from winnow.stages.embed import EmbedConfig, EmbedStage
from winnow.stages.models import TINY_MODEL


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """The same embedding up to float rounding (a batch of another size may round differently)."""
    return bool(np.allclose(a.astype(np.float32), b.astype(np.float32), rtol=0, atol=1e-3))


def tiny(**kw) -> EmbedStage:
    base = dict(model=TINY_MODEL, pretrained="random", allow_random_weights=True, batch_size=4, decode_backend="pillow")
    return EmbedStage(EmbedConfig(**(base | kw)))


def photo(width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, seed * 37 % 255)], -1)
    arr = arr + rng.normal(0, 10, arr.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(out, fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def stage() -> EmbedStage:
    s = tiny()
    s.setup()
    return s


def test_embed_stage_keeps_the_stage_contract(stage):
    assert isinstance(stage, Stage)
    assert stage.name == "embed"
    assert stage.embed_dim == 768 and stage.output_schema() == embed_schema(768)


def test_embeddings_are_768d_float16_unit_vectors(stage):
    images = [photo(64 + i, 48, seed=i) for i in range(6)]
    emb, errors = stage.embed_images(images)
    assert emb.dtype == np.float16 and emb.shape == (6, 768)
    assert errors == [None] * 6
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert len({e.tobytes() for e in emb}) == 6  # different images, different embeddings


def test_same_input_gives_the_same_output_across_stage_instances(stage):
    images = [photo(80, 60, seed=i) for i in range(5)]
    first, _ = stage.embed_images(images)
    other = tiny()
    second, _ = other.embed_images(images)
    assert np.array_equal(first, second)


def test_undecodable_records_are_counted_while_the_rest_of_the_batch_embeds(stage):
    good = photo(64, 64, seed=1)
    images = [good, b"", None, b"not an image at all", good[: len(good) // 2], photo(40, 50, 2, "PNG"), good]
    emb, errors = stage.embed_images(images)
    bad = [i for i, e in enumerate(errors) if e is not None]
    assert bad == [1, 2, 3, 4]
    assert all(errors[i].startswith("undecodable: ") for i in bad)
    assert np.isnan(emb[bad].astype(np.float32)).all()
    assert np.isfinite(emb[[0, 5, 6]].astype(np.float32)).all()
    alone, _ = stage.embed_images([good])
    # Equal up to float rounding: CPU matrix kernels may sum in another order for another batch size.
    assert _close(emb[0], alone[0]) and _close(emb[6], alone[0])


def test_embed_table_has_null_embeddings_for_undecodable_records(stage):
    images = [photo(50, 50, seed=3), b"\x00\x01"]
    table = stage.embed_table(pa.array([10, 11], pa.int64()), pa.array(["a", "b"]), images)
    assert table.schema == embed_schema(768)
    assert table.column("embedding").null_count == 1
    assert table.column("embedding")[1].as_py() is None
    assert table.column("error").to_pylist()[0] is None
    assert table.column("error")[1].as_py().startswith("undecodable: not an image")


def test_random_weights_are_refused_when_the_stage_is_made():
    with pytest.raises(ModelError, match="allow_random_weights"):
        EmbedStage(EmbedConfig(model=TINY_MODEL, pretrained="random"))


def test_missing_weights_are_refused_before_any_model_is_built(tmp_path):
    with pytest.raises(ModelError, match=str(tmp_path / "ViT-L-14-quickgelu" / "openai.pt")):
        EmbedStage(EmbedConfig(model_dir=str(tmp_path)))


@pytest.mark.parametrize(
    "knob,value", [("batch_size", 0), ("decode_backend", "opencv"), ("device", "tpu"), ("precision", "fp8")]
)
def test_bad_knobs_are_refused(knob, value):
    with pytest.raises(ValueError, match=knob):
        EmbedConfig(**{knob: value})


def test_fingerprint_ignores_device_and_batch_size_but_not_precision_or_weights():
    fp = tiny().fingerprint_config()
    assert fp == tiny(batch_size=32, device="cpu", decode_threads=1, decode_backend="auto").fingerprint_config()
    assert fp["weights_digest"] == "random-seed0" and fp["model"] == TINY_MODEL
    assert fp != tiny(precision="fp32").fingerprint_config()
    assert fp != tiny(pretrained="random:1").fingerprint_config()


def test_stage_pickles_without_its_model_and_sets_up_again(stage):
    clone = pickle.loads(pickle.dumps(stage))
    assert clone._loaded is None
    images = [photo(64, 48, seed=9)]
    assert np.array_equal(clone.embed_images(images)[0], stage.embed_images(images)[0])


@pytest.mark.skipif(not dali_available("cpu"), reason="nvidia-dali not importable")
def test_dali_cpu_embeddings_are_close_to_pillow_embeddings(stage):
    images = [photo(300 + 17 * i, 200 + 11 * i, seed=i) for i in range(6)]
    dali_stage = tiny(decode_backend="dali-cpu")
    assert dali_stage.decode_backend == "dali-cpu"
    a, _ = stage.embed_images(images)
    b, _ = dali_stage.embed_images(images)
    cosine = (a.astype(np.float32) * b.astype(np.float32)).sum(axis=1)
    assert cosine.min() > 0.99


def test_process_embeds_a_row_group_from_the_index_and_shards(tmp_path, stage):
    members = []
    for i in range(5):
        members.append((f"r{i:03d}.jpg", photo(60, 40, seed=i) if i != 2 else b"corrupt bytes"))
        members.append((f"r{i:03d}.txt", f"caption {i}".encode()))
    write_tar(str(tmp_path / "in" / "shard-0000.tar"), members)
    run_root = str(tmp_path / "run")
    result = build_index(run_root, IndexConfig(input_uri=str(tmp_path / "in"), buffer_size=3))
    tables = [stage.process(RowGroupTask(run_root, result.plan, result.plan.partition_of(rg), rg)) for rg in range(2)]
    table = pa.concat_tables(tables)
    assert table.column("record_id").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("key").to_pylist() == [f"r{i:03d}" for i in range(5)]
    assert [e is not None for e in table.column("error").to_pylist()] == [False, False, True, False, False]
    assert table.column("embedding").null_count == 1
    direct, _ = stage.embed_images([photo(60, 40, seed=0)])
    assert _close(np.array(table.column("embedding")[0].as_py(), dtype=np.float16), direct[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_dali_mixed_decode_and_bf16_embeddings_are_close_to_cpu_fp32(stage):
    images = [photo(640, 480, seed=i) for i in range(8)] + [b"bad"]
    gpu = tiny(device="cuda", decode_backend="dali-gpu", batch_size=8)
    assert gpu.decode_backend == "dali-gpu"
    a, errors_a = stage.embed_images(images)
    b, errors_b = gpu.embed_images(images)
    assert [e is None for e in errors_a] == [e is None for e in errors_b]
    cosine = (a[:8].astype(np.float32) * b[:8].astype(np.float32)).sum(axis=1)
    assert cosine.min() > 0.98


def _exact_duplicate_index(tmp_path):
    """One row group: r002 repeats r000's bytes, r004 repeats the undecodable r003's bytes."""
    a, b = photo(60, 40, seed=1), photo(50, 44, seed=2)
    members = [("r000.jpg", a), ("r001.jpg", b), ("r002.jpg", a), ("r003.jpg", b"corrupt"), ("r004.jpg", b"corrupt")]
    write_tar(str(tmp_path / "in" / "shard-0000.tar"), members)
    run_root = str(tmp_path / "run")
    result = build_index(run_root, IndexConfig(input_uri=str(tmp_path / "in"), buffer_size=5))
    return run_root, result.plan


def spy_on_read_members(monkeypatch) -> list[list[str]]:
    """Test-only spy: the keys of every index table whose image bytes are read."""
    import winnow.data.reader as reader

    real = reader.read_members
    calls: list[list[str]] = []

    def spy(index, member="image", **kw):
        calls.append(index.column("key").to_pylist())
        return real(index, member, **kw)

    monkeypatch.setattr(reader, "read_members", spy)
    return calls


def test_spy_exact_duplicates_are_not_read_nor_embedded_and_get_null_embedding_and_error(tmp_path, stage, monkeypatch):
    run_root, plan = _exact_duplicate_index(tmp_path)
    calls = spy_on_read_members(monkeypatch)
    table = stage.process(RowGroupTask(run_root, plan, 0, 0))
    assert calls == [["r000", "r001", "r003"]]  # r002 and r004 (exact duplicates) never read
    assert table.schema == embed_schema(768)
    assert table.column("record_id").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("key").to_pylist() == ["r000", "r001", "r002", "r003", "r004"]
    emb = table.column("embedding").to_pylist()
    errors = table.column("error").to_pylist()
    assert [e is None for e in emb] == [False, False, True, True, True]
    assert errors[2] is None and errors[4] is None and errors[3].startswith("undecodable: ")
    assert errors[0] is None and errors[1] is None
    direct, _ = stage.embed_images([photo(60, 40, seed=1)])
    assert _close(np.array(emb[0], dtype=np.float16), direct[0])
