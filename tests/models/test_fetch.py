"""``winnow.models.fetch`` against a loopback server serving weights built here: files and lock,
offline verification, a corrupted file, a wrong published digest, a dropped connection resumed
with a Range request, the hub's headers, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.models import _files
from winnow.exceptions import ModelError
from winnow.models import LOCK_NAME, Lock, fetch, verify, verify_problems
from winnow.models.keras import keras_weights, read_h5_weights

pytestmark = pytest.mark.timeout(120)

TINY = "winnow-tiny-vit"
TAG = "test"


@pytest.fixture(scope="module")
def blobs():
    weights = _files.keras_nsfw_weights()
    return {
        "/clip/tiny.pt": _files.tiny_clip_checkpoint(),
        "/aesthetic/sac.pth": _files.aesthetic_pth(),
        "/nsfw/clip_autokeras_binary_nsfw.zip": _files.nsfw_saved_model_zip(weights),
        "/watermark/watermark_model_v1.pt": _files.watermark_pt(),
        "keras": weights,
    }


@pytest.fixture()
def server(blobs):
    s = _files.Server()
    s.files.update({k: v for k, v in blobs.items() if k.startswith("/")})
    yield s
    s.close()


def sources(server, **replace):
    """Every entry on the loopback server: the aesthetic file pinned by sha256, the watermark by
    git blob id, the checkpoint and the NSFW zip with no digest (trust on first fetch)."""
    f = server.files
    out = {
        "clip": {"url": server.url("/clip/tiny.pt")},
        "aesthetic": {"url": server.url("/aesthetic/sac.pth"), "sha256": _files.sha256(f["/aesthetic/sac.pth"]),
                      "revision": "abc123"},
        "nsfw": {"url": server.url("/nsfw/clip_autokeras_binary_nsfw.zip")},
        "watermark": {"url": server.url("/watermark/watermark_model_v1.pt"),
                      "git_blob": _files.git_blob(f["/watermark/watermark_model_v1.pt"])},
    }
    return {**out, **replace}


def run_fetch(tmp_path, server, **kw):
    kw.setdefault("sources", sources(server))
    return fetch(tmp_path / "models", model=TINY, pretrained=TAG, progress=False, **kw)


def test_fetch_writes_every_file_and_the_lock_then_verifies_offline_and_downloads_nothing_again(
        tmp_path, server, blobs):
    from safetensors.torch import load_file

    from winnow.stages.heads import nsfw_state_dict_from_keras

    lock = run_fetch(tmp_path, server)
    root = tmp_path / "models"
    paths = {e.name: p for p, e in lock.entries.items()}
    assert paths == {"clip": f"{TINY}/{TAG}.pt", "aesthetic": "aesthetic/sac+logos+ava1-l14-linearMSE.pth",
                     "nsfw": "nsfw/clip_autokeras_binary_nsfw-vit-l-14.safetensors",
                     "watermark": "watermark/watermark_model_v1.pt"}
    assert (root / paths["clip"]).read_bytes() == blobs["/clip/tiny.pt"]
    assert (root / paths["aesthetic"]).read_bytes() == blobs["/aesthetic/sac.pth"]
    assert (root / paths["watermark"]).read_bytes() == blobs["/watermark/watermark_model_v1.pt"]
    expected = nsfw_state_dict_from_keras(blobs["keras"])
    got = load_file(str(root / paths["nsfw"]))
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert not (root / ".downloads").exists() and not list(root.rglob("*.part"))

    doc = json.loads((root / LOCK_NAME).read_text())
    assert doc["format"] == "winnow-models-lock/1"
    files = doc["files"]
    for path, blob in ((paths["clip"], "/clip/tiny.pt"), (paths["aesthetic"], "/aesthetic/sac.pth"),
                       (paths["watermark"], "/watermark/watermark_model_v1.pt")):
        assert files[path]["sha256"] == _files.sha256(blobs[blob]) and files[path]["size"] == len(blobs[blob])
        assert files[path]["source"] == server.url(blob)
        assert files[path]["fingerprint"] == "sha256:" + files[path]["sha256"]
    assert [files[paths[n]]["digest"] for n in ("clip", "aesthetic", "watermark", "nsfw")] == [
        "trust-on-first-fetch", "pinned", "git-blob", "converted"]
    assert files[paths["aesthetic"]]["revision"] == "abc123"
    zip_blob = blobs["/nsfw/clip_autokeras_binary_nsfw.zip"]
    assert files[paths["nsfw"]]["converted_from"] | {"digest_note": ""} == {
        "source": server.url("/nsfw/clip_autokeras_binary_nsfw.zip"), "revision": None,
        "sha256": _files.sha256(zip_blob), "size": len(zip_blob), "digest": "trust-on-first-fetch", "digest_note": ""}
    assert files[paths["nsfw"]]["sha256"] == _files.sha256((root / paths["nsfw"]).read_bytes())

    assert verify(root, model=TINY, pretrained=TAG, sources=sources(server)).entries == Lock.read(root).entries
    n = len(server.requests)
    again = run_fetch(tmp_path, server)
    assert len(server.requests) == n  # everything there and verified: nothing downloaded
    assert again.entries == lock.entries
    assert lock.params() == {"model_dir": str(root), "aesthetic_weights": str(root / paths["aesthetic"]),
                             "nsfw_weights": str(root / paths["nsfw"]),
                             "watermark_weights": str(root / paths["watermark"])}


def test_offline_names_each_missing_or_corrupted_file_with_its_source_and_a_fetch_repairs_them(tmp_path, server):
    lock = run_fetch(tmp_path, server)
    root = tmp_path / "models"
    by_name = {e.name: e for e in lock.entries.values()}
    aesthetic, watermark = root / by_name["aesthetic"].path, root / by_name["watermark"].path
    data = bytearray(aesthetic.read_bytes())
    data[100] ^= 0xFF
    aesthetic.write_bytes(bytes(data))
    watermark.unlink()
    n = len(server.requests)
    with pytest.raises(ModelError, match="2 file\\(s\\) missing or wrong") as info:
        fetch(root, model=TINY, pretrained=TAG, offline=True, sources=sources(server))
    assert len(server.requests) == n  # offline: nothing downloaded
    problems = verify_problems(root, model=TINY, pretrained=TAG, sources=sources(server))
    assert all(p in str(info.value) for p in problems)
    assert len(problems) == 2
    bad = next(p for p in problems if "aesthetic" in p)
    assert by_name["aesthetic"].path in bad and "sha256 mismatch" in bad
    assert f"expected {by_name['aesthetic'].sha256}, actual {_files.sha256(bytes(data))}" in bad
    assert server.url("/aesthetic/sac.pth") in bad
    missing = next(p for p in problems if "watermark" in p)
    assert "missing" in missing and server.url("/watermark/watermark_model_v1.pt") in missing

    run_fetch(tmp_path, server)  # online: both downloaded again and checked
    assert verify(root, model=TINY, pretrained=TAG, sources=sources(server))


def test_offline_without_a_lock_or_an_entry_says_so(tmp_path, server):
    with pytest.raises(ModelError, match=rf"{LOCK_NAME}: missing .*fetch without --offline"):
        run_fetch(tmp_path, server, offline=True)
    run_fetch(tmp_path, server, only=["aesthetic"])
    with pytest.raises(ModelError, match="watermark_model_v1.pt \\(watermark\\): not in the lock; expected "
                       "source http://127.0.0.1"):
        run_fetch(tmp_path, server, offline=True, only=["aesthetic", "watermark"])


def test_a_download_with_the_wrong_sha256_is_deleted_and_named_with_both_digests(tmp_path, server, blobs):
    wrong = "0" * 64
    srcs = sources(server, aesthetic={"url": server.url("/aesthetic/sac.pth"), "sha256": wrong})
    with pytest.raises(ModelError) as info:
        run_fetch(tmp_path, server, sources=srcs, only=["aesthetic"])
    message = str(info.value)
    assert "sac+logos+ava1-l14-linearMSE.pth" in message
    assert f"expected {wrong}, got {_files.sha256(blobs['/aesthetic/sac.pth'])}" in message
    assert not [p for p in (tmp_path / "models").rglob("*") if p.is_file() and p.name != LOCK_NAME]

    srcs = sources(server, watermark={"url": server.url("/watermark/watermark_model_v1.pt"), "git_blob": "1" * 40})
    with pytest.raises(ModelError, match=f"git blob id mismatch .*expected {'1' * 40}, got "
                       f"{_files.git_blob(blobs['/watermark/watermark_model_v1.pt'])}"):
        run_fetch(tmp_path, server, sources=srcs, only=["watermark"])


def test_a_trusted_first_fetch_pins_the_file_for_every_later_fetch(tmp_path, server):
    run_fetch(tmp_path, server, only=["clip"])
    root = tmp_path / "models"
    (root / f"{TINY}/{TAG}.pt").unlink()
    server.files["/clip/tiny.pt"] = _files.tiny_clip_checkpoint(seed=6)  # the source changed under the same URL
    with pytest.raises(ModelError, match="sha256 mismatch for clip"):
        run_fetch(tmp_path, server, only=["clip"])


def test_a_dropped_connection_is_resumed_with_a_range_request(tmp_path, server, blobs):
    path = "/watermark/watermark_model_v1.pt"
    body = blobs[path]
    server.drop_once.add(path)
    lock = run_fetch(tmp_path, server, only=["watermark"])  # resumed within the same fetch
    assert server.gets(path) == [None, f"bytes={len(body) // 2}-"]
    entry = next(iter(lock.entries.values()))
    assert entry.sha256 == _files.sha256(body) and entry.digest == "git-blob"

    # A fetch that gives up leaves the .part; the next one resumes it.
    path = "/aesthetic/sac.pth"
    server.drop_once.add(path)
    with pytest.raises(ModelError, match="dropped at .*fetch again to resume"):
        run_fetch(tmp_path, server, only=["aesthetic"], retries=0)
    part = tmp_path / "models/aesthetic/sac+logos+ava1-l14-linearMSE.pth.part"
    assert part.stat().st_size == len(blobs[path]) // 2
    run_fetch(tmp_path, server, only=["aesthetic"])
    assert server.gets(path)[-1] == f"bytes={len(blobs[path]) // 2}-"
    assert (tmp_path / "models/aesthetic/sac+logos+ava1-l14-linearMSE.pth").read_bytes() == blobs[path]
    assert not part.exists()


def test_the_hubs_commit_and_lfs_sha256_are_recorded_and_checked(tmp_path, server, blobs):
    path = "/clip/tiny.pt"
    server.headers[path] = {"X-Repo-Commit": "c" * 40, "X-Linked-Etag": f'"{_files.sha256(blobs[path])}"'}
    lock = run_fetch(tmp_path, server, only=["clip"])
    entry = next(iter(lock.entries.values()))
    assert (entry.revision, entry.digest) == ("c" * 40, "published")
    (tmp_path / "models" / entry.path).unlink()
    server.headers[path]["X-Linked-Etag"] = '"' + "e" * 64 + '"'
    (tmp_path / "models" / LOCK_NAME).unlink()
    with pytest.raises(ModelError, match=f"expected {'e' * 64} \\(the hub's LFS sha256\\)"):
        run_fetch(tmp_path, server, only=["clip"])


def test_the_keras_readers_give_get_weights_order(tmp_path, blobs):
    import zipfile

    weights = blobs["keras"]
    _files.keras_h5(tmp_path / "nsfw.h5", weights)
    for got in (read_h5_weights(tmp_path / "nsfw.h5"), keras_weights(tmp_path / "nsfw.h5")):
        assert len(got) == len(weights) and all(np.array_equal(a, b) for a, b in zip(got, weights, strict=True))
    (tmp_path / "z.zip").write_bytes(blobs["/nsfw/clip_autokeras_binary_nsfw.zip"])
    with zipfile.ZipFile(tmp_path / "z.zip") as z:
        z.extractall(tmp_path / "saved")
    got = keras_weights(tmp_path / "saved")
    assert len(got) == len(weights) and all(np.array_equal(a, b) for a, b in zip(got, weights, strict=True))


def test_the_nsfw_detector_published_as_an_h5_zip_converts_too(tmp_path, server, blobs):
    import io
    import zipfile

    _files.keras_h5(tmp_path / "nsfw.h5", blobs["keras"])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.write(tmp_path / "nsfw.h5", "model/nsfw.h5")
    server.files["/nsfw/h5.zip"] = buf.getvalue()
    lock = run_fetch(tmp_path, server, only=["nsfw"], sources=sources(server, nsfw={"url": server.url("/nsfw/h5.zip")}))
    from safetensors.torch import load_file

    from winnow.stages.heads import nsfw_state_dict_from_keras

    got = load_file(str(tmp_path / "models" / next(iter(lock.entries))))
    assert all(torch.equal(got[k], v) for k, v in nsfw_state_dict_from_keras(blobs["keras"]).items())


def test_the_cli_fetches_then_verifies_offline_and_exits_non_zero_on_a_bad_file(tmp_path, server):
    spec = tmp_path / "sources.json"
    spec.write_text(json.dumps(sources(server)))
    env = {**os.environ, "WINNOW_MODELS_SOURCES": str(spec), "WINNOW_MODEL_DIR": str(tmp_path / "m")}
    cmd = [sys.executable, "-m", "winnow.models", "fetch", "--model", TINY, "--pretrained", TAG,
           "--only", "aesthetic", "watermark"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "aesthetic_weights=" in done.stdout and "pinned" in done.stdout
    ok = subprocess.run([*cmd, "--offline"], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "m/watermark/watermark_model_v1.pt").write_bytes(b"oops")
    bad = subprocess.run([*cmd, "--offline", "--model-dir", str(tmp_path / "m")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1
    assert "watermark/watermark_model_v1.pt (watermark): size 4 bytes" in bad.stderr
    assert server.url("/watermark/watermark_model_v1.pt") in bad.stderr
