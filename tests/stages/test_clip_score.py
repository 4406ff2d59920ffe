"""The clip_score stage on real tar shards, a real index and real embed row groups, with the tiny
open_clip config and seeded random weights: mechanics (which caption, which nulls, one model
space, batching, fingerprints), not semantics."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import open_clip
import pyarrow as pa
import pytest
import torch
from PIL import Image

import winnow.stages.clip_score as clip_score_module
from tests.data._shards import write_tar
from winnow.data.captions import caption_from_json, caption_from_txt
from winnow.data.index import IndexConfig, build_index
from winnow.data.sample import generate_sample
from winnow.exceptions import ModelError
from winnow.rowgroups import CommitStore, StageFingerprint
from winnow.rowgroups.task import RowGroupTask, Stage
from winnow.stages.clip_score import CLIP_SCORE, ClipScoreConfig, ClipScoreStage
from winnow.stages.embed import EmbedConfig, EmbedStage
from winnow.stages.embedding_io import embedding_array, embedding_matrix
from winnow.stages.models import TINY_MODEL, register_model_configs


def tiny(**kw) -> ClipScoreStage:
    base = dict(model=TINY_MODEL, pretrained="random", allow_random_weights=True, device="cpu")
    return ClipScoreStage(ClipScoreConfig(**(base | kw)))


def photo(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _meta(**fields) -> bytes:
    return json.dumps(fields).encode()


#: (key, image, txt or None, json or None): the caption each record should end up with.
RECORDS = [
    ("r00", photo(0), b"a red circle", _meta(caption="the json caption loses")),  # .txt wins
    ("r01", photo(1), None, _meta(caption="  a blue square from json  ")),  # json field
    ("r02", photo(2), None, None),  # no caption anywhere
    ("r03", b"not an image", b"caption of a broken image", None),  # undecodable: null score
    ("r04", photo(4), b"  \n\t", _meta(caption="json after a blank txt")),  # blank .txt -> json
    ("r05", photo(5), b"caf\xc3\xa9 \xff bytes", None),  # bad UTF-8 replaced, still a caption
    ("r06", photo(6), b"   ", None),  # blank .txt, no json: no caption
    ("r07", photo(7), None, b"{not json"),  # unreadable json: no caption
    ("r08", photo(8), None, _meta(meta={"caption": "nested caption"}, caption=3)),  # not a string
    ("r09", photo(0), b"an exact duplicate of r00", None),  # same bytes as r00: exact duplicate
    ("r10", photo(10), b"green stripes " * 20, None),  # longer than the context: truncated
]
CAPTIONS = {
    "r00": "a red circle", "r01": "a blue square from json", "r03": "caption of a broken image",
    "r04": "json after a blank txt", "r05": "caf\u00e9 \ufffd bytes", "r09": "an exact duplicate of r00",
    "r10": ("green stripes " * 20).strip(),
}


@pytest.fixture(scope="module")
def embed_stage() -> EmbedStage:
    stage = EmbedStage(EmbedConfig(model=TINY_MODEL, pretrained="random", allow_random_weights=True,
                                   decode_backend="pillow", device="cpu"))
    stage.setup()
    return stage


def _commit_embed(run_root: str, plan, embed_stage: EmbedStage) -> None:
    """Embed row groups as the runner commits them: exact duplicates get a null embedding."""
    store = CommitStore(run_root)
    store.ensure_stage(StageFingerprint(stage="embed", config=embed_stage.fingerprint_config(),
                                        num_records=plan.num_records, buffer_size=plan.buffer_size))
    for rg in range(plan.num_row_groups):
        p = plan.partition_of(rg)
        table = embed_stage.process(RowGroupTask(run_root, plan, p, rg))
        index = store.read_table("index", p, rg)
        if "exact_duplicate_of" in index.column_names:
            dup = index.column("exact_duplicate_of").is_valid().to_numpy(zero_copy_only=False)
            valid, matrix = embedding_matrix(table.column("embedding"))
            full = np.zeros((len(valid), matrix.shape[1]), np.float16)
            full[valid] = matrix
            emb = embedding_array(full[valid & ~dup], valid & ~dup)
            table = table.set_column(table.schema.get_field_index("embedding"), "embedding", emb)
        store.commit_table("embed", p, rg, table)


def _tasks(run_root: str, plan) -> list[RowGroupTask]:
    return [RowGroupTask(run_root, plan, plan.partition_of(rg), rg) for rg in range(plan.num_row_groups)]


@pytest.fixture(scope="module")
def run(tmp_path_factory, embed_stage):
    """A run root with index and embed row groups of RECORDS (buffer 4: three row groups)."""
    tmp = tmp_path_factory.mktemp("clip")
    members = []
    for key, image, txt, meta in RECORDS:
        members.append((f"{key}.png", image))
        if txt is not None:
            members.append((f"{key}.txt", txt))
        if meta is not None:
            members.append((f"{key}.json", meta))
    write_tar(str(tmp / "in" / "shard-0000.tar"), members)
    run_root = str(tmp / "run")
    result = build_index(run_root, IndexConfig(input_uri=str(tmp / "in"), buffer_size=4))
    _commit_embed(run_root, result.plan, embed_stage)
    return run_root, result.plan


def _score_all(stage: ClipScoreStage, run) -> pa.Table:
    run_root, plan = run
    return pa.concat_tables([stage.process(t) for t in _tasks(run_root, plan)])


@pytest.fixture(scope="module")
def table(run) -> pa.Table:
    return _score_all(tiny(), run)


def _embeddings(run) -> dict[int, np.ndarray | None]:
    run_root, plan = run
    store = CommitStore(run_root)
    out = {}
    for t in _tasks(run_root, plan):
        emb = store.read_table("embed", t.partition, t.row_group)
        for rid, e in zip(emb.column("record_id").to_pylist(), emb.column("embedding").to_pylist()):
            out[rid] = None if e is None else np.array(e, dtype=np.float32)
    return out


def test_stage_keeps_the_contract_and_one_row_per_index_row_in_order(table):
    assert isinstance(tiny(), Stage)
    assert ClipScoreStage.name == "clip_score" and ClipScoreStage.schema == CLIP_SCORE
    assert table.schema == CLIP_SCORE
    assert table.column("record_id").to_pylist() == list(range(len(RECORDS)))


def test_captions_come_from_txt_then_json_and_missing_ones_are_no_caption(table):
    has = dict(zip((k for k, *_ in RECORDS), table.column("has_caption").to_pylist()))
    assert has == {k: k in CAPTIONS for k, *_ in RECORDS}
    assert table.column("has_caption").null_count == 0


def test_nulls_where_there_is_no_embedding_or_no_caption(table, run):
    embeddings = _embeddings(run)
    scores = table.column("clip_score").to_pylist()
    keys = [k for k, *_ in RECORDS]
    null = {keys[i] for i, s in enumerate(scores) if s is None}
    no_embedding = {keys[i] for i, e in embeddings.items() if e is None}
    assert "r03" in no_embedding  # undecodable
    assert null == no_embedding | (set(keys) - set(CAPTIONS))
    assert all(-1.0 <= s <= 1.0 for s in scores if s is not None)


def test_exact_duplicates_get_a_null_score_but_their_caption_is_seen(run, table):
    run_root, plan = run
    index = pa.concat_tables(CommitStore(run_root).read_table("index", t.partition, t.row_group) for t in _tasks(run_root, plan))
    if "exact_duplicate_of" not in index.column_names:
        pytest.skip("the index has no exact_duplicate_of column yet")
    assert index.column("exact_duplicate_of").to_pylist()[9] == 0
    assert table.column("clip_score")[9].as_py() is None
    assert table.column("has_caption")[9].as_py() is True


def test_scores_equal_open_clip_on_the_same_random_model(table, run):
    """The stored image embedding against open_clip's own encode_text of the seeded model: the
    stage's text tower is that model's, so image and text live in one space."""
    register_model_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = open_clip.create_model(TINY_MODEL).eval()
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    embeddings = _embeddings(run)
    keys = [k for k, *_ in RECORDS]
    checked = 0
    for rid, score in enumerate(table.column("clip_score").to_pylist()):
        if score is None:
            continue
        with torch.inference_mode():
            text = clip.encode_text(tokenizer([CAPTIONS[keys[rid]]]), normalize=True)[0].numpy()
        image = embeddings[rid] / np.linalg.norm(embeddings[rid])
        assert score == pytest.approx(float(image @ text), abs=1e-5), keys[rid]
        checked += 1
    assert checked >= 5


def test_text_tower_loads_once_per_stage_for_many_row_groups(run, monkeypatch):
    calls = []
    real = clip_score_module.load_text_model

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(clip_score_module, "load_text_model", counting)
    stage = tiny()
    stage.setup()
    stage.setup()
    run_root, plan = run
    assert plan.num_row_groups >= 3
    for task in _tasks(run_root, plan) * 2:
        stage.process(task)
    assert len(calls) == 1


def test_batch_size_does_not_change_scores(table, run):
    one = _score_all(tiny(batch_size=1), run)
    assert one.column("has_caption").equals(table.column("has_caption"))
    a = one.column("clip_score").to_numpy(zero_copy_only=False)
    b = table.column("clip_score").to_numpy(zero_copy_only=False)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=0, atol=1e-5)


def test_dotted_caption_field_reaches_into_nested_json(run, table):
    nested = _score_all(tiny(caption_field="meta.caption"), run)
    has = nested.column("has_caption").to_pylist()
    assert has[8] is True and has[1] is False  # r08 has meta.caption; r01 only "caption"
    assert has[0] is True  # the .txt still wins
    assert nested.column("clip_score")[0].as_py() == pytest.approx(table.column("clip_score")[0].as_py(), abs=1e-5)


def test_caption_parsing_helpers():
    assert caption_from_txt(None) is None and caption_from_txt(b" \n") is None
    assert caption_from_txt(b"  x\xff  ") == "x\ufffd"
    assert caption_from_json(b'{"caption": " hi "}', "caption") == "hi"
    assert caption_from_json(b'{"a.b": "literal", "a": {"b": "nested"}}', "a.b") == "literal"
    assert caption_from_json(b'{"a": {"b": "nested"}}', "a.b") == "nested"
    for bad in (None, b"", b"[1]", b"{oops", b'{"caption": 5}', b'{"caption": "  "}', b'{"a": "x"}'):
        assert caption_from_json(bad, "caption") is None


def test_sample_generator_captions_match_the_manifest(tmp_path, embed_stage):
    manifest = generate_sample(str(tmp_path / "in"), shards=1, per_shard=24, seed=2, corrupt=True)
    run_root = str(tmp_path / "run")
    result = build_index(run_root, IndexConfig(input_uri=str(tmp_path / "in"), buffer_size=16))
    _commit_embed(run_root, result.plan, embed_stage)
    out = _score_all(tiny(), (run_root, result.plan))
    has = out.column("has_caption").to_numpy(zero_copy_only=False)
    assert out.num_rows == manifest["expected"]["records"]
    assert int(has.sum()) == manifest["expected"]["captions"]
    assert int((~has).sum()) == manifest["expected"]["no_caption"] >= 1
    embeddings = _embeddings((run_root, result.plan))
    scored = np.array([has[i] and embeddings[i] is not None for i in range(out.num_rows)])
    assert np.array_equal(out.column("clip_score").is_valid().to_numpy(zero_copy_only=False), scored)


def test_embed_stage_of_another_model_is_refused(run, tmp_path):
    run_root, plan = run
    with pytest.raises(ModelError, match="same CLIP model"):
        tiny(pretrained="random:1").process(_tasks(run_root, plan)[0])


def test_fingerprint_follows_model_and_caption_field_only():
    fp = tiny().fingerprint_config()
    assert fp == tiny(batch_size=3, device="auto").fingerprint_config()
    assert fp["model"] == TINY_MODEL and fp["weights_digest"] == "random-seed0"
    assert fp["caption_field"] == "caption"
    assert fp["tokenizer"]["kind"] == "open_clip.SimpleTokenizer" and fp["tokenizer"]["context_length"] == 16
    assert fp["tokenizer"]["vocab_digest"].startswith("sha256:")
    assert "threshold" not in json.dumps(fp)
    assert fp != tiny(caption_field="meta.caption").fingerprint_config()
    assert fp != tiny(pretrained="random:1").fingerprint_config()
    other = tiny(model="ViT-B-32").fingerprint_config()  # validated, never built
    assert other["model"] == "ViT-B-32" and other["tokenizer"]["context_length"] == 77


def test_stage_pickles_without_its_model(run, table):
    stage = tiny()
    stage.setup()
    clone = pickle.loads(pickle.dumps(stage))
    assert clone._loaded is None
    run_root, plan = run
    assert clone.process(_tasks(run_root, plan)[0]).equals(table.slice(0, 4))


@pytest.mark.parametrize(
    "knob,value",
    [("batch_size", 0), ("batch_size", True), ("device", "tpu"), ("precision", "fp8"),
     ("caption_field", ""), ("caption_field", "meta..caption")],
)
def test_bad_knobs_are_refused(knob, value):
    with pytest.raises(ValueError, match=knob):
        ClipScoreConfig(**{knob: value})


def test_random_weights_and_downloaded_tokenizers_are_refused_when_the_stage_is_made():
    with pytest.raises(ModelError, match="allow_random_weights"):
        ClipScoreStage(ClipScoreConfig(model=TINY_MODEL, pretrained="random"))
    with pytest.raises(ModelError, match="built-in BPE tokenizer"):
        tiny(model="ViT-B-16-SigLIP")
