"""The gateway's conversions, without Redis or TensorFlow: TensorProto and OIP tensors to
numpy and back, the model spec read from Redis's info text, options, error statuses."""

from __future__ import annotations

import struct
from pathlib import Path

import grpc
import numpy as np
import pytest

from queueing.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelError,
    QueueFull,
    RequestTimeout,
    Unavailable,
    UnknownModel,
)
from workers.gateway import tensors
from workers.gateway.catalog import (
    ModelEntry,
    Signature,
    parse_inputs,
    parse_signature,
    parse_versions,
)
from workers.gateway.errors import grpc_code, http_status
from workers.gateway.proto import oip_pb2, tfs_pb2
from workers.gateway.server import GatewayConfig
from workers.spec import TensorSpec


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array([[1, -2], [3, 4]], np.int8),
        np.array([True, False]),
        np.array([1.5, -2.25], np.float16),
        np.array([2**40, -1], np.int64),
        np.array([1 + 2j], np.complex64),
        np.zeros((0, 3), np.float64),
    ],
)
def test_tensor_proto_round_trip(array: np.ndarray) -> None:
    proto = tfs_pb2.TensorProto.FromString(tensors.to_tensor_proto(array).SerializeToString())
    back = tensors.from_tensor_proto(proto, "x")
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_bytes_tensor_round_trip_keeps_nul_bytes() -> None:
    array = tensors.bytes_array([b"\x00a\x00", b"", b"\xff"], [3])
    back = tensors.from_tensor_proto(tensors.to_tensor_proto(array), "x")
    assert back.tolist() == [b"\x00a\x00", b"", b"\xff"]
    labels = tensors.to_tensor_proto(np.array(["cat", "dög"]))
    assert labels.dtype == tfs_pb2.DT_STRING and list(labels.string_val) == [b"cat", "dög".encode()]


def test_typed_values_as_tensorflow_reads_them() -> None:
    """``float_val`` etc. (what make_tensor_proto writes for lists): a short list is filled
    with its last value; half_val holds half-float bits."""
    proto = tfs_pb2.TensorProto(dtype=tfs_pb2.DT_FLOAT, float_val=[1.0, 2.0])
    proto.tensor_shape.dim.add(size=2)
    proto.tensor_shape.dim.add(size=2)
    assert tensors.from_tensor_proto(proto, "x").tolist() == [[1.0, 2.0], [2.0, 2.0]]
    half = tfs_pb2.TensorProto(
        dtype=tfs_pb2.DT_HALF, half_val=[int(np.array(1.5, np.float16).view(np.uint16))]
    )
    half.tensor_shape.dim.add(size=1)
    assert tensors.from_tensor_proto(half, "x").tolist() == [1.5]


@pytest.mark.parametrize(
    ("proto", "message"),
    [
        (tfs_pb2.TensorProto(dtype=tfs_pb2.DT_BFLOAT16), "DT_BFLOAT16 is not supported"),
        (tfs_pb2.TensorProto(dtype=tfs_pb2.DT_FLOAT, tensor_content=b"abc"), "needs 4 bytes"),
        (tfs_pb2.TensorProto(dtype=tfs_pb2.DT_INT32, int_val=[1, 2, 3]), "3 values for 1"),
    ],
)
def test_malformed_tensor_protos_are_invalid_input(
    proto: tfs_pb2.TensorProto, message: str
) -> None:
    if proto.dtype != tfs_pb2.DT_BFLOAT16:
        proto.tensor_shape.dim.add(size=1)
    with pytest.raises(InvalidInput, match=message):
        tensors.from_tensor_proto(proto, "input 'x'")


def test_huge_shapes_are_refused_before_any_allocation() -> None:
    proto = tfs_pb2.TensorProto(dtype=tfs_pb2.DT_FLOAT, float_val=[0.0])
    proto.tensor_shape.dim.add(size=2**20)
    proto.tensor_shape.dim.add(size=2**20)
    with pytest.raises(InvalidInput, match="over the limit"):
        tensors.from_tensor_proto(proto, "x")
    empty = tfs_pb2.TensorProto(dtype=tfs_pb2.DT_BOOL)
    for size in (0, 2**20, 2**20):
        empty.tensor_shape.dim.add(size=size)
    with pytest.raises(InvalidInput, match="over the limit"):
        tensors.from_tensor_proto(empty, "x")


def test_oip_raw_and_typed_inputs() -> None:
    tensor = oip_pb2.ModelInferRequest.InferInputTensor(name="t", datatype="INT16", shape=[2])
    raw = np.array([7, -8], np.int16).tobytes()
    assert tensors.from_infer_input(tensor, raw, "t").tolist() == [7, -8]
    tensor.contents.int_contents.extend([1, 2])
    assert tensors.from_infer_input(tensor, None, "t").tolist() == [1, 2]
    with pytest.raises(InvalidInput, match="needs 4 raw bytes"):
        tensors.from_infer_input(tensor, b"abc", "t")

    text = oip_pb2.ModelInferRequest.InferInputTensor(name="s", datatype="BYTES", shape=[2])
    raw = struct.pack("<I", 2) + b"hi" + struct.pack("<I", 0)
    assert tensors.from_infer_input(text, raw, "s").tolist() == [b"hi", b""]
    with pytest.raises(InvalidInput, match="runs past the end"):
        tensors.from_infer_input(text, struct.pack("<I", 9) + b"hi", "s")


def test_oip_outputs_are_raw() -> None:
    tensor, raw = tensors.to_infer_output("y", np.array([[1.0, 2.0]], np.float32))
    assert (tensor.datatype, list(tensor.shape)) == ("FP32", [1, 2])
    assert np.frombuffer(raw, np.float32).tolist() == [1.0, 2.0]
    tensor, raw = tensors.to_infer_output("s", np.array(["ab"]))
    assert tensor.datatype == "BYTES" and raw == struct.pack("<I", 2) + b"ab"


def test_model_spec_from_the_info_text() -> None:
    text = "a: float32 [*, 4], b: int64 [*, *, 3], c: bytes [*]"
    assert parse_inputs(text) == [
        TensorSpec("a", "float32", (4,)),
        TensorSpec("b", "int64", (None, 3)),
        TensorSpec("c", "bytes", ()),
    ]
    image = (
        "image: bytes [*] (encoded JPEG/PNG/GIF/BMP) or uint8 [*, h, w, 3] -> float32 [*, 8, 8, 3]"
    )
    assert parse_inputs(image) == [TensorSpec("image", "bytes", ())]


def test_versions_from_the_info_hash() -> None:
    """As ``Versions.model_info`` writes them; a label of a version not served is left
    out; a hash with no versions field is an older pool's one model file, version 1."""
    info = {b"versions": b"3, 4", b"labels": b"canary=4, old=2, stable=3",
            b"default_version": b"3"}  # fmt: skip
    assert parse_versions(info) == ([3, 4], {"canary": 4, "stable": 3}, 3)
    assert parse_versions({b"inputs": b"x: float32 [*, 8]"}) == ([1], {}, 1)
    # Every version retired: the hash keeps the last default, which serves no more.
    assert parse_versions({b"versions": b"", b"default_version": b"4"}) == ([], {}, None)


def test_each_version_s_inputs_and_outputs_from_the_info_hash() -> None:
    """As ``Versions.model_info`` writes them: the plain fields are the default version's,
    ``inputs@N``... each served version's; a hash without them (an older pool) has none."""
    info = {
        b"versions": b"1, 2",
        b"default_version": b"1",
        b"inputs": b"x: float32 [*, 4]",
        b"outputs": b"y",
        b"output_specs": b"y: float32 [*, 4]",
        b"inputs@1": b"x: float32 [*, 4]",
        b"outputs@1": b"y",
        b"output_specs@1": b"y: float32 [*, 4]",
        b"inputs@2": b"features: float64 [*, 6]",
        b"outputs@2": b"total, doubled",
        b"output_specs@2": b"total: float64 [*, 1], doubled: float64 [*, 6]",
    }
    v1 = Signature(
        inputs=[TensorSpec("x", "float32", (4,))],
        output_names=["y"],
        outputs={"y": TensorSpec("y", "float32", (4,))},
    )
    v2 = Signature(
        inputs=[TensorSpec("features", "float64", (6,))],
        output_names=["total", "doubled"],
        outputs={
            "total": TensorSpec("total", "float64", (1,)),
            "doubled": TensorSpec("doubled", "float64", (6,)),
        },
    )
    assert parse_signature(info) == v1
    assert parse_signature(info, 1) == v1
    assert parse_signature(info, 2) == v2
    assert parse_signature(info, 3) is None
    assert parse_signature({b"versions": b"1"}) is None

    entry = ModelEntry("m", v1.inputs, v1.output_names, 1, v1.outputs, [1, 2],
                       signatures={1: v1, 2: v2})  # fmt: skip
    assert (entry.at(2).inputs, entry.at(2).output_names) == (v2.inputs, v2.output_names)
    assert entry.at(2).outputs == v2.outputs
    assert entry.at(None) == entry.at(7) == entry


def test_error_statuses() -> None:
    cases = [
        (InvalidInput("x"), grpc.StatusCode.INVALID_ARGUMENT, 400),
        (UnknownModel("x"), grpc.StatusCode.NOT_FOUND, 404),
        (QueueFull("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (RequestTimeout("x"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (Unavailable("x"), grpc.StatusCode.UNAVAILABLE, 503),
        (ModelError("x"), grpc.StatusCode.INTERNAL, 500),
    ]
    for error, code, status in cases:
        assert (grpc_code(error), http_status(error)) == (code, status), error


def test_gateway_options_from_file_environment_and_command_line(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("[gateway]\ngrpc_port = 9000\nrest_port = 9001\ntimeout_s = 5\n")
    env = {"TFPOOL_REDIS_URL": "redis://r:1/0", "TFPOOL_GATEWAY_REST_PORT": "9101"}
    config = GatewayConfig.load(config_file=str(path), env=env, overrides={"timeout_s": 2.5})
    assert (config.redis_url, config.grpc_port, config.rest_port, config.timeout_s) == (
        "redis://r:1/0",
        9000,
        9101,
        2.5,
    )
    with pytest.raises(ValueError, match="unknown gateway options"):
        GatewayConfig.load(env={}, overrides={"grpc_prot": 1})
    with pytest.raises(ValueError, match="port number"):
        GatewayConfig(grpc_port=70000)
