"""Tensors as TF Serving and the Open Inference Protocol carry them, to and from numpy.
No I/O. Every malformed tensor raises :class:`InvalidInput` saying which one and why.

Strings: TF Serving's ``DT_STRING`` and OIP's ``BYTES`` are byte strings, a numpy object
array of ``bytes`` here (the wire's ``bytes`` kind); ``str`` outputs (class labels) go out
UTF-8 encoded.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from queueing.errors import InvalidInput
from queueing.wire import BYTES, DEFAULT_LIMITS, STR, dtype_name
from workers.gateway.proto import oip_pb2, tfs_pb2

#: The most elements one tensor may have: the pool's own default limit.
MAX_ELEMENTS = DEFAULT_LIMITS.max_elements

# wire kind -> TF Serving DataType, OIP datatype
_TF_TYPES: dict[str, int] = {
    "float32": tfs_pb2.DT_FLOAT,
    "float64": tfs_pb2.DT_DOUBLE,
    "float16": tfs_pb2.DT_HALF,
    "int8": tfs_pb2.DT_INT8,
    "int16": tfs_pb2.DT_INT16,
    "int32": tfs_pb2.DT_INT32,
    "int64": tfs_pb2.DT_INT64,
    "uint8": tfs_pb2.DT_UINT8,
    "uint16": tfs_pb2.DT_UINT16,
    "uint32": tfs_pb2.DT_UINT32,
    "uint64": tfs_pb2.DT_UINT64,
    "bool": tfs_pb2.DT_BOOL,
    "complex64": tfs_pb2.DT_COMPLEX64,
    "complex128": tfs_pb2.DT_COMPLEX128,
    BYTES: tfs_pb2.DT_STRING,
    STR: tfs_pb2.DT_STRING,
}
_FROM_TF: dict[int, str] = {v: k for k, v in _TF_TYPES.items() if k != STR}

_OIP_TYPES: dict[str, str] = {
    "float32": "FP32",
    "float64": "FP64",
    "float16": "FP16",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "bool": "BOOL",
    BYTES: "BYTES",
    STR: "BYTES",
}
_FROM_OIP: dict[str, str] = {v: k for k, v in _OIP_TYPES.items() if k != STR}


def tf_dtype(kind: str) -> int:
    """The TF Serving ``DataType`` of a wire kind (``float32``, ``bytes``...); DT_INVALID
    for one it has no name for."""
    return _TF_TYPES.get(kind, tfs_pb2.DT_INVALID)


def tf_dtype_name(kind: str) -> str:
    """E.g. ``DT_FLOAT``: how TF Serving's REST metadata names a dtype."""
    return tfs_pb2.DataType.Name(tf_dtype(kind))


def oip_datatype(kind: str) -> str:
    """The OIP datatype of a wire kind (``FP32``, ``BYTES``...)."""
    datatype = _OIP_TYPES.get(kind)
    if datatype is None:
        raise InvalidInput(f"dtype {kind} has no Open Inference Protocol datatype")
    return datatype


def oip_kind(datatype: str, where: str) -> str:
    """The wire kind of an OIP datatype."""
    kind = _FROM_OIP.get(datatype)
    if kind is None:
        raise InvalidInput(f"{where}: datatype {datatype!r} is not supported")
    return kind


def check_shape(shape: Sequence[int], where: str) -> int:
    """The element count of ``shape``; raises InvalidInput for a negative or huge one."""
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{where}: shape {list(shape)} has a negative dimension")
    if len(shape) > DEFAULT_LIMITS.max_rank:
        raise InvalidInput(
            f"{where}: rank {len(shape)} is over the limit {DEFAULT_LIMITS.max_rank}"
        )
    # Zero dimensions left out of the bound: numpy refuses [0, 10**6, 10**6, 10**7] too.
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise InvalidInput(f"{where}: shape {list(shape)} is over the limit {MAX_ELEMENTS}")
    return math.prod(shape)


def bytes_array(items: Sequence[bytes], shape: Sequence[int]) -> np.ndarray:
    """An object array of ``bytes`` (the wire's ``bytes`` kind), shaped."""
    array = np.empty(len(items), dtype=object)
    array[:] = list(items)
    return array.reshape(shape)


def _as_items(array: np.ndarray) -> list[bytes]:
    """The items of a ``bytes`` or ``str`` array as byte strings, in C order."""
    return [item.encode() if isinstance(item, str) else bytes(item) for item in array.ravel()]


# --- TF Serving TensorProto -------------------------------------------------------------


def from_tensor_proto(proto: tfs_pb2.TensorProto, where: str) -> np.ndarray:
    """The array a TensorProto holds, as ``tf.make_ndarray`` reads it: ``tensor_content``
    when set, else the typed ``*_val`` field, whose last value fills a short list."""
    kind = _FROM_TF.get(proto.dtype)
    if kind is None:
        try:
            name = tfs_pb2.DataType.Name(proto.dtype)
        except ValueError:
            name = str(proto.dtype)
        raise InvalidInput(f"{where}: dtype {name} is not supported")
    if proto.tensor_shape.unknown_rank:
        raise InvalidInput(f"{where}: the tensor's shape is unknown")
    shape = [d.size for d in proto.tensor_shape.dim]
    elements = check_shape(shape, where)
    if kind == BYTES:
        items = list(proto.string_val)
        return bytes_array(_filled(items, elements, b"", where), shape)
    dtype = np.dtype(kind).newbyteorder("<")
    if proto.tensor_content:
        if len(proto.tensor_content) != elements * dtype.itemsize:
            raise InvalidInput(
                f"{where}: {kind} {shape} needs {elements * dtype.itemsize} bytes of"
                f" tensor_content, got {len(proto.tensor_content)}"
            )
        return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape)
    values = _typed_values(proto, kind)
    if len(values) != elements:
        values = _filled_array(values, elements, where)
    return values.astype(kind, copy=False).reshape(shape)


def _typed_values(proto: tfs_pb2.TensorProto, kind: str) -> np.ndarray:
    if kind == "float32":
        return np.array(proto.float_val, np.float32)
    if kind == "float64":
        return np.array(proto.double_val, np.float64)
    if kind == "float16":  # half_val holds the IEEE half bits in int32s
        return np.array(proto.half_val, np.uint16).view(np.float16)
    if kind in ("int8", "int16", "int32", "uint8", "uint16"):
        return np.array(proto.int_val, np.int64).astype(kind)
    if kind == "int64":
        return np.array(proto.int64_val, np.int64)
    if kind == "uint32":
        return np.array(proto.uint32_val, np.uint32)
    if kind == "uint64":
        return np.array(proto.uint64_val, np.uint64)
    if kind == "bool":
        return np.array(proto.bool_val, np.bool_)
    if kind == "complex64":  # (real, imaginary) pairs
        return np.array(proto.scomplex_val, np.float32).view(np.complex64)
    return np.array(proto.dcomplex_val, np.float64).view(np.complex128)


def _filled_array(values: np.ndarray, elements: int, where: str) -> np.ndarray:
    if len(values) > elements:
        raise InvalidInput(f"{where}: {len(values)} values for {elements} elements")
    if len(values) == 0:  # TensorFlow's reading: all zeros
        return np.zeros(elements, values.dtype)
    return np.concatenate([values, np.full(elements - len(values), values[-1], values.dtype)])


def _filled(items: list[bytes], elements: int, empty: bytes, where: str) -> list[bytes]:
    if len(items) == elements:
        return items
    if len(items) > elements:
        raise InvalidInput(f"{where}: {len(items)} values for {elements} elements")
    return items + [items[-1] if items else empty] * (elements - len(items))


def to_tensor_proto(array: np.ndarray) -> tfs_pb2.TensorProto:
    """A TensorProto of ``array`` as TF Serving writes one: numbers in ``tensor_content``
    (little-endian), strings in ``string_val``."""
    kind = dtype_name(array)
    proto = tfs_pb2.TensorProto(dtype=tf_dtype(kind))  # type: ignore[arg-type]
    proto.tensor_shape.dim.extend(tfs_pb2.TensorShapeProto.Dim(size=d) for d in array.shape)
    if kind in (BYTES, STR):
        proto.string_val.extend(_as_items(array))
    else:
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        proto.tensor_content = np.ascontiguousarray(little).tobytes()
    return proto


def tensor_shape(shape: Sequence[int | None]) -> tfs_pb2.TensorShapeProto:
    """A TensorShapeProto; ``None`` (any size) is written as -1, as TensorFlow does."""
    return tfs_pb2.TensorShapeProto(
        dim=[tfs_pb2.TensorShapeProto.Dim(size=-1 if d is None else d) for d in shape]
    )


# --- Open Inference Protocol (gRPC) ------------------------------------------------------


def from_infer_input(
    tensor: oip_pb2.ModelInferRequest.InferInputTensor, raw: bytes | None, where: str
) -> np.ndarray:
    """An OIP input tensor as an array: from its raw bytes when the request sent
    ``raw_input_contents`` (BYTES items each prefixed by a 4-byte little-endian length),
    else from ``contents``."""
    kind = oip_kind(tensor.datatype, where)
    shape = list(tensor.shape)
    elements = check_shape(shape, where)
    if raw is not None:
        if kind == BYTES:
            return bytes_array(_split_raw_items(raw, elements, where), shape)
        dtype = np.dtype(kind).newbyteorder("<")
        if len(raw) != elements * dtype.itemsize:
            raise InvalidInput(
                f"{where}: {tensor.datatype} {shape} needs {elements * dtype.itemsize} raw bytes,"
                f" got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    contents = tensor.contents
    values: Any
    if kind == BYTES:
        values = list(contents.bytes_contents)
        if len(values) != elements:
            raise InvalidInput(f"{where}: {len(values)} values for {elements} elements")
        return bytes_array(values, shape)
    if kind == "float16":
        raise InvalidInput(f"{where}: FP16 tensors must come as raw_input_contents")
    fields: dict[str, Sequence[Any]] = {
        "bool": contents.bool_contents,
        "int8": contents.int_contents,
        "int16": contents.int_contents,
        "int32": contents.int_contents,
        "int64": contents.int64_contents,
        "uint8": contents.uint_contents,
        "uint16": contents.uint_contents,
        "uint32": contents.uint_contents,
        "uint64": contents.uint64_contents,
        "float32": contents.fp32_contents,
        "float64": contents.fp64_contents,
    }
    field = fields[kind]
    if len(field) != elements:
        raise InvalidInput(f"{where}: {len(field)} values for {elements} elements")
    return np.array(field, dtype=kind).reshape(shape)


def _split_raw_items(raw: bytes, elements: int, where: str) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"{where}: truncated BYTES length prefix")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidInput(f"{where}: a BYTES item runs past the end of its raw contents")
        items.append(raw[offset : offset + size])
        offset += size
    if len(items) != elements:
        raise InvalidInput(f"{where}: {len(items)} BYTES items for {elements} elements")
    return items


def to_infer_output(
    name: str, array: np.ndarray
) -> tuple[oip_pb2.ModelInferResponse.InferOutputTensor, bytes]:
    """An OIP output tensor and its raw bytes (what Triton answers: ``raw_output_contents``,
    BYTES items length-prefixed)."""
    kind = dtype_name(array)
    tensor = oip_pb2.ModelInferResponse.InferOutputTensor(
        name=name, datatype=oip_datatype(kind), shape=list(array.shape)
    )
    if kind in (BYTES, STR):
        raw = b"".join(struct.pack("<I", len(item)) + item for item in _as_items(array))
    else:
        raw = np.ascontiguousarray(
            array.astype(array.dtype.newbyteorder("<"), copy=False)
        ).tobytes()
    return tensor, raw
