"""The wire format: round trips for every dtype and shape, and every decode limit."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from queueing import wire
from queueing.errors import DeadlineExceeded, InvalidInput, ModelError, ProtocolError, RequestError
from queueing.wire import Limits

SHAPES = [(), (0,), (3,), (2, 3), (0, 4), (1, 1, 1, 2)]


@pytest.mark.parametrize("dtype", sorted(wire.ALLOWED_DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_request_round_trip_every_dtype_and_shape(dtype: str, shape: tuple[int, ...]) -> None:
    array = (np.arange(int(np.prod(shape))) % 3).astype(dtype).reshape(shape)
    body = wire.encode_request_body("m", array, deadline_ms=250, keep_s=7)
    decoded = wire.decode_request_body(body)
    assert decoded.model == "m"
    assert decoded.deadline_ms == 250
    assert decoded.keep_s == 7
    assert isinstance(decoded.inputs, np.ndarray)
    assert decoded.inputs.dtype == array.dtype
    assert decoded.inputs.shape == shape
    np.testing.assert_array_equal(decoded.inputs, array)


def test_named_inputs_round_trip_and_decode_without_copy() -> None:
    inputs = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([True, False])}
    decoded = wire.decode_request_body(wire.encode_request_body("m", inputs))
    assert isinstance(decoded.inputs, dict)
    np.testing.assert_array_equal(decoded.inputs["a"], inputs["a"])
    np.testing.assert_array_equal(decoded.inputs["b"], inputs["b"])
    # A view of the received bytes: read-only, owning no data of its own.
    assert not decoded.inputs["a"].flags.writeable
    assert decoded.inputs["a"].base is not None


def test_non_contiguous_and_big_endian_arrays_are_sent_as_they_read() -> None:
    strided = np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2]
    big = np.arange(4, dtype=">f8")
    for array in (strided, big):
        decoded = wire.decode_request_body(wire.encode_request_body("m", array)).inputs
        np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize(
    "array",
    [
        np.array([object()]),
        np.array([b"x", "y"], dtype=object),
        np.zeros(2, "V4"),
        np.array(["2020-01-01"], "datetime64[D]"),
    ],
)
def test_unsupported_dtypes_are_refused_on_send(array: np.ndarray) -> None:
    with pytest.raises(InvalidInput, match="cannot be sent"):
        wire.encode_request_body("m", array)


def _body(**fields: object) -> bytes:
    base: dict[str, object] = {
        "v": 1,
        "model": "m",
        "inputs": ["float32", [1], b"\0" * 4],
        "deadline_ms": None,
        "keep_s": 0,
    }
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not _DROP}, use_bin_type=True)  # type: ignore[no-any-return]


_DROP = object()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (_body()[:-2], "not valid msgpack"),
        (msgpack.packb([1, 2]), "must be a map"),
        (_body(v=2), "protocol version 2"),
        (_body(v=_DROP), "protocol version None"),
        (_body(model=5), "model must be a string"),
        (_body(deadline_ms=-1), "deadline_ms"),
        (_body(deadline_ms="soon"), "deadline_ms"),
        (_body(deadline_ms=True), "deadline_ms"),
        (_body(keep_s=-3), "keep_s"),
        (_body(inputs=_DROP), "no inputs"),
        (_body(inputs={}), "no arrays"),
        (_body(inputs=["float32", [1]]), r"expected \[dtype, shape, data\]"),
        (_body(inputs="x"), r"expected \[dtype, shape, data\]"),
        (_body(inputs=["object", [1], b"12345678"]), "dtype 'object' is not allowed"),
        (_body(inputs=["V8", [1], b"12345678"]), "is not allowed"),
        (_body(inputs=[7, [1], b"1234"]), "dtype 7 is not allowed"),
        (_body(inputs=["float32", 4, b"1234"]), "shape must be a list"),
        (_body(inputs=["float32", [-1], b""]), "non-negative integers"),
        (_body(inputs=["float32", [1.5], b""]), "non-negative integers"),
        (_body(inputs=["float32", [True], b"1234"]), "non-negative integers"),
        (_body(inputs=["float32", [2], b"1234"]), "needs 8 bytes, got 4"),
        (_body(inputs=["float32", [1], "abcd"]), "data must be bytes"),
        # Empty, yet claiming dimensions numpy cannot make (found by the fuzz tests).
        (_body(inputs=["float32", [0, 2**40, 2**40], b""]), "is over the limit"),
        (_body(inputs=["str", [0, 2**62, 4], []]), "is over the limit"),
        (_body(inputs=["bytes", [2**40, 0, 2**40], []]), "is over the limit"),
        (_body(inputs={"x": ["float32", [3], b"1234"]}), "input 'x': float32 \\[3\\] needs 12"),
        (_body(inputs={1: ["float32", [1], b"1234"]}), "not valid msgpack"),
        (
            msgpack.packb({"v": 1, "model": "m", "inputs": msgpack.ExtType(1, b"x")}),
            "not valid msgpack",
        ),
    ],
)
def test_every_malformed_body_is_a_typed_error(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        wire.decode_request_body(body)


def test_missing_body_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="no body"):
        wire.decode_request_body(None)


def test_limits_payload_rank_elements_and_inputs() -> None:
    big = wire.encode_request_body("m", np.zeros(300, np.float32))
    with pytest.raises(InvalidInput, match="over the limit 1000"):
        wire.decode_request_body(big, Limits(max_payload_bytes=1000))
    deep = wire.encode_request_body("m", np.zeros((1,) * 5, np.float32))
    with pytest.raises(InvalidInput, match="rank 5 is over the limit 4"):
        wire.decode_request_body(deep, Limits(max_rank=4))
    wide = wire.encode_request_body("m", np.zeros((10, 10), np.uint8))
    with pytest.raises(InvalidInput, match="100 elements is over the limit 99"):
        wire.decode_request_body(wide, Limits(max_elements=99))
    many = wire.encode_request_body("m", {f"i{n}": np.zeros(1) for n in range(5)})
    with pytest.raises(InvalidInput, match="5 arrays is over the limit 4"):
        wire.decode_request_body(many, Limits(max_inputs=4))


def test_huge_declared_shape_is_refused_before_any_allocation() -> None:
    body = _body(inputs=["float64", [2**31, 2**31], b""])
    with pytest.raises(InvalidInput, match="elements is over the limit"):
        wire.decode_request_body(body)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_rank"):
        Limits(max_rank=0)


def test_results_round_trip_outputs_and_errors() -> None:
    out = {"y": np.arange(6, dtype=np.float32).reshape(3, 2), "z": np.array(1.5)}
    result = wire.decode_result(wire.encode_result("r1", out))
    assert result.request_id == "r1" and result.error is None
    assert isinstance(result.outputs, dict)
    np.testing.assert_array_equal(result.outputs["y"], out["y"])
    single = wire.decode_result(wire.encode_result("r2", np.zeros((0, 3), np.int8)))
    assert isinstance(single.outputs, np.ndarray) and single.outputs.shape == (0, 3)

    for error in (DeadlineExceeded("late"), ModelError("boom"), InvalidInput("bad")):
        decoded = wire.decode_result(wire.encode_error("r3", error))
        assert type(decoded.error) is type(error)
        assert str(decoded.error) == str(error)
        assert decoded.error is not None and decoded.error.request_id == "r3"


def test_unknown_remote_error_kind_is_a_plain_request_error() -> None:
    data = msgpack.packb({"v": 1, "id": "r", "error": ["Weird", "msg"]})
    error = wire.decode_result(data).error
    assert type(error) is RequestError


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",
        msgpack.packb({"v": 9}),
        msgpack.packb({"v": 1}),
        msgpack.packb({"v": 1, "id": "x", "outputs": 3}),
    ],
)
def test_corrupt_results_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_result(data)


# --- bytes and str items ----------------------------------------------------------------


def test_bytes_items_round_trip_keeping_trailing_nul_bytes() -> None:
    images = [b"\x89PNG\r\n\x00", b"", b"\xff\xd8\x00\x00"]
    for value, shape in ((images[0], ()), (images, (3,))):
        decoded = wire.decode_request_body(wire.encode_request_body("m", value)).inputs
        assert isinstance(decoded, np.ndarray)
        assert decoded.dtype == object and decoded.shape == shape
        assert wire.dtype_name(decoded) == "bytes"
        assert decoded.ravel().tolist() == (images if shape else [images[0]])


def test_named_bytes_next_to_numbers_and_str_arrays_round_trip() -> None:
    inputs: dict[str, wire.SendableArray] = {
        "image": [b"a", b"b\x00"],
        "scale": np.array([1.5, 2.0], np.float32),
    }
    decoded = wire.decode_request_body(wire.encode_request_body("m", inputs)).inputs
    assert isinstance(decoded, dict)
    assert decoded["image"].tolist() == [b"a", b"b\x00"]
    labels = np.array([["cat", "dög"], ["", "x"]])
    result = wire.decode_result(wire.encode_result("r1", {"labels": labels}))
    assert isinstance(result.outputs, dict)
    assert result.outputs["labels"].dtype.kind == "U"
    np.testing.assert_array_equal(result.outputs["labels"], labels)
    assert wire.dtype_name(result.outputs["labels"]) == "str"


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (["bytes", [2], [b"a"]], "needs a list of 2 items"),
        (["bytes", [1], b"a"], "needs a list of 1 items"),
        (["bytes", [2], [b"a", "b"]], "every item of a bytes array must be bytes"),
        (["str", [1], [b"a"]], "every item of a str array must be str"),
        (["bytes", [-1], []], "non-negative"),
        (["bytes", [5], [b""] * 5], "5 items is over the limit 4"),
    ],
)
def test_bad_item_arrays_are_invalid_input(inputs: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        wire.decode_request_body(_body(inputs=inputs), Limits(max_items=4))
