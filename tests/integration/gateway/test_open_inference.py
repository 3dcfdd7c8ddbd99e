"""The Open Inference Protocol (KServe v2, what Triton speaks) over REST and gRPC.

The gRPC calls are made by method path with the protocol's messages, as any generated
client makes them (tritonclient itself pins an older protobuf than this project uses)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import requests
from google.protobuf.message import Message

from tests.integration import models
from tests.integration.gateway.conftest import GHOST, MLP, TEXT, TWIN
from workers.gateway.proto import oip_pb2
from workers.gateway.server import GatewayServer

SERVICE = "/inference.GRPCInferenceService/"

M = TypeVar("M", bound=Message)


@pytest.fixture(scope="module")
def channel(gateway: GatewayServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"localhost:{gateway.grpc_port}") as channel:
        yield channel


def _call(channel: grpc.Channel, method: str, request: Message, response_type: type[M]) -> M:
    rpc: grpc.UnaryUnaryMultiCallable[Message, M] = channel.unary_unary(
        SERVICE + method,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_type.FromString,
    )
    answer: M = rpc(request, timeout=10)
    return answer


def test_rest_infer_two_inputs(gateway: GatewayServer, pools: dict[str, str]) -> None:
    rng = np.random.default_rng(4)
    a = rng.standard_normal((2, 4)).astype(np.float32)
    b = rng.standard_normal((2, 3)).astype(np.float32)
    want = models.keras_outputs(pools[TWIN], {"a": a, "b": b})
    body: dict[str, Any] = {
        "id": "req-7",
        "inputs": [
            {"name": "a", "shape": [2, 4], "datatype": "FP32", "data": a.ravel().tolist()},
            {"name": "b", "shape": [2, 3], "datatype": "FP32", "data": b.tolist()},
        ],
        "outputs": [{"name": "y"}],
    }
    base = f"http://localhost:{gateway.rest_port}/v2"
    reply = requests.post(f"{base}/models/{TWIN}/infer", json=body, timeout=10)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["id"] == "req-7" and answer["model_name"] == TWIN
    (y,) = answer["outputs"]
    assert y["name"] == "y" and y["datatype"] == "FP32" and y["shape"] == [2, 2]
    np.testing.assert_allclose(np.array(y["data"]).reshape(2, 2), want["y"], rtol=1e-5, atol=1e-6)

    metadata = requests.get(f"{base}/models/{TWIN}", timeout=10).json()
    assert {t["name"]: (t["datatype"], t["shape"]) for t in metadata["inputs"]} == {
        "a": ("FP32", [-1, 4]),
        "b": ("FP32", [-1, 3]),
    }
    assert requests.get(f"{base}/health/ready", timeout=10).status_code == 200
    assert requests.get(f"{base}/models/{MLP}/ready", timeout=10).status_code == 200
    assert requests.get(f"{base}/models/{GHOST}/ready", timeout=10).status_code == 503


def test_rest_infer_bytes(gateway: GatewayServer) -> None:
    body: dict[str, Any] = {
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["ab", "cde"]}]
    }
    url = f"http://localhost:{gateway.rest_port}/v2/models/{TEXT}/infer"
    answer = requests.post(url, json=body, timeout=10).json()
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["length"]["data"] == [2, 3] and outputs["length"]["datatype"] == "INT32"
    assert outputs["upper_bytes"]["data"] == ["AB", "CDE"]


def test_grpc_infer_raw_and_typed_contents(channel: grpc.Channel, pools: dict[str, str]) -> None:
    x = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)
    ((name, want),) = models.keras_outputs(pools[MLP], x).items()

    tensor = oip_pb2.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[3, 8])
    raw = oip_pb2.ModelInferRequest(model_name=MLP, id="r1", inputs=[tensor])
    raw.raw_input_contents.append(x.tobytes())
    typed = oip_pb2.ModelInferRequest(model_name=MLP, id="r2", inputs=[tensor])
    typed.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
    for request in (raw, typed):
        answer = _call(channel, "ModelInfer", request, oip_pb2.ModelInferResponse)
        assert isinstance(answer, oip_pb2.ModelInferResponse)
        assert answer.id == request.id
        (output,) = answer.outputs
        assert output.name == name and output.datatype == "FP32" and list(output.shape) == [3, 3]
        got = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(3, 3)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_grpc_infer_bytes(channel: grpc.Channel) -> None:
    tensor = oip_pb2.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([b"\x00a", b"xyz"])
    request = oip_pb2.ModelInferRequest(model_name=TEXT, inputs=[tensor])
    request.outputs.add(name="upper_bytes")
    answer = _call(channel, "ModelInfer", request, oip_pb2.ModelInferResponse)
    assert isinstance(answer, oip_pb2.ModelInferResponse)
    (output,) = answer.outputs
    assert output.datatype == "BYTES" and list(output.shape) == [2]
    # Raw BYTES contents: each item after its 4-byte little-endian length.
    assert answer.raw_output_contents[0] == b"\x02\x00\x00\x00\x00A" + b"\x03\x00\x00\x00XYZ"


def test_grpc_metadata_and_readiness(channel: grpc.Channel) -> None:
    request = oip_pb2.ModelMetadataRequest(name=TWIN)
    metadata = _call(channel, "ModelMetadata", request, oip_pb2.ModelMetadataResponse)
    assert isinstance(metadata, oip_pb2.ModelMetadataResponse)
    assert {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs} == {
        "a": ("FP32", [-1, 4]),
        "b": ("FP32", [-1, 3]),
    }
    assert sorted(t.name for t in metadata.outputs) == ["y", "z"]
    ready = _call(channel, "ServerReady", oip_pb2.ServerReadyRequest(), oip_pb2.ServerReadyResponse)
    assert isinstance(ready, oip_pb2.ServerReadyResponse) and ready.ready
    for model, expected in ((MLP, True), (GHOST, False)):
        ask = oip_pb2.ModelReadyRequest(name=model)
        answer = _call(channel, "ModelReady", ask, oip_pb2.ModelReadyResponse)
        assert isinstance(answer, oip_pb2.ModelReadyResponse) and answer.ready is expected
