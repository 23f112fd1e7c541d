"""An ONNX model read without its weights' bytes: what the planner needs, in a few MiB.

onnx.load parses the whole protobuf, so planning a 330 MiB ViT-B held 330 MiB before any
copy. The planner needs every tensor's shape and type, and the values of the small tensors
that shapes are computed from (Reshape targets, Slice bounds), never the weights. This
reads the file field by field (the protobuf wire format) and copies everything except the
data of large tensors: initializers and Constant nodes' values over `keep` bytes keep their
name, dims and type and lose their data, which is skipped on disk, never read. The result
is an ordinary ModelProto (external data is not loaded either).

    model = load_skeleton("vit_b_16.onnx")     # shape inference works on it; engines cannot run it
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx

# Field numbers in onnx.proto that lead to a tensor, and a tensor's data fields.
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER = 1, 5
_NODE_ATTRIBUTE = 5
_ATTRIBUTE_TENSOR = 5
_TENSOR_DATA = {4, 5, 6, 7, 9, 10, 11}  # float, int32, string, int64, raw, double, uint64 data
KEEP = 1 << 16  # bytes of data a tensor keeps: shape-carrying constants are far smaller


def _varint(f) -> int | None:
    shift = value = 0
    while True:
        b = f.read(1)
        if not b:
            if shift:
                raise ValueError("truncated varint")
            return None
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
        shift += 7


def _encode(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# message kind -> {field number: kind of the sub-message to rewrite}
_WALK = {"model": {_MODEL_GRAPH: "graph"},
         "graph": {_GRAPH_NODE: "node", _GRAPH_INITIALIZER: "tensor"},
         "node": {_NODE_ATTRIBUTE: "attribute"},
         "attribute": {_ATTRIBUTE_TENSOR: "tensor"},
         "tensor": {}}


def _copy(f, end: int, kind: str, keep: int) -> bytes:
    """The message from f's position to `end`, with large tensor data left out."""
    out = bytearray()
    while f.tell() < end:
        key = _varint(f)
        if key is None:
            raise ValueError("not an ONNX model (a message runs past the end of the file)")
        field, wire = key >> 3, key & 7
        if wire == 0:
            out += _encode(key) + _encode(_varint(f))
        elif wire in (1, 5):
            out += _encode(key) + f.read(8 if wire == 1 else 4)
        elif wire == 2:
            length = _varint(f)
            start = f.tell()
            if kind == "tensor" and field in _TENSOR_DATA and length > keep:
                f.seek(start + length)  # the weights' bytes: never read
                continue
            sub = _WALK[kind].get(field)
            body = _copy(f, start + length, sub, keep) if sub else f.read(length)
            out += _encode(key) + _encode(len(body)) + body
        else:
            raise ValueError(f"not an ONNX model (protobuf wire type {wire})")
    if f.tell() != end:
        raise ValueError("a field runs past the end of its message")
    return bytes(out)


def load_skeleton(path: str | Path, keep: int = KEEP) -> onnx.ModelProto:
    """The model at `path` without the data of tensors larger than `keep` bytes."""
    with open(path, "rb", buffering=1 << 16) as f:
        data = _copy(f, os.fstat(f.fileno()).st_size, "model", keep)
    try:
        return onnx.ModelProto.FromString(data)
    except Exception as e:  # protobuf's DecodeError, whose module path varies by implementation
        raise ValueError(f"not an ONNX model ({e})") from None
