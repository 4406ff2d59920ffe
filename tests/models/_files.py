"""What the model tests serve and read: a loopback HTTP server (Range requests, a connection
dropped mid-file on demand, extra response headers), and the weights files built here: a tiny
open_clip checkpoint, an aesthetic ``.pth``, the NSFW detector as a Keras SavedModel zip (the
layout of the published ``clip_autokeras_binary_nsfw.zip``) or a Keras 2 ``.h5``, and a watermark
detector state dict."""

from __future__ import annotations

import hashlib
import io
import struct
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch

# ---- the server ------------------------------------------------------------------------------------


class Server:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1; ``requests`` logs (path, Range header)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.drop_once: set[str] = set()  # paths whose first GET stops half-way and closes
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                for k, v in server.headers.get(self.path, {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.path in server.drop_once:
                    server.drop_once.discard(self.path)
                    self.wfile.write(body[start : start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def gets(self, path: str) -> list[str | None]:
        """The Range headers of the requests for ``path``, in order."""
        return [r for p, r in self.requests if p == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


# ---- weights ---------------------------------------------------------------------------------------


def _saved(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def tiny_clip_checkpoint(seed: int = 5) -> bytes:
    """A ``torch.save``d state dict of the registered ``winnow-tiny-vit`` config."""
    import open_clip

    from winnow.stages.models import TINY_MODEL, register_model_configs

    register_model_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_MODEL, pretrained=None, device="cpu")
    return _saved(model.state_dict())


def aesthetic_pth(seed: int = 0) -> bytes:
    """An aesthetic MLP whose scores sit near 5, as the published one's do (a run's threshold 0
    keeps every record)."""
    from winnow.stages.heads import AestheticMLP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = AestheticMLP().state_dict()
    state["layers.7.bias"] = torch.full_like(state["layers.7.bias"], 5.0)
    return _saved(state)


def watermark_pt() -> bytes:
    from winnow.stages.watermark import build_watermark_model

    return _saved(build_watermark_model().state_dict())


def keras_nsfw_weights(seed: int = 1, dim: int = 768) -> list[np.ndarray]:
    """The NSFW detector's ``model.get_weights()``: normalization mean, variance, count, then
    kernel (in, out) and bias of Dense 64, 512, 256, 1."""
    rng = np.random.default_rng(seed)
    out = [rng.normal(0, 0.03, dim).astype(np.float32), rng.uniform(5e-4, 2e-3, dim).astype(np.float32),
           np.array(123456, dtype=np.int64)]
    widths = [dim, 64, 512, 256, 1]
    for a, b in zip(widths, widths[1:], strict=False):
        out += [rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32), rng.normal(0, 0.01, b).astype(np.float32)]
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _table_block(entries: list[tuple[bytes, bytes]]) -> bytes:
    body, restarts = b"", []
    for key, value in entries:  # every entry a restart point: no shared key prefixes
        restarts.append(len(body))
        body += _varint(0) + _varint(len(key)) + _varint(len(value)) + key + value
    return body + b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))


def _bundle_entry(dtype: int, shape: tuple[int, ...], offset: int, size: int) -> bytes:
    dims = b"".join(b"\x12" + _varint(len(d)) + d for d in (b"\x08" + _varint(s) for s in shape))
    return b"\x08" + _varint(dtype) + b"\x12" + _varint(len(dims)) + dims + b"\x20" + _varint(offset) + b"\x28" + \
        _varint(size)


def tensor_bundle(tensors: dict[str, np.ndarray], strings: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
    """(``variables.index``, ``variables.data-00000-of-00001``) of a TensorFlow checkpoint holding
    ``tensors`` (float32/int64), plus string-typed entries named ``strings`` (skipped by readers)."""
    dtypes = {np.dtype(np.float32): 1, np.dtype(np.int64): 9}
    data = b""
    entries = [(b"", b"\x08\x01")]  # BundleHeaderProto: num_shards=1, little-endian
    for key in sorted([*tensors, *strings]):
        if key in strings:
            entries.append((key.encode(), _bundle_entry(7, (), len(data), 0)))
            continue
        raw = np.ascontiguousarray(tensors[key]).astype(tensors[key].dtype.newbyteorder("<")).tobytes()
        entries.append((key.encode(), _bundle_entry(dtypes[tensors[key].dtype], tensors[key].shape, len(data),
                                                    len(raw))))
        data += raw
    entries.sort()
    trailer = b"\x00" + b"\x00" * 4  # no compression; the crc is not checked by the reader
    data_block = _table_block(entries)
    buf = data_block + trailer
    meta = _table_block([])
    meta_at = len(buf)
    buf += meta + trailer
    index = _table_block([(entries[-1][0] + b"\xff", _varint(0) + _varint(len(data_block)))])
    index_at = len(buf)
    buf += index + trailer
    footer = (_varint(meta_at) + _varint(len(meta)) + _varint(index_at) + _varint(len(index))).ljust(40, b"\0")
    return buf + footer + struct.pack("<Q", 0xDB4775248B80FB57), data


def nsfw_saved_model_zip(weights: list[np.ndarray], folder: str = "clip_autokeras_binary_nsfw") -> bytes:
    """A zip in the published layout: ``<folder>/{saved_model.pb, keras_metadata.pb,
    variables/variables.index, variables/variables.data-00000-of-00001}``; the normalization is
    ``layer_with_weights-1`` (autokeras' input encoding layer is 0 and holds only lookup tables)."""
    names = ["mean", "variance", "count"]
    tensors = {f"layer_with_weights-1/{n}/.ATTRIBUTES/VARIABLE_VALUE": w for n, w in zip(names, weights, strict=False)}
    for i in range(4):
        tensors[f"layer_with_weights-{2 + i}/kernel/.ATTRIBUTES/VARIABLE_VALUE"] = weights[3 + 2 * i]
        tensors[f"layer_with_weights-{2 + i}/bias/.ATTRIBUTES/VARIABLE_VALUE"] = weights[4 + 2 * i]
    tensors["layer_with_weights-2/kernel/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE"] = weights[3] * 0
    tensors["keras_api/metrics/0/total/.ATTRIBUTES/VARIABLE_VALUE"] = np.float32(3.0).reshape(())
    index, data = tensor_bundle(tensors, strings=("_CHECKPOINTABLE_OBJECT_GRAPH",))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{folder}/saved_model.pb", b"not read")
        z.writestr(f"{folder}/keras_metadata.pb", b"not read")
        z.writestr(f"{folder}/variables/variables.index", index)
        z.writestr(f"{folder}/variables/variables.data-00000-of-00001", data)
    return buf.getvalue()


def keras_h5(path: Path, weights: list[np.ndarray]) -> None:
    """A Keras 2 ``model.save(...h5)`` file: ``model_weights`` with ``layer_names`` and each
    layer's ``weight_names`` (a dropout layer without weights in between)."""
    import h5py

    layers = [("normalization", ["mean:0", "variance:0", "count:0"], weights[:3]), ("dense", ["kernel:0", "bias:0"],
              weights[3:5]), ("dropout", [], []), ("dense_1", ["kernel:0", "bias:0"], weights[5:7]),
              ("dense_2", ["kernel:0", "bias:0"], weights[7:9]), ("dense_3", ["kernel:0", "bias:0"], weights[9:11])]
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights")
        root.attrs["layer_names"] = np.array([n.encode() for n, _, _ in layers])
        for name, wnames, arrays in layers:
            g = root.create_group(name)
            full = [f"{name}/{w}".encode() for w in wnames]
            g.attrs["weight_names"] = np.array(full, dtype="S") if full else np.array([], dtype="S1")
            for w, a in zip(full, arrays, strict=True):
                g.create_dataset(w.decode(), data=a)
