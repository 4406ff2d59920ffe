"""CurationConfig: each knob is checked by the stage config that owns it, with one range, and
``validate`` reports every problem at once, before any row group runs."""

from __future__ import annotations

import re

import pytest
from safetensors.torch import save_file

from tests.data._shards import write_tar
from winnow.checks import DEFAULT_MAX_PARTITIONS, MAX_MAP_LENGTH
from winnow.data.sample import TINY_MODEL_PARAMS
from winnow.exceptions import ConfigError, WinnowError
from winnow.filters import PARAMS as FILTER_PARAMS
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
        with pytest.raises(ConfigError, match=r"dedup_eps must be a number in \(0, 1\]"):
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


def _bad_filter_values(param) -> list:
    outside = param.high + 1 if param.high is not None else param.low - 1
    return [outside, "5", True] + ([] if param.nullable else [None])


#: The run parameters (what ``to_dict`` holds: params, run conf, fingerprints).
_KNOBS = set(CurationConfig(input_uri="i", output_root="o", run_key="r").to_dict())
#: Every knob of ``CurationConfig`` with values it refuses. ``output_root`` is only required
#: (``from_params``): any string names a folder.
BAD_KNOBS: list[tuple[str, object]] = [
    ("run_key", "a/b"), ("run_key", ""),
    ("buffer_size", 0), ("buffer_size", -1), ("buffer_size", 2.5), ("buffer_size", True), ("buffer_size", "256"),
    ("max_partitions", 0), ("max_partitions", MAX_MAP_LENGTH + 1), ("max_partitions", 8.0), ("max_partitions", None),
    ("model", "no-such-model"), ("pretrained", "no-such-tag"), ("model_dir", "/no/such/models"),
    *((name, f"/no/such/{name}.safetensors") for name in _KNOBS if name.endswith("_weights")),  # every head's
    *((p.name, bad) for p in FILTER_PARAMS for bad in _bad_filter_values(p)),
    ("caption_field", ""), ("caption_field", "meta..caption"), ("caption_field", 5),
    ("dedup_eps", 0), ("dedup_eps", 1.5), ("dedup_eps", float("nan")), ("dedup_eps", "0.05"),
    ("dedup_clusters", -1), ("dedup_clusters", 1.5), ("dedup_sample_size", -1), ("dedup_sample_size", "0"),
    ("dedup_buckets", -1), ("dedup_buckets", MAX_MAP_LENGTH + 1),
    ("allow_random_weights", "yes"), ("overwrite", "false"), ("skip_bad_shards", 1),
    ("decode_backend", "gpu-magic"), ("decode_backend", None),
    ("batch_size", 0), ("batch_size", 64.0), ("batch_size", True),
    ("input_uri", "/no/such/shards"),
]


def test_the_bad_knob_table_covers_every_knob():
    assert _KNOBS - {"output_root"} == {name for name, _ in BAD_KNOBS}


def _reading(knob: str) -> dict:
    """The other params under which ``knob`` is read at all: model_dir only for a weights tag (the
    tiny model's "random" weights need no file), a head's weights only while its filter is on."""
    from winnow.filters import FILTERS

    if knob == "model_dir":
        return {"pretrained": "openai"}
    spec = next((f for f in FILTERS if f"{f.name}_weights" == knob), None)
    if spec is None or spec.off is None:
        return {}
    return {spec.threshold.name: (spec.threshold.low + spec.threshold.high) / 2}


@pytest.mark.parametrize("knob, bad", BAD_KNOBS, ids=[f"{k}={v!r}" for k, v in BAD_KNOBS])
def test_every_bad_knob_is_a_config_error_naming_it_and_the_value(tmp_path, knob, bad):
    cfg = _cfg(tmp_path, **{knob: bad}, **_reading(knob))
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    text = str(err.value)
    assert knob in text, text
    if knob not in ("model", "pretrained", "input_uri"):  # these name what was looked for instead
        assert repr(bad) in text, text
    assert isinstance(err.value, ValueError) and isinstance(err.value, WinnowError)


@pytest.mark.parametrize("stage", ["index", "embed", "clip_score", "dedup"])
def test_a_stage_config_refuses_a_bad_knob_with_a_config_error(tmp_path, stage):
    bad = {"index": {"max_partitions": 0}, "embed": {"batch_size": 0}, "clip_score": {"caption_field": ""},
           "dedup": {"dedup_buckets": -1}}[stage]
    cfg = _cfg(tmp_path, **bad)
    build = cfg.dedup_config if stage == "dedup" else lambda: cfg.stage_config(stage)
    with pytest.raises(ConfigError, match=next(iter(bad))):
        build()


def test_max_partitions_has_one_default_and_one_check():
    import inspect

    from winnow.data.index import IndexConfig
    from winnow.rowgroups.plan import RowGroupPlan

    assert DEFAULT_MAX_PARTITIONS == 64
    assert CurationConfig(input_uri="i", output_root="o", run_key="r").max_partitions == DEFAULT_MAX_PARTITIONS
    assert IndexConfig(input_uri="i", buffer_size=8).max_partitions == DEFAULT_MAX_PARTITIONS
    assert RowGroupPlan(10, 2).max_partitions == DEFAULT_MAX_PARTITIONS
    # The plan checks it; the index config makes an empty plan rather than checking it again.
    assert "MAX_MAP_LENGTH" not in inspect.getsource(IndexConfig)
    with pytest.raises(ConfigError, match="max_map_length"):
        IndexConfig(input_uri="i", buffer_size=8, max_partitions=MAX_MAP_LENGTH + 1)
