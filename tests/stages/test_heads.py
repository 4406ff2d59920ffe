"""Score heads and the aesthetic / nsfw stages on committed embed row groups (CPU)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import save_file

from tests.stages._stage_rows import commit_embed, unit_rows
from winnow.exceptions import HeadError
from winnow.rowgroups import RowGroupPlan
from winnow.rowgroups.task import RowGroupTask, Stage
from winnow.schemas import AESTHETIC, NSFW
from winnow.stages.aesthetic import AESTHETIC_HEAD, AestheticConfig, AestheticStage
from winnow.stages.heads import AestheticMLP, NsfwHead, load_head, nsfw_state_dict_from_keras, score_embeddings
from winnow.stages.nsfw import NSFW_HEAD, NsfwConfig, NsfwStage

KINDS = {"aesthetic": AESTHETIC_HEAD, "nsfw": NSFW_HEAD}


def test_aesthetic_mlp_matches_published_state_dict_layout():
    shapes = {k: tuple(v.shape) for k, v in AestheticMLP().state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }


def test_aesthetic_mlp_is_affine_and_dropout_is_off_in_eval():
    # The published model has no activations: f(a+b) - f(0) == (f(a)-f(0)) + (f(b)-f(0)).
    model = AestheticMLP().eval()
    a, b, z = torch.randn(1, 768), torch.randn(1, 768), torch.zeros(1, 768)
    with torch.no_grad():
        lhs = model(a + b) - model(z)
        rhs = (model(a) - model(z)) + (model(b) - model(z))
        assert torch.allclose(lhs, rhs, atol=1e-4)
        assert torch.equal(model(a), model(a))  # no dropout noise in eval mode


def test_nsfw_head_layout_and_keras_normalization():
    head = NsfwHead().eval()
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "norm.mean": (768,), "norm.variance": (768,),
        "layers.0.weight": (64, 768), "layers.0.bias": (64,),
        "layers.2.weight": (512, 64), "layers.2.bias": (512,),
        "layers.4.weight": (256, 512), "layers.4.bias": (256,),
        "layers.6.weight": (1, 256), "layers.6.bias": (1,),
    }
    head.norm.mean.fill_(0.5)
    head.norm.variance.fill_(4.0)
    x = torch.full((1, 768), 2.5)
    assert torch.allclose(head.norm(x), torch.ones(1, 768))  # (2.5 - 0.5) / sqrt(4)
    out = head(torch.randn(5, 768))
    assert out.shape == (5,) and bool(((out > 0) & (out < 1)).all())


def test_keras_weights_convert_to_nsfw_state_dict():
    rng = np.random.default_rng(0)
    dims = [(768, 64), (64, 512), (512, 256), (256, 1)]
    keras = [rng.random((1, 768)), rng.random((1, 768)) + 0.5, np.array(1000)]
    for i, o in dims:
        keras += [rng.standard_normal((i, o)) / np.sqrt(i), 0.1 * rng.standard_normal(o)]
    state = nsfw_state_dict_from_keras(keras)
    head = NsfwHead()
    head.load_state_dict(state)  # strict: every key and shape fits
    x = rng.standard_normal((3, 768))
    # Same maths in numpy, Keras-style (x @ kernel + bias).
    h = (x - keras[0]) / np.sqrt(keras[1])
    for j, (kernel, bias) in enumerate(zip(keras[3::2], keras[4::2])):
        h = h @ kernel + bias
        h = np.maximum(h, 0) if j < 3 else 1 / (1 + np.exp(-h))
    with torch.no_grad():
        got = head(torch.from_numpy(x).float()).numpy()
    assert ((h > 0.01) & (h < 0.99)).all()  # not saturated, so the comparison means something
    np.testing.assert_allclose(got, h[:, 0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind,cls", [("aesthetic", AestheticMLP), ("nsfw", NsfwHead)])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_load_head_round_trips_weights_from_file(tmp_path, kind, cls, suffix):
    torch.manual_seed(3)
    source = cls().eval()
    path = str(tmp_path / f"{kind}{suffix}")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    loaded, digest = load_head(KINDS[kind], path, embed_dim=768, allow_random_weights=False, device="cpu")
    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    assert not loaded.training
    x = unit_rows(7, 768, seed=1).astype(np.float16)
    np.testing.assert_allclose(score_embeddings(loaded, x), score_embeddings(source, x), rtol=1e-6)


def test_load_head_rejects_weights_for_another_embedding_width(tmp_path):
    path = str(tmp_path / "a.safetensors")
    save_file(AestheticMLP(embed_dim=512).state_dict(), path)
    with pytest.raises(HeadError, match=r"expect 512-d embeddings .* gives 768-d"):
        load_head(AESTHETIC_HEAD, path, embed_dim=768, allow_random_weights=False, device="cpu")


def test_load_head_names_missing_keys_of_a_wrong_file(tmp_path):
    path = str(tmp_path / "n.safetensors")
    save_file(AestheticMLP().state_dict(), path)  # aesthetic weights given to the nsfw head
    with pytest.raises(HeadError, match=r"missing keys \['norm.mean', 'norm.variance'"):
        load_head(NSFW_HEAD, path, embed_dim=768, allow_random_weights=False, device="cpu")


def test_missing_weights_file_is_named(tmp_path):
    path = str(tmp_path / "nope.pth")
    with pytest.raises(HeadError, match=rf"{path}.*'aesthetic_weights'"):
        load_head(AESTHETIC_HEAD, path, embed_dim=768, allow_random_weights=True, device="cpu")


def test_random_weights_refused_without_flag_and_seeded_with_it(caplog):
    with pytest.raises(HeadError, match="allow_random_weights"):
        load_head(NSFW_HEAD, None, embed_dim=768, allow_random_weights=False, device="cpu")
    x = unit_rows(50, 768, seed=2).astype(np.float16)
    with caplog.at_level(logging.WARNING, logger="winnow.stages.heads"):
        a, digest_a = load_head(AESTHETIC_HEAD, None, embed_dim=768, allow_random_weights=True, device="cpu")
        b, digest_b = load_head(AESTHETIC_HEAD, None, embed_dim=768, allow_random_weights=True, device="cpu")
    assert digest_a == digest_b == "random-seed0"
    assert sum("RANDOM weights" in r.message for r in caplog.records) == 2  # warned on every load
    np.testing.assert_array_equal(score_embeddings(a, x), score_embeddings(b, x))
    scores = score_embeddings(a, x)
    assert 3 < scores.mean() < 7 and scores.std() > 0.3  # on the 1-10 scale, not a constant


def _run_stage(stage: Stage, run_root: str, plan: RowGroupPlan) -> list[pa.Table]:
    stage.setup()
    out = []
    for rg in range(plan.num_row_groups):
        out.append(stage.process(RowGroupTask(run_root, plan, plan.partition_of(rg), rg)))
    return out


def test_aesthetic_and_nsfw_stages_score_committed_embed_row_groups(tmp_path):
    run_root = str(tmp_path / "run")
    plan = RowGroupPlan(10, 4, max_partitions=2)
    emb = unit_rows(10, 768, seed=5)
    bad = np.zeros(10, bool)
    bad[[1, 9]] = True
    commit_embed(run_root, plan, emb, undecodable=bad)
    aesthetic = AestheticStage(AestheticConfig(allow_random_weights=True, device="cpu"))
    nsfw = NsfwStage(NsfwConfig(allow_random_weights=True, device="cpu"))
    assert isinstance(aesthetic, Stage) and aesthetic.name == "aesthetic"
    # A head only scores: its threshold is the thresholds step's, so it is not in its fingerprint.
    assert aesthetic.fingerprint_config() == {"weights_digest": "random-seed0"}

    a = pa.concat_tables(_run_stage(aesthetic, run_root, plan))
    n = pa.concat_tables(_run_stage(nsfw, run_root, plan))
    assert a.schema == AESTHETIC and n.schema == NSFW
    assert a.column("record_id").to_pylist() == list(range(10))
    head, _ = load_head(AESTHETIC_HEAD, None, embed_dim=768, allow_random_weights=True, device="cpu")
    want = score_embeddings(head, emb.astype(np.float16))
    got = a.column("aesthetic_score").to_numpy(zero_copy_only=False)
    np.testing.assert_allclose(got[~bad], want[~bad], rtol=1e-5)
    assert a.column("aesthetic_score").null_count == 2 and np.isnan(got[bad]).all()
    ns = n.column("nsfw_score").to_numpy(zero_copy_only=False)
    assert n.column("nsfw_score").null_count == 2 and ((ns[~bad] > 0) & (ns[~bad] < 1)).all()


def test_stage_rejects_embeddings_of_another_width(tmp_path):
    run_root = str(tmp_path / "run")
    plan = RowGroupPlan(3, 3)
    commit_embed(run_root, plan, unit_rows(3, 32, seed=0))
    stage = AestheticStage(AestheticConfig(allow_random_weights=True, device="cpu"))
    stage.setup()
    with pytest.raises(Exception, match=r"row group 0 holds 32-d embeddings but 768-d"):
        stage.process(RowGroupTask(run_root, plan, 0, 0))


def test_fingerprint_changes_with_weights_only(tmp_path):
    path = str(tmp_path / "a.safetensors")
    save_file(AestheticMLP().state_dict(), path)
    other = str(tmp_path / "b.safetensors")
    save_file(AestheticMLP().state_dict() | {"layers.7.bias": torch.ones(1)}, other)
    one = AestheticStage(AestheticConfig(weights=path)).fingerprint_config()
    two = AestheticStage(AestheticConfig(weights=other)).fingerprint_config()
    assert one["weights_digest"] != two["weights_digest"] != "random-seed0"
    assert set(one) == {"weights_digest"}
    with pytest.raises(HeadError, match="allow_random_weights"):
        NsfwStage(NsfwConfig()).fingerprint_config()
