"""Keras weights read without TensorFlow: the LAION NSFW detector's published model, as the list
``model.get_weights()`` would return, for :func:`winnow.stages.heads.nsfw_state_dict_from_keras`.

Two file layouts are read:

* a Keras 2 HDF5 file (``model.save("x.h5")`` or ``save_weights``), with :mod:`h5py`: the
  ``layer_names`` attribute gives the layer order, each layer's ``weight_names`` its weights;
* a TensorFlow SavedModel's variables (``variables/variables.index`` and
  ``variables.data-00000-of-00001``), the layout of the published
  ``clip_autokeras_binary_nsfw.zip``: the index is a LevelDB-format table whose values are
  ``BundleEntryProto`` messages (dtype, shape, offset and size of each tensor in the data file).
  It is read here with a small table and protobuf reader; only uncompressed single-shard bundles
  (what TensorFlow writes) are supported.
"""

from __future__ import annotations

import re
import struct
import zipfile
from pathlib import Path

import numpy as np

from winnow.exceptions import HeadError

__all__ = ["keras_weights", "read_h5_weights", "read_tensor_bundle", "saved_model_weights"]

# ---- HDF5 (Keras 2) ------------------------------------------------------------------------------


def _names(attr: object) -> list[str]:
    return [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in np.asarray(attr).reshape(-1)]


def read_h5_weights(path: str | Path) -> list[np.ndarray]:
    """``model.get_weights()`` of a Keras 2 HDF5 model or weights file, in layer order."""
    import h5py

    with h5py.File(path, "r") as f:
        root = f.get("model_weights", f)
        if "layer_names" not in root.attrs:
            raise HeadError(f"{path}: not a Keras HDF5 weights file (no 'layer_names' attribute)")
        out: list[np.ndarray] = []
        for layer in _names(root.attrs["layer_names"]):
            group = root[layer]
            for weight in _names(group.attrs.get("weight_names", [])):
                out.append(np.asarray(group[weight]))
        return out


# ---- TensorFlow tensor bundle (SavedModel variables) ----------------------------------------------

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_BLOCK_TRAILER = 5  # compression type byte + masked crc32c
#: TensorFlow DataType enum -> numpy dtype (little-endian).
_DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 9: "<i8", 10: "?", 17: "<u2", 19: "<f2",
           22: "<u4", 23: "<u8"}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise HeadError("truncated varint in TensorFlow variables index")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> dict[int, list[int | bytes]]:
    """A protobuf message as ``{field number: [values]}`` (varints as ints, the rest as bytes)."""
    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise HeadError(f"unsupported protobuf wire type {wire} in TensorFlow variables index")
        fields.setdefault(number, []).append(value)
    return fields


def _block(data: bytes, offset: int, size: int, where: str) -> bytes:
    if offset + size + _BLOCK_TRAILER > len(data):
        raise HeadError(f"{where}: block past the end of the file (truncated index?)")
    if data[offset + size] != 0:
        raise HeadError(f"{where}: compressed table blocks are not supported (type {data[offset + size]})")
    return data[offset : offset + size]


def _block_entries(block: bytes, where: str) -> list[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise HeadError(f"{where}: table block too short")
    (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * restarts
    entries: list[tuple[bytes, bytes]] = []
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        entries.append((key, block[pos : pos + length]))
        pos += length
    return entries


def _table(index: bytes, where: str) -> dict[str, bytes]:
    if len(index) < _FOOTER_SIZE:
        raise HeadError(f"{where}: too short for a TensorFlow variables index")
    footer = index[-_FOOTER_SIZE:]
    (magic,) = struct.unpack_from("<Q", footer, _FOOTER_SIZE - 8)
    if magic != _TABLE_MAGIC:
        raise HeadError(f"{where}: not a TensorFlow variables index (bad table magic)")
    _meta_offset, pos = _varint(footer, 0)
    _meta_size, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, pos = _varint(footer, pos)
    out: dict[str, bytes] = {}
    for _last_key, handle in _block_entries(_block(index, index_offset, index_size, where), where):
        offset, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        for key, value in _block_entries(_block(index, offset, size, where), where):
            out[key.decode("utf8")] = value
    return out


def read_tensor_bundle(index_path: str | Path) -> dict[str, np.ndarray]:
    """Every numeric tensor of a TensorFlow checkpoint (``<prefix>.index`` and its
    ``<prefix>.data-00000-of-00001``), by checkpoint key; string tensors are skipped."""
    index_path = Path(index_path)
    where = str(index_path)
    entries = _table(index_path.read_bytes(), where)
    header = _proto_fields(entries.pop("", b""))
    shards = int(header.get(1, [1])[0])  # BundleHeaderProto.num_shards
    if shards != 1:
        raise HeadError(f"{where}: {shards} data shards; only single-shard checkpoints are supported")
    if int(header.get(2, [0])[0]) != 0:  # endianness: LITTLE = 0
        raise HeadError(f"{where}: big-endian checkpoints are not supported")
    prefix = index_path.name.removesuffix(".index")
    data_path = index_path.with_name(f"{prefix}.data-00000-of-00001")
    data = data_path.read_bytes()
    tensors: dict[str, np.ndarray] = {}
    for key, raw in entries.items():
        entry = _proto_fields(raw)
        dtype = int(entry.get(1, [0])[0])
        if dtype not in _DTYPES:
            continue  # strings (the object graph), resources...
        if 7 in entry:
            raise HeadError(f"{where}: tensor {key!r} is stored in slices, which are not supported")
        dims: list[int] = []
        for shape in entry.get(2, []):
            for dim in _proto_fields(bytes(shape)).get(2, []):
                dims.append(int(_proto_fields(bytes(dim)).get(1, [0])[0]))
        offset = int(entry.get(4, [0])[0])
        size = int(entry.get(5, [0])[0])
        if offset + size > len(data):
            raise HeadError(f"{data_path}: tensor {key!r} lies past the end of the data file (truncated?)")
        array = np.frombuffer(data, dtype=_DTYPES[dtype], count=size // np.dtype(_DTYPES[dtype]).itemsize,
                              offset=offset)
        tensors[key] = array.reshape(dims).astype(array.dtype.newbyteorder("="))
    return tensors


_LAYER_KEY = re.compile(r"^layer_with_weights-(\d+)/([^/]+)/\.ATTRIBUTES/VARIABLE_VALUE$")
#: The order of a layer's weights in ``get_weights()``, for the layer kinds of the NSFW detector.
_WEIGHT_ORDER = ("mean", "variance", "count", "kernel", "bias")


def saved_model_weights(index_path: str | Path) -> list[np.ndarray]:
    """``model.get_weights()`` of a Keras SavedModel from its variables: the
    ``layer_with_weights-<k>/<weight>`` tensors, layer by layer (optimizer state is left out)."""
    layers: dict[int, dict[str, np.ndarray]] = {}
    for key, array in read_tensor_bundle(index_path).items():
        m = _LAYER_KEY.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = array
    if not layers:
        raise HeadError(f"{index_path}: no Keras layer weights (layer_with_weights-<k>/...) in this checkpoint")
    out: list[np.ndarray] = []
    for k in sorted(layers):
        unknown = sorted(set(layers[k]) - set(_WEIGHT_ORDER))
        if unknown:
            raise HeadError(f"{index_path}: layer_with_weights-{k} has weights {unknown}, which this reader "
                            f"does not know how to order (it knows {list(_WEIGHT_ORDER)})")
        out += [layers[k][name] for name in _WEIGHT_ORDER if name in layers[k]]
    return out


def keras_weights(path: str | Path) -> list[np.ndarray]:
    """``model.get_weights()`` of a Keras model file: an ``.h5``, a SavedModel folder, its
    ``variables.index``, or a ``.zip`` holding either (as the LAION NSFW detector is published)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("variables.index")) or sorted(path.rglob("*.h5"))
        if not found:
            raise HeadError(f"{path}: no SavedModel variables/variables.index or .h5 file inside")
        return keras_weights(found[0])
    if path.suffix in (".h5", ".hdf5", ".keras"):
        return read_h5_weights(path)
    if path.name.endswith(".index"):
        return saved_model_weights(path)
    if zipfile.is_zipfile(path):
        raise HeadError(f"{path}: unzip it first (keras_weights reads the extracted folder)")
    raise HeadError(f"{path}: not a Keras .h5 file, SavedModel folder or variables.index")
