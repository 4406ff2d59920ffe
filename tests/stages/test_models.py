"""open_clip model registration, weights resolution (never a download) and loading."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import open_clip
import pytest
import torch

from winnow.exceptions import ModelError
from winnow.stages.models import (
    BPE_VOCAB_SIZE,
    MODEL_CONFIG_DIR,
    MODEL_DIR_ENV,
    TINY_MODEL,
    load_image_model,
    load_text_model,
    register_model_configs,
    tokenizer_spec,
    validate_model_spec,
)


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


# ---- text towers (clip_score) ---------------------------------------------------------------


def _seeded_clip(model_name: str = TINY_MODEL, seed: int = 0) -> torch.nn.Module:
    register_model_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(model_name).eval()


def test_text_and_image_towers_are_halves_of_one_seeded_model():
    text = load_text_model(TINY_MODEL, "random", allow_random_weights=True)
    image = load_image_model(TINY_MODEL, "random", allow_random_weights=True)
    clip = _seeded_clip()
    tokens = text.tokenize(["a red circle", "two blue squares on a striped field"])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(text.model.encode_text(tokens), clip.encode_text(tokens), rtol=1e-5, atol=1e-5)
        assert torch.allclose(image.model.encode_image(pixels), clip.encode_image(pixels), atol=1e-6)
        assert text.model.encode_text(tokens, normalize=True).norm(dim=-1).sub(1).abs().max() < 1e-5
    assert not hasattr(text.model, "visual"), "image tower should be dropped"
    assert text.embed_dim == image.embed_dim == 768
    assert text.weights_digest == image.weights_digest == "random-seed0"


def test_text_tower_uses_open_clips_builtin_bpe_tokenizer_and_context_length():
    spec = tokenizer_spec(TINY_MODEL)
    assert spec.kind == "open_clip.SimpleTokenizer" and spec.context_length == 16
    assert spec.vocab_digest.startswith("sha256:")
    text = load_text_model(TINY_MODEL, "random", allow_random_weights=True)
    reference = open_clip.get_tokenizer(TINY_MODEL)
    captions = ["a red circle", "word " * 40]
    assert torch.equal(text.tokenize(captions), reference(captions))
    assert text.tokenize(captions).shape == (2, 16)
    assert int(text.tokenize(captions).max()) == BPE_VOCAB_SIZE - 1 < text.model.vocab_size  # <end_of_text>
    assert tokenizer_spec("ViT-L-14-quickgelu").context_length == 77


def _config_variant(tmp_path, name: str, **text_cfg) -> str:
    cfg = json.loads((MODEL_CONFIG_DIR / f"{TINY_MODEL}.json").read_text())
    cfg["text_cfg"].update(text_cfg)
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    return name


def test_tiny_image_tower_does_not_depend_on_the_text_vocabulary(tmp_path):
    # open_clip builds the image tower first under the seeded RNG: the text vocabulary (raised
    # to the BPE tokenizer's 49408 for clip_score) leaves image weights and embeddings as they were.
    small = _seeded_clip(_config_variant(tmp_path, "winnow-test-vocab512", vocab_size=512))
    tiny = _seeded_clip()
    a, b = small.visual.state_dict(), tiny.visual.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert tiny.token_embedding.num_embeddings == BPE_VOCAB_SIZE


def test_text_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path):
    name = _config_variant(tmp_path, "winnow-test-vocab-small", vocab_size=512)
    with pytest.raises(ModelError, match="vocab_size >= 49408"):
        tokenizer_spec(name)
    with pytest.raises(ModelError, match="vocab_size >= 49408"):
        load_text_model(name, "random", allow_random_weights=True)


def test_out_of_vocabulary_token_ids_raise_instead_of_being_clamped():
    text = load_text_model(TINY_MODEL, "random", allow_random_weights=True)
    tokens = torch.zeros(1, 16, dtype=torch.long)
    tokens[0, 1] = text.model.vocab_size
    with pytest.raises(ModelError, match="outside the text tower's vocabulary"):
        text.model.encode_text(tokens)


def test_models_with_downloaded_tokenizers_are_refused():
    with pytest.raises(ModelError, match="built-in BPE tokenizer"):
        tokenizer_spec("ViT-B-16-SigLIP")


def test_text_tower_loads_from_a_weights_file(tmp_path):
    path = _save_tiny_weights(str(tmp_path / "tiny.pt"), seed=1)
    text = load_text_model(TINY_MODEL, path)
    assert text.weights_digest == f"sha256:{hashlib.sha256(open(path, 'rb').read()).hexdigest()}"
    reference = _seeded_clip(seed=1)
    tokens = text.tokenize(["a green line"])
    with torch.inference_mode():
        assert torch.allclose(text.model.encode_text(tokens), reference.encode_text(tokens), rtol=1e-5, atol=1e-5)


# ---- checking a model without importing open_clip ------------------------------------------------

_NO_OPEN_CLIP = r"""
import json, sys
from winnow.stages.models import TINY_MODEL, tokenizer_spec, validate_model_spec
spec = validate_model_spec(TINY_MODEL, "random:3", allow_random_weights=True)
out = {"spec": [spec.model_name, spec.embed_dim, spec.preprocess.to_dict()], "tokenizer": tokenizer_spec(TINY_MODEL).to_dict(),
       "open_clip_loaded": "open_clip" in sys.modules}
if len(sys.argv) > 1:
    spec = validate_model_spec("ViT-B-32", sys.argv[1])
    out["file"] = [spec.model_name, spec.embed_dim, spec.preprocess.to_dict()]
    out["open_clip_loaded"] = "open_clip" in sys.modules
print(json.dumps(out, default=list))
"""


def test_a_model_is_checked_without_importing_open_clip_and_as_open_clip_would(tmp_path):
    """The driver, every Airflow task and every resume check the model first: open_clip's import
    (seconds: torchvision, torch._dynamo) is left to the workers that build the model. What the
    check gives without it equals what it gives with open_clip loaded."""
    import json
    import subprocess
    import sys

    import open_clip

    from winnow.stages.models import TINY_MODEL, tokenizer_spec, validate_model_spec

    weights = tmp_path / "b32.safetensors"
    weights.write_bytes(b"not read by the check")
    proc = subprocess.run([sys.executable, "-c", _NO_OPEN_CLIP, str(weights)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fresh["open_clip_loaded"] is False
    assert "open_clip" in sys.modules  # this process: the check goes through open_clip itself
    spec = validate_model_spec(TINY_MODEL, "random:3", allow_random_weights=True)
    loaded = json.loads(json.dumps({"spec": [spec.model_name, spec.embed_dim, spec.preprocess.to_dict()],
                                    "tokenizer": tokenizer_spec(TINY_MODEL).to_dict()}, default=list))
    assert (fresh["spec"], fresh["tokenizer"]) == (loaded["spec"], loaded["tokenizer"])
    b32 = validate_model_spec("ViT-B-32", str(weights))
    assert fresh["file"] == json.loads(json.dumps([b32.model_name, b32.embed_dim, b32.preprocess.to_dict()], default=list))
    assert b32.embed_dim == open_clip.get_model_config("ViT-B-32")["embed_dim"]


def test_the_defaults_the_check_reads_without_open_clip_are_open_clips():
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, default_bpe
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    from winnow.stages.models import OPEN_CLIP_BPE_FILE, OPEN_CLIP_CONTEXT_LENGTH, OPEN_CLIP_PREPROCESS_DEFAULTS

    assert merge_preprocess_dict(PreprocessCfg(), {}) == OPEN_CLIP_PREPROCESS_DEFAULTS
    assert (DEFAULT_CONTEXT_LENGTH, os.path.basename(default_bpe())) == (OPEN_CLIP_CONTEXT_LENGTH, OPEN_CLIP_BPE_FILE)
