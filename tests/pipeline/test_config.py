"""CurationConfig: each knob is checked by the stage config that owns it, with one range, and
``validate`` reports every problem at once, before any row group runs."""

from __future__ import annotations

import re

import pytest
from safetensors.torch import save_file

from tests.data._shards import write_tar
from winnow.data.sample import TINY_MODEL_PARAMS
from winnow.exceptions import ConfigError, DedupError
from winnow.pipeline import CurationConfig
from winnow.stages.decode import DECODE_BACKENDS
from winnow.stages.dedup import EPS_RANGE, DedupConfig
from winnow.stages.heads import AestheticMLP
from winnow.stages.thresholds import ThresholdsConfig


def _cfg(tmp_path, **overrides) -> CurationConfig:
    shards = tmp_path / "shards"
    if not shards.exists():
        write_tar(str(shards / "shard-000000.tar"), [("a.jpg", b"not decoded by validate"), ("a.txt", b"x")])
    params = {"input_uri": str(shards), "output_root": str(tmp_path / "out"), "run_key": "r",
              **TINY_MODEL_PARAMS, **overrides}
    return CurationConfig(**params)


@pytest.mark.parametrize("eps, ok", [(0.0, False), (1e-6, True), (1.0, True), (1.0001, False), (-0.1, False)])
def test_dedup_eps_range_is_open_at_zero_closed_at_one(eps, ok):
    assert EPS_RANGE == (0.0, 1.0)
    if ok:
        DedupConfig(eps=eps)
    else:
        with pytest.raises(DedupError, match=r"dedup_eps must be in \(0, 1\]"):
            DedupConfig(eps=eps)


@pytest.mark.parametrize("param, low, high", [("aesthetic_threshold", 0, 10), ("nsfw_threshold", 0, 1),
                                              ("clip_score_threshold", 0, 1)])
def test_thresholds_have_one_range_owned_by_the_thresholds_config(param, low, high):
    from winnow.filters import PARAMS

    declared = next(p for p in PARAMS if p.name == param)
    assert (low, high) == (declared.low, declared.high)
    ThresholdsConfig(**{param: low})
    ThresholdsConfig(**{param: high})
    for bad in (low - 0.01, high + 0.01, "5", True):
        with pytest.raises(ConfigError, match=param):
            ThresholdsConfig(**{param: bad})


@pytest.mark.parametrize("param", ["aesthetic_keep_fraction", "clip_score_keep_fraction"])
def test_keep_fractions_are_in_zero_one(param, tmp_path):
    for good in (None, 1e-6, 0.5, 1.0, 1):
        ThresholdsConfig(**{param: good})
    for bad in (0, 0.0, -0.1, 1.01, "0.5", True):
        with pytest.raises(ConfigError, match=param):
            ThresholdsConfig(**{param: bad})
    # A run conf's empty string means "unset", as for the other optional params.
    cfg = CurationConfig.from_params({"input_uri": "in", "output_root": "out", "run_key": "r", param: ""})
    assert getattr(cfg, param) is None


def test_validate_reports_every_problem_at_once(tmp_path):
    cfg = _cfg(tmp_path, dedup_eps=1.5, nsfw_threshold=2.0, decode_backend="gpu-magic", batch_size=0,
               max_partitions=5000, run_key="a/b")
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    text = str(err.value)
    for needle in ("dedup_eps", "nsfw_threshold", "decode_backend", "batch_size", "max_partitions", "run_key"):
        assert needle in text, (needle, text)
    # one line per owner: run_key, index, embed (two problems), nsfw, dedup
    assert len(re.findall(r"^\s+- ", text, flags=re.M)) == 5, text


def test_decode_backend_is_checked_by_its_owner_only(tmp_path):
    assert set(DECODE_BACKENDS) >= {"auto", "pillow", "dali-cpu", "dali-gpu"}
    with pytest.raises(ConfigError, match="embed: decode_backend must be one of"):
        _cfg(tmp_path, decode_backend="nope").validate()


def test_a_valid_config_passes(tmp_path):
    _cfg(tmp_path).validate()


def test_head_weights_for_another_width_fail_at_validation_naming_model_width_and_file(tmp_path):
    # RN50's open_clip config gives 1024-d embeddings; the published heads take 768-d ones.
    head = tmp_path / "aesthetic-768.safetensors"
    save_file(AestheticMLP(embed_dim=768).state_dict(), str(head))
    cfg = _cfg(tmp_path, model="RN50", aesthetic_weights=str(head))
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    text = str(err.value)
    assert "aesthetic_weights" in text and str(head) in text
    assert "'RN50'" in text and "1024-d" in text and "768-d" in text
    assert "param 'embed_dim'" not in text  # no such param exists


def test_the_heads_take_their_width_from_the_model(tmp_path):
    cfg = _cfg(tmp_path, model="RN50")
    assert cfg.stage_config("aesthetic").embed_dim == 1024
    assert cfg.stage_config("nsfw").embed_dim == 1024


def test_unknown_params_are_refused_naming_each_and_the_closest_known_one():
    from winnow.exceptions import ConfigError
    from winnow.pipeline import CurationConfig

    base = {"input_uri": "in", "output_root": "out", "run_key": "r"}
    with pytest.raises(ConfigError) as err:
        CurationConfig.from_params({**base, "aesthetic_treshold": 5, "nsfw_thresold": 0.4, "clip_keep_frac": 1,
                                     "zzz": 1})
    text = str(err.value)
    assert "'aesthetic_treshold' (did you mean 'aesthetic_threshold'?)" in text
    assert "'nsfw_thresold' (did you mean 'nsfw_threshold'?)" in text
    assert "'clip_keep_frac' (did you mean 'clip_score_keep_fraction'?)" in text
    assert "'zzz' (no parameter is close)" in text
    cfg = CurationConfig.from_params({**base, "ray_conn_id": "ray_default"}, also_accepted={"ray_conn_id"})
    assert cfg.aesthetic_threshold == 5.0 and not hasattr(cfg, "ray_conn_id")
    assert CurationConfig.from_params(CurationConfig(**base).to_dict()) == CurationConfig(**base)
