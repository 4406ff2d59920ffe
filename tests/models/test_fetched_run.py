"""A fresh model directory filled by ``fetch`` (loopback server) runs: the tiny model's checkpoint
found through ``model_dir`` and the tag, the heads from the lock (``model_dir`` is the only path
param, as in a trigger of the DAG after ``fetch``); the stage fingerprints
record the lock's digests; a weights file changed on disk afterwards is a StageConfigMismatch
naming the weights digest."""

from __future__ import annotations

import json

import pytest

from tests._tiny import ONLY_DEDUP
from tests.models import _files
from winnow.exceptions import StageConfigMismatch
from winnow.models import fetch

pytestmark = pytest.mark.timeout(300)


def test_a_run_loads_the_fetched_weights_records_their_digests_and_refuses_a_changed_file(tmp_path):
    from winnow.data.sample import generate_sample
    from winnow.pipeline import CurationConfig, run_all
    from winnow.stages.watermark import load_watermark_model

    server = _files.Server()
    try:
        blobs = {"/clip.pt": _files.tiny_clip_checkpoint(), "/a.pth": _files.aesthetic_pth(),
                 "/nsfw.zip": _files.nsfw_saved_model_zip(_files.keras_nsfw_weights()),
                 "/w.pt": _files.watermark_pt()}
        server.files.update(blobs)
        sources = {"clip": {"url": server.url("/clip.pt")}, "aesthetic": {"url": server.url("/a.pth")},
                   "nsfw": {"url": server.url("/nsfw.zip")}, "watermark": {"url": server.url("/w.pt")}}
        lock = fetch(tmp_path / "models", model="winnow-tiny-vit", pretrained="test", sources=sources,
                     progress=False)
    finally:
        server.close()
    params = lock.params()
    digests = {e.name: e.fingerprint for e in lock.entries.values()}
    _, watermark_digest = load_watermark_model(params["watermark_weights"], allow_random_weights=False, device="cpu")
    assert watermark_digest == digests["watermark"]

    generate_sample(str(tmp_path / "in"), shards=1, per_shard=6, seed=4)
    # As the DAG builds it from a trigger's params: `model_dir` alone names every file (the lock's).
    cfg = CurationConfig.from_params(dict(
        model="winnow-tiny-vit", pretrained="test", input_uri=str(tmp_path / "in"), output_root=str(tmp_path / "out"),
        run_key="r", buffer_size=6, max_partitions=1, batch_size=6, model_dir=params["model_dir"], **ONLY_DEDUP))
    assert (cfg.aesthetic_weights, cfg.nsfw_weights) == (params["aesthetic_weights"], params["nsfw_weights"])
    run_all(cfg, backend="local")

    def recorded(stage):
        return json.loads((tmp_path / "out/r" / stage / "_stage.json").read_text())["config"]["weights_digest"]

    assert recorded("embed") == digests["clip"]
    assert recorded("aesthetic") == digests["aesthetic"]
    assert recorded("nsfw") == digests["nsfw"]

    changed = _files.aesthetic_pth(seed=9)
    with open(params["aesthetic_weights"], "wb") as f:  # same path, other weights
        f.write(changed)
    with pytest.raises(StageConfigMismatch) as info:
        run_all(cfg, backend="local")
    assert info.value.stage == "aesthetic"
    assert ("config.weights_digest", digests["aesthetic"], f"sha256:{_files.sha256(changed)}") in info.value.changes
    assert f"config.weights_digest: '{digests['aesthetic']}' -> 'sha256:{_files.sha256(changed)}'" in str(info.value)
