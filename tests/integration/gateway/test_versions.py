"""Versions through the gateway: a pool serving a model repository with two versions whose
answers differ, asked for by number and by label over TF Serving's gRPC and REST APIs and
the Open Inference Protocol; every answer is its version's own and names it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from google.protobuf.message import Message
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tests.integration import models
from tests.integration.gateway.conftest import MLP, running_gateway, serve_versions
from workers.gateway.proto import oip_pb2
from workers.gateway.server import GatewayServer
from workers.repository import READY_MARKER
from workers.supervisor import Supervisor

#: The repository's model: version N multiplies its input by N. Labels: stable=1, canary=2,
#: so the default version (the "stable" label) is not the newest.
NAME = "gw-versions"
LABELS = {"stable": 1, "canary": 2}
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE

M = TypeVar("M", bound=Message)


def build_version(repo: Path, version: int) -> None:
    """``repo/NAME/<version>/``: a SavedModel that multiplies by ``version``, marked complete."""
    folder = repo / NAME / str(version)
    models.build_times_model(folder, float(version))
    (folder / READY_MARKER).touch()


@pytest.fixture(scope="module")
def repo_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    start_pool: Callable[..., Supervisor],
    redis_url: str,
) -> Iterator[GatewayServer]:
    """A pool serving versions 1 and 2 of NAME from a repository, and a gateway."""
    repo = tmp_path_factory.mktemp("gateway-repo")
    for version in (1, 2):
        build_version(repo, version)
    serve_versions(start_pool, redis_url, repo, NAME, LABELS)
    with running_gateway(redis_url) as server:
        yield server


@pytest.fixture(scope="module")
def channel(repo_gateway: GatewayServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"localhost:{repo_gateway.grpc_port}") as channel:
        yield channel


def _rows(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, 4)).astype(np.float32)


# --- TF Serving gRPC ----------------------------------------------------------------------


def _predict(channel: grpc.Channel, x: np.ndarray, **spec: Any) -> predict_pb2.PredictResponse:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = NAME
    if "version" in spec:
        request.model_spec.version.value = spec["version"]
    if "version_label" in spec:
        request.model_spec.version_label = spec["version_label"]
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    result: predict_pb2.PredictResponse = stub.Predict(request, 30.0)
    return result


@pytest.mark.parametrize(
    ("spec", "version"),
    [
        ({}, 1),  # the default: the "stable" label's version
        ({"version": 1}, 1),
        ({"version": 2}, 2),
        ({"version_label": "canary"}, 2),
        ({"version_label": "stable"}, 1),
    ],
)
def test_grpc_predict_by_version_and_label(
    channel: grpc.Channel, spec: dict[str, Any], version: int
) -> None:
    x = _rows(1)
    result = _predict(channel, x, **spec)
    np.testing.assert_allclose(tf.make_ndarray(result.outputs["y"]), x * version, rtol=1e-6)
    assert result.model_spec.name == NAME
    assert result.model_spec.version.value == version


def test_grpc_unknown_version_or_label_is_not_found(channel: grpc.Channel) -> None:
    for spec in ({"version": 7}, {"version_label": "nightly"}):
        with pytest.raises(grpc.RpcError) as caught:
            _predict(channel, _rows(2), **spec)
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.NOT_FOUND, spec
        assert "versions 1, 2" in error.details() and "canary=2" in error.details()


def test_grpc_metadata_and_status_name_the_versions(channel: grpc.Channel) -> None:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = NAME
    request.model_spec.version_label = "canary"
    request.metadata_field.append("signature_def")
    assert stub.GetModelMetadata(request, 30.0).model_spec.version.value == 2
    request.model_spec.ClearField("version_label")
    assert stub.GetModelMetadata(request, 30.0).model_spec.version.value == 1

    status_stub = model_service_pb2_grpc.ModelServiceStub(channel)
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = NAME
    statuses = status_stub.GetModelStatus(status_request, 30.0).model_version_status
    assert [(s.version, s.state) for s in statuses] == [(1, AVAILABLE), (2, AVAILABLE)]
    status_request.model_spec.version.value = 2
    statuses = status_stub.GetModelStatus(status_request, 30.0).model_version_status
    assert [(s.version, s.state) for s in statuses] == [(2, AVAILABLE)]
    status_request.model_spec.version.value = 3
    with pytest.raises(grpc.RpcError) as caught:
        status_stub.GetModelStatus(status_request, 30.0)
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.NOT_FOUND


# --- TF Serving REST ----------------------------------------------------------------------


def _v1(gateway: GatewayServer) -> str:
    return f"http://localhost:{gateway.rest_port}/v1/models/{NAME}"


@pytest.mark.parametrize(
    ("path", "version"),
    [("", 1), ("/versions/1", 1), ("/versions/2", 2), ("/labels/canary", 2), ("/labels/stable", 1)],
)
def test_rest_predict_by_version_and_label(
    repo_gateway: GatewayServer, path: str, version: int
) -> None:
    x = _rows(3)
    url = f"{_v1(repo_gateway)}{path}:predict"
    reply = requests.post(url, json={"instances": x.tolist()}, timeout=30)
    assert reply.status_code == 200, reply.text
    np.testing.assert_allclose(np.array(reply.json()["predictions"]), x * version, rtol=1e-6)


def test_rest_status_metadata_and_unknown_version(repo_gateway: GatewayServer) -> None:
    base = _v1(repo_gateway)
    statuses = requests.get(base, timeout=30).json()["model_version_status"]
    assert [(s["version"], s["state"]) for s in statuses] == [
        ("1", "AVAILABLE"),
        ("2", "AVAILABLE"),
    ]
    (status,) = requests.get(f"{base}/labels/canary", timeout=30).json()["model_version_status"]
    assert status["version"] == "2"
    metadata = requests.get(f"{base}/versions/2/metadata", timeout=30).json()
    assert metadata["model_spec"]["version"] == "2"
    assert (
        "x" in metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    )

    for path in ("/versions/7:predict", "/labels/nightly:predict"):
        reply = requests.post(f"{base}{path}", json={"instances": [[0, 0, 0, 0]]}, timeout=30)
        assert reply.status_code == 404, path
        assert "versions 1, 2" in reply.json()["error"]


# --- Open Inference Protocol --------------------------------------------------------------


@pytest.mark.parametrize(("path", "version"), [("", 1), ("/versions/1", 1), ("/versions/2", 2)])
def test_oip_rest_infer_by_version(repo_gateway: GatewayServer, path: str, version: int) -> None:
    x = _rows(4)
    body = {"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": x.tolist()}]}
    url = f"http://localhost:{repo_gateway.rest_port}/v2/models/{NAME}{path}/infer"
    reply = requests.post(url, json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["model_version"] == str(version)
    (output,) = answer["outputs"]
    np.testing.assert_allclose(np.reshape(output["data"], output["shape"]), x * version)


def test_oip_rest_metadata_and_unknown_version(repo_gateway: GatewayServer) -> None:
    base = f"http://localhost:{repo_gateway.rest_port}/v2/models/{NAME}"
    assert requests.get(base, timeout=30).json()["versions"] == ["1", "2"]
    assert requests.get(f"{base}/versions/2/ready", timeout=30).json()["ready"] is True
    reply = requests.get(f"{base}/versions/7", timeout=30)
    assert reply.status_code == 404 and "versions 1, 2" in reply.json()["error"]


def _call(channel: grpc.Channel, method: str, request: Message, response_type: type[M]) -> M:
    """An OIP gRPC call by method path, as a generated client makes it."""
    rpc: grpc.UnaryUnaryMultiCallable[Message, M] = channel.unary_unary(
        f"/inference.GRPCInferenceService/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_type.FromString,
    )
    answer: M = rpc(request, timeout=30)
    return answer


def test_oip_grpc_infer_by_version(channel: grpc.Channel) -> None:
    x = _rows(5)
    for asked, version in (("", 1), ("2", 2), ("canary", 2)):
        request = oip_pb2.ModelInferRequest(model_name=NAME, model_version=asked)
        tensor = request.inputs.add(name="x", datatype="FP32", shape=[3, 4])
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
        answer = _call(channel, "ModelInfer", request, oip_pb2.ModelInferResponse)
        assert answer.model_version == str(version), asked
        got = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(3, 4)
        np.testing.assert_allclose(got, x * version)

    metadata = _call(channel, "ModelMetadata", oip_pb2.ModelMetadataRequest(name=NAME),
                     oip_pb2.ModelMetadataResponse)  # fmt: skip
    assert list(metadata.versions) == ["1", "2"]
    with pytest.raises(grpc.RpcError) as caught:
        _call(channel, "ModelInfer", oip_pb2.ModelInferRequest(model_name=NAME, model_version="7"),
              oip_pb2.ModelInferResponse)  # fmt: skip
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.NOT_FOUND and "versions 1, 2" in error.details()


# --- a pool of one model file -------------------------------------------------------------


def test_a_single_model_pool_is_version_1(gateway: GatewayServer, pools: dict[str, str]) -> None:
    x = np.zeros((1, 8), np.float32)
    with grpc.insecure_channel(f"localhost:{gateway.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = MLP
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
        assert stub.Predict(request, 30.0).model_spec.version.value == 1
        request.model_spec.version.value = 1
        assert stub.Predict(request, 30.0).model_spec.version.value == 1
        request.model_spec.version.value = 2
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(request, 30.0)
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.NOT_FOUND and "versions 1" in error.details()
    rest = f"http://localhost:{gateway.rest_port}"
    assert requests.get(f"{rest}/v2/models/{MLP}", timeout=30).json()["versions"] == ["1"]
    (status,) = requests.get(f"{rest}/v1/models/{MLP}", timeout=30).json()["model_version_status"]
    assert status["version"] == "1"
