"""open_clip model registration, weights resolution (never a download) and loading."""

from __future__ import annotations

import hashlib
import logging
import os

import open_clip
import pytest
import torch

from winnow.exceptions import ModelError
from winnow.stages.models import MODEL_DIR_ENV, TINY_MODEL, load_image_model, register_model_configs, validate_model_spec


def _save_tiny_weights(path: str, seed: int = 1) -> str:
    register_model_configs()
    torch.manual_seed(seed)
    torch.save(open_clip.create_model(TINY_MODEL).state_dict(), path)
    return path


def test_register_model_configs_is_idempotent_and_adds_the_tiny_config():
    register_model_configs()
    names = open_clip.list_models()
    register_model_configs()
    assert TINY_MODEL in names
    assert open_clip.list_models() == names
    assert open_clip.get_model_config(TINY_MODEL)["embed_dim"] == 768


def test_tiny_model_reports_768_dims_and_encodes_images():
    spec = validate_model_spec(TINY_MODEL, "random", allow_random_weights=True)
    assert spec.embed_dim == 768
    assert spec.preprocess.height_width == (32, 32)
    loaded = load_image_model(TINY_MODEL, "random", allow_random_weights=True)
    assert loaded.embed_dim == 768
    with torch.inference_mode():
        out = loaded.model.encode_image(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 768)
    assert not hasattr(loaded.model, "transformer"), "text tower should be dropped"


def test_random_weights_are_refused_without_the_flag():
    with pytest.raises(ModelError, match="allow_random_weights"):
        validate_model_spec(TINY_MODEL, "random")
    with pytest.raises(ModelError, match="allow_random_weights"):
        load_image_model(TINY_MODEL, "random")


def test_random_weights_are_seeded_and_warned_on_every_load(caplog):
    with caplog.at_level(logging.WARNING, logger="winnow.stages.models"):
        a = load_image_model(TINY_MODEL, "random", allow_random_weights=True)
        b = load_image_model(TINY_MODEL, "random", allow_random_weights=True)
    assert sum("RANDOM weights" in r.getMessage() for r in caplog.records) == 2
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.weights_digest == "random-seed0"
    c = load_image_model(TINY_MODEL, "random:3", allow_random_weights=True)
    assert c.weights_digest == "random-seed3"
    assert not torch.equal(c.model.state_dict()["visual.proj"], sa["visual.proj"])


def test_weights_file_loads_and_digest_is_its_sha256(tmp_path):
    path = _save_tiny_weights(str(tmp_path / "tiny.pt"))
    loaded = load_image_model(TINY_MODEL, path)
    expected = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert loaded.weights_digest == f"sha256:{expected}"
    torch.manual_seed(1)
    reference = open_clip.create_model(TINY_MODEL).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(loaded.model.encode_image(x), reference.encode_image(x), atol=1e-6)


def test_digest_follows_the_file_when_it_changes(tmp_path):
    path = _save_tiny_weights(str(tmp_path / "tiny.pt"), seed=1)
    first = validate_model_spec(TINY_MODEL, path).weights_digest()
    _save_tiny_weights(path, seed=2)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    assert validate_model_spec(TINY_MODEL, path).weights_digest() != first


def test_tag_is_found_in_model_dir_and_via_env(tmp_path, monkeypatch):
    (tmp_path / TINY_MODEL).mkdir()
    path = _save_tiny_weights(str(tmp_path / TINY_MODEL / "mytag.pt"))
    assert validate_model_spec(TINY_MODEL, "mytag", str(tmp_path)).weights_path == path
    monkeypatch.setenv(MODEL_DIR_ENV, str(tmp_path))
    assert validate_model_spec(TINY_MODEL, "mytag").weights_path == path
    assert load_image_model(TINY_MODEL, "mytag").weights_digest.startswith("sha256:")


def test_missing_tag_names_the_path_to_put_the_weights_at(tmp_path):
    with pytest.raises(ModelError) as err:
        validate_model_spec("ViT-L-14-quickgelu", "openai", str(tmp_path))
    text = str(err.value)
    assert str(tmp_path / "ViT-L-14-quickgelu" / "openai.pt") in text
    assert "ViT-L-14.pt" in text  # where the published weights are


def test_tag_without_model_dir_says_how_to_set_one(monkeypatch):
    monkeypatch.delenv(MODEL_DIR_ENV, raising=False)
    with pytest.raises(ModelError, match=MODEL_DIR_ENV):
        validate_model_spec("ViT-L-14-quickgelu", "openai")


def test_missing_weights_file_names_the_file(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(ModelError, match="nope.safetensors"):
        validate_model_spec(TINY_MODEL, missing)


def test_unknown_model_lists_close_known_names():
    with pytest.raises(ModelError, match="ViT-L-14-quickgelu"):
        validate_model_spec("ViT-L-14-quikgelu", "openai")


def test_quickgelu_mismatch_between_tag_and_model_is_refused(tmp_path):
    with pytest.raises(ModelError, match="ViT-L-14-quickgelu"):
        validate_model_spec("ViT-L-14", "openai", str(tmp_path))


def test_openai_tag_takes_preprocess_from_the_tag_without_building(tmp_path):
    folder = tmp_path / "ViT-L-14-quickgelu"
    folder.mkdir()
    (folder / "openai.pt").write_bytes(b"not read by validation")
    spec = validate_model_spec("ViT-L-14-quickgelu", "openai", str(tmp_path))
    assert spec.embed_dim == 768
    assert spec.preprocess.height_width == (224, 224)
    assert spec.preprocess.interpolation == "bicubic"
    assert spec.preprocess.resize_mode == "shortest"
    assert spec.preprocess.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)


def test_corrupt_weights_file_is_a_model_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelError, match="bad.pt"):
        load_image_model(TINY_MODEL, str(bad))
