"""The wire format: msgpack in, msgpack out, numpy arrays without copies. No I/O here.

A request is a stream entry with three fields: ``id``, ``reply`` (the producer's reply
list, may be empty) and ``body``, a msgpack map::

    {"v": 1, "model": str, "inputs": ARRAY | {name: ARRAY}, "deadline_ms": int | None,
     "keep_s": int}

A result, added to the reply stream (and kept under the id when asked), is a msgpack map::

    {"v": 1, "id": str, "outputs": ARRAY | {name: ARRAY}}      on success
    {"v": 1, "id": str, "error": [kind, message]}              on failure

An ARRAY is ``[dtype, shape, data]``: a dtype name from :data:`ALLOWED_DTYPES`, a list of
dimensions, and the raw little-endian C-order bytes. Two more kinds carry variable-length
items, ``data`` then being a list of ``prod(shape)`` items in C order:

* ``"bytes"``: msgpack bin items, e.g. encoded JPEG/PNG images; a numpy object array of
  ``bytes`` on either side (a fixed-width ``S`` array would drop trailing NUL bytes);
* ``"str"``: msgpack str items, e.g. class labels; a numpy ``U`` array on either side.

Nothing here unpickles, evaluates or looks up anything by a name the sender chose beyond
the dtype allow-list: whoever can write to Redis can submit work, nothing more.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgpack
import numpy as np

from queueing.errors import InvalidInput, ProtocolError, RequestError, error_from_wire

PROTOCOL_VERSION = 1

#: dtypes accepted on the wire. No object, void, string or datetime dtypes: they either
#: carry pointers or have no fixed item size.
ALLOWED_DTYPES: frozenset[str] = frozenset(
    [
        "bool",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    ]
)

#: The kinds of variable-length items (not numpy dtypes; see the module docstring).
BYTES = "bytes"
STR = "str"

Inputs = np.ndarray | dict[str, np.ndarray]
Outputs = np.ndarray | dict[str, np.ndarray]

#: One input as a producer may give it: an array (or what ``np.asarray`` takes), one
#: encoded item (``bytes``: an image, say) or a list of them.
SendableArray = np.ndarray | bytes | Sequence[bytes]
#: A request's inputs as a producer may give them: one input, or a dict of them by name.
Sendable = SendableArray | Mapping[str, SendableArray]


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Bounds on what a worker will decode. Every one is configurable; defaults are safe."""

    max_payload_bytes: int = 64 * 2**20
    max_rank: int = 8
    max_elements: int = 2**26
    max_inputs: int = 64
    max_name_length: int = 256
    #: Most items in one ``bytes`` or ``str`` array.
    max_items: int = 65536

    def __post_init__(self) -> None:
        for name in ("max_payload_bytes", "max_rank", "max_elements", "max_inputs", "max_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


DEFAULT_LIMITS = Limits()

# Looked up per array on the hot path: dtype objects hash fast, dtype.name is computed.
_NATIVE_NAMES: dict[np.dtype[Any], str] = {np.dtype(n): n for n in ALLOWED_DTYPES}
_DTYPES: dict[str, np.dtype[Any]] = {n: np.dtype(n) for n in ALLOWED_DTYPES}


@dataclass(frozen=True, slots=True)
class RequestBody:
    """A decoded, structurally valid request body (not yet checked against a model)."""

    model: str
    inputs: Inputs
    deadline_ms: int | None
    keep_s: int
    #: The producer's W3C trace context (``traceparent``), when it sent one.
    traceparent: str | None = None


@dataclass(frozen=True, slots=True)
class Result:
    """A decoded result: ``outputs`` on success, else ``error``."""

    request_id: str
    outputs: Outputs | None
    error: RequestError | None
    #: The version of the model that made ``outputs`` (None: a pool that does not say).
    version: int | None = None


# --- arrays -----------------------------------------------------------------------------


def encode_array(array: np.ndarray) -> list[Any]:
    """``[dtype, shape, data]`` for msgpack; the data is a view of the array, not a copy
    (unless the array is not C-contiguous little-endian, when one copy makes it so)."""
    name = _NATIVE_NAMES.get(array.dtype)
    if name is None and array.dtype.kind in "OSU":
        return _encode_items(array)
    if name is None:
        if array.dtype.name not in ALLOWED_DTYPES:
            raise InvalidInput(
                f"dtype {array.dtype} cannot be sent; allowed: {sorted(ALLOWED_DTYPES)}"
            )
        name = array.dtype.name
        array = array.astype(array.dtype.newbyteorder("<"))  # big-endian: swap once
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would make a 0-d array 1-d)
        array = array.copy(order="C")
    return [name, array.shape, array.data]


def _encode_items(array: np.ndarray) -> list[Any]:
    """A ``bytes`` or ``str`` array: ``S`` / ``U`` arrays, or object arrays all of whose
    items are bytes (or all str)."""
    items = array.ravel().tolist()
    if array.dtype.kind == "S":
        return [BYTES, array.shape, items]
    if array.dtype.kind == "U":
        return [STR, array.shape, items]
    if all(isinstance(item, bytes) for item in items):
        return [BYTES, array.shape, items]
    if all(isinstance(item, str) for item in items):
        return [STR, array.shape, items]
    kinds = sorted({type(item).__name__ for item in items})
    raise InvalidInput(
        f"an object array cannot be sent unless its items are all bytes or all str; got {kinds}"
    )


def as_array(value: object) -> np.ndarray:
    """``value`` as an array to send: ``bytes`` (one encoded image, say) and lists of bytes
    become object arrays, so that no trailing NUL byte is lost; the rest ``np.asarray``."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        scalar = np.empty((), dtype=object)
        scalar[()] = bytes(value)
        return scalar
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, bytes) for v in value):
        array = np.empty(len(value), dtype=object)
        array[:] = list(value)
        return array
    return np.asarray(value)


def dtype_name(array: np.ndarray) -> str:
    """The wire's name for ``array``'s dtype: ``bytes`` for object arrays (what the decoder
    makes of ``bytes`` items), ``str`` for ``U`` arrays, else the numpy name."""
    if array.dtype.kind in "OS":
        return BYTES
    if array.dtype.kind == "U":
        return STR
    return array.dtype.name


def decode_array(obj: object, limits: Limits, where: str) -> np.ndarray:
    """The array that ``obj`` (``[dtype, shape, data]``) describes, as a read-only view of
    ``data``. Raises :class:`InvalidInput` saying what is wrong and where."""
    if not isinstance(obj, (list, tuple)) or len(obj) != 3:
        raise InvalidInput(f"{where}: expected [dtype, shape, data], got {_describe(obj)}")
    dtype_name, shape, data = obj
    if dtype_name in (BYTES, STR):
        return _decode_items(dtype_name, shape, data, limits, where)
    dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise InvalidInput(f"{where}: dtype {dtype_name!r} is not allowed")
    elements = _check_shape(shape, limits, where)
    if not isinstance(data, bytes):
        raise InvalidInput(f"{where}: data must be bytes, got {_describe(data)}")
    if elements * dtype.itemsize != len(data):
        raise InvalidInput(
            f"{where}: {dtype_name} {list(shape)} needs {elements * dtype.itemsize} bytes,"
            f" got {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _check_shape(shape: object, limits: Limits, where: str) -> int:
    """The number of elements of a valid ``shape``; raises :class:`InvalidInput` if not."""
    if not isinstance(shape, (list, tuple)):
        raise InvalidInput(f"{where}: shape must be a list, got {_describe(shape)}")
    if len(shape) > limits.max_rank:
        raise InvalidInput(f"{where}: rank {len(shape)} is over the limit {limits.max_rank}")
    for dim in shape:
        # bool is an int subclass; a shape of [True] is a bug on the sender's side.
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise InvalidInput(f"{where}: shape {list(shape)} must be non-negative integers")
    elements = math.prod(shape)
    if elements > limits.max_elements:
        raise InvalidInput(f"{where}: {elements} elements is over the limit {limits.max_elements}")
    # An empty array may still claim huge dimensions ([0, 2**40, 2**40]): numpy refuses to
    # make such a shape at all, so the other dimensions are bounded as if the 0 were a 1.
    if elements == 0 and math.prod(dim for dim in shape if dim) > limits.max_elements:
        raise InvalidInput(f"{where}: shape {list(shape)} is over the limit {limits.max_elements}")
    return elements


def _decode_items(kind: str, shape: object, data: object, limits: Limits, where: str) -> np.ndarray:
    elements = _check_shape(shape, limits, where)
    shape = cast(list[int], shape)
    if elements > limits.max_items:
        raise InvalidInput(f"{where}: {elements} items is over the limit {limits.max_items}")
    if not isinstance(data, (list, tuple)) or len(data) != elements:
        raise InvalidInput(
            f"{where}: {kind} {list(shape)} needs a list of {elements} items, got {_describe(data)}"
        )
    item_type = bytes if kind == BYTES else str
    if not all(type(item) is item_type for item in data):
        raise InvalidInput(f"{where}: every item of a {kind} array must be {kind}")
    if kind == STR:
        return np.array(data, dtype=str).reshape(shape)
    array = np.empty(elements, dtype=object)
    array[:] = data
    return array.reshape(shape)


def _encode_arrays(value: Sendable) -> Any:
    if isinstance(value, np.ndarray):
        return encode_array(value)
    if isinstance(value, Mapping):
        return {str(name): encode_array(as_array(a)) for name, a in value.items()}
    return encode_array(as_array(value))


def _decode_arrays(obj: object, limits: Limits, what: str) -> Inputs:
    if isinstance(obj, dict):
        if not obj:
            raise InvalidInput(f"{what}: no arrays given")
        if len(obj) > limits.max_inputs:
            raise InvalidInput(f"{what}: {len(obj)} arrays is over the limit {limits.max_inputs}")
        arrays: dict[str, np.ndarray] = {}
        for name, value in obj.items():
            if not isinstance(name, str) or len(name) > limits.max_name_length:
                raise InvalidInput(f"{what}: array names must be short strings")
            arrays[name] = decode_array(value, limits, f"{what[:-1]} {name!r}")
        return arrays
    return decode_array(obj, limits, what)


# --- requests ---------------------------------------------------------------------------


def encode_request_body(
    model: str,
    inputs: Sendable,
    *,
    deadline_ms: int | None = None,
    keep_s: int = 0,
    traceparent: str | None = None,
) -> bytes:
    """The msgpack body of a request for ``model``; ``traceparent``: the producer's W3C
    trace context, for the worker's spans (absent from the body when None)."""
    body: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "model": model,
        "inputs": _encode_arrays(inputs),
        "deadline_ms": deadline_ms,
        "keep_s": keep_s,
    }
    if traceparent is not None:
        body["traceparent"] = traceparent
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def _body_tail(deadline_ms: int | None, keep_s: int) -> bytes:
    """The last two pairs of a request body, as :func:`encode_request_body` packs them."""
    return b"".join(
        msgpack.packb(item, use_bin_type=True)
        for item in ("deadline_ms", deadline_ms, "keep_s", keep_s)
    )


def with_deadline(body: bytes, deadline_ms: int, keep_s: int, new_deadline_ms: int) -> bytes:
    """``body`` (from :func:`encode_request_body` with ``deadline_ms`` and ``keep_s``) with
    its deadline replaced, without unpacking it: the deadline and ``keep_s`` are its last
    two pairs. A client that holds a request before sending it shortens the deadline by
    that wait, since a worker counts the deadline from the request's arrival in Redis."""
    old = _body_tail(deadline_ms, keep_s)
    if not body.endswith(old):
        raise ValueError("not a request body encoded with this deadline and keep_s")
    return body[: len(body) - len(old)] + _body_tail(new_deadline_ms, keep_s)


def decode_request_body(body: object, limits: Limits = DEFAULT_LIMITS) -> RequestBody:
    """Decode and structurally validate a request body. Raises :class:`InvalidInput`."""
    if not isinstance(body, bytes):
        raise InvalidInput("request has no body")
    if len(body) > limits.max_payload_bytes:
        raise InvalidInput(
            f"request body of {len(body)} bytes is over the limit {limits.max_payload_bytes}"
        )
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_bin_len=limits.max_payload_bytes,
            max_str_len=limits.max_payload_bytes,
            max_array_len=max(limits.max_rank, 16, limits.max_items),
            max_map_len=max(limits.max_inputs, 16),
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise InvalidInput(f"request body is not valid msgpack: {e}") from e
    if not isinstance(obj, dict):
        raise InvalidInput(f"request body must be a map, got {_describe(obj)}")
    version = obj.get("v")
    if version != PROTOCOL_VERSION:
        raise InvalidInput(f"protocol version {version!r} is not supported (need 1)")
    model = obj.get("model")
    if not isinstance(model, str):
        raise InvalidInput(f"model must be a string, got {_describe(model)}")
    deadline_ms = obj.get("deadline_ms")
    if deadline_ms is not None and (not _is_int(deadline_ms) or deadline_ms < 0):
        raise InvalidInput(f"deadline_ms must be a non-negative integer, got {deadline_ms!r}")
    keep_s = obj.get("keep_s", 0)
    if not _is_int(keep_s) or keep_s < 0:
        raise InvalidInput(f"keep_s must be a non-negative integer, got {keep_s!r}")
    if "inputs" not in obj:
        raise InvalidInput("request has no inputs")
    try:
        inputs = _decode_arrays(obj["inputs"], limits, "inputs")
    except InvalidInput:
        raise
    except Exception as e:
        # The checks above are meant to leave numpy nothing to refuse; if one ever misses a
        # case, the request still gets its typed error and the worker reads on.
        raise InvalidInput(f"inputs cannot be decoded: {type(e).__name__}: {e}") from e
    # A trace context is a hint, not part of the request: a malformed one is ignored (as
    # W3C Trace Context asks), never a reason to refuse the request.
    traceparent = obj.get("traceparent")
    if not isinstance(traceparent, str) or not _TRACEPARENT.match(traceparent):
        traceparent = None
    return RequestBody(model=model, inputs=inputs, deadline_ms=deadline_ms, keep_s=keep_s,
                       traceparent=traceparent)  # fmt: skip


#: W3C Trace Context ``traceparent``: version, trace id, parent span id, flags.
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


# --- results ----------------------------------------------------------------------------


def encode_result(request_id: str, outputs: Outputs, version: int | None = None) -> bytes:
    """A success result; the output arrays are packed from their buffers. ``version``: the
    model version that made it (key ``mv``; absent when None, as older pools send it)."""
    obj: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id,
                           "outputs": _encode_arrays(outputs)}  # fmt: skip
    if version is not None:
        obj["mv"] = version
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def encode_error(request_id: str, error: RequestError) -> bytes:
    """A failure result naming the error class and its message."""
    return msgpack.packb(  # type: ignore[no-any-return]
        {"v": PROTOCOL_VERSION, "id": request_id, "error": [type(error).__name__, str(error)]},
        use_bin_type=True,
    )


def decode_result(data: bytes) -> Result:
    """Decode a result. Raises :class:`ProtocolError` if it is not one."""
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=False)
    except Exception as e:
        raise ProtocolError(f"result is not valid msgpack: {e}") from e
    if not isinstance(obj, dict) or obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError("result is not a version 1 map")
    request_id = obj.get("id")
    if not isinstance(request_id, str):
        raise ProtocolError("result has no id")
    if "error" in obj:
        kind, message = obj["error"]
        return Result(request_id, None, error_from_wire(kind, message, request_id))
    try:
        outputs = _decode_arrays(obj.get("outputs"), _TRUSTED, "outputs")
    except InvalidInput as e:
        raise ProtocolError(f"result {request_id}: {e}") from e
    version = obj.get("mv")
    return Result(request_id, outputs, None, version if _is_int(version) else None)


# Results come from our own workers; the limits only keep a corrupt one from doing harm.
_TRUSTED = Limits(max_payload_bytes=2**31, max_elements=2**31, max_rank=32)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value: object) -> str:
    if isinstance(value, (bytes, str)):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__
