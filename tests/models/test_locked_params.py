"""A model directory filled by ``python -m winnow.models fetch`` is enough as a run param: its lock
names the heads' weights files, so ``model_dir`` alone fills ``aesthetic_weights`` and
``nsfw_weights`` (and ``watermark_weights`` where that filter is on); a weights param given wins."""

from __future__ import annotations

import json

from winnow.pipeline import CurationConfig
from winnow.stages.models import MODELS_LOCK

BASE = {"input_uri": "in", "output_root": "out", "run_key": "r"}


def _lock(folder) -> None:
    files = {"aesthetic/a.pth": {"name": "aesthetic", "param": "aesthetic_weights"},
             "nsfw/n.safetensors": {"name": "nsfw", "param": "nsfw_weights"},
             "watermark/w.pt": {"name": "watermark", "param": "watermark_weights"},
             "ViT/openai/open_clip_model.safetensors": {"name": "clip", "param": "model_dir"}}
    (folder / MODELS_LOCK).write_text(json.dumps({"format": "winnow-models-lock/1", "files": files}))


def test_model_dir_alone_names_the_locked_heads(tmp_path):
    _lock(tmp_path)
    cfg = CurationConfig.from_params({**BASE, "model_dir": str(tmp_path)})
    assert cfg.aesthetic_weights == str(tmp_path / "aesthetic/a.pth")
    assert cfg.nsfw_weights == str(tmp_path / "nsfw/n.safetensors")
    assert cfg.watermark_weights is None  # its filter is off


def test_a_given_weights_param_wins_and_the_watermark_comes_with_its_filter(tmp_path):
    _lock(tmp_path)
    cfg = CurationConfig.from_params({**BASE, "model_dir": str(tmp_path), "aesthetic_weights": "/x/mine.pth",
                                      "watermark_threshold": 0.5})
    assert cfg.aesthetic_weights == "/x/mine.pth"
    assert cfg.watermark_weights == str(tmp_path / "watermark/w.pt")


def test_a_model_dir_without_a_lock_fills_nothing(tmp_path):
    cfg = CurationConfig.from_params({**BASE, "model_dir": str(tmp_path)})
    assert (cfg.aesthetic_weights, cfg.nsfw_weights, cfg.watermark_weights) == (None, None, None)
