"""Versions of one model that take different inputs, through the gateway: each version's
metadata is its own (TF Serving's ``signature_def``, REST and gRPC; OIP's inputs and
outputs), and a REST JSON body is read with the input names and dtypes of the version it
goes to, which answers with its own outputs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

from tests.integration import models
from tests.integration.gateway.conftest import running_gateway, serve_versions
from workers.gateway.proto import oip_pb2
from workers.gateway.server import GatewayServer
from workers.repository import READY_MARKER
from workers.supervisor import Supervisor

#: Version 1: x [*, 4] float32 -> y = x. Version 2: features [*, 6] float64 -> total
#: [*, 1], doubled [*, 6]. The default is version 1 (label "stable").
NAME = "gw-version-specs"
LABELS = {"stable": 1, "canary": 2}

#: Each version's signature as TF Serving's REST metadata writes it: name -> (dtype, shape).
SIGNATURES: dict[int, dict[str, dict[str, tuple[str, list[str]]]]] = {
    1: {"inputs": {"x": ("DT_FLOAT", ["-1", "4"])}, "outputs": {"y": ("DT_FLOAT", ["-1", "4"])}},
    2: {
        "inputs": {"features": ("DT_DOUBLE", ["-1", "6"])},
        "outputs": {"total": ("DT_DOUBLE", ["-1", "1"]), "doubled": ("DT_DOUBLE", ["-1", "6"])},
    },
}
#: The same as OIP metadata writes it: name -> (datatype, shape).
OIP_SIGNATURES: dict[int, dict[str, dict[str, tuple[str, list[int]]]]] = {
    1: {"inputs": {"x": ("FP32", [-1, 4])}, "outputs": {"y": ("FP32", [-1, 4])}},
    2: {
        "inputs": {"features": ("FP64", [-1, 6])},
        "outputs": {"total": ("FP64", [-1, 1]), "doubled": ("FP64", [-1, 6])},
    },
}


def build_versions(repo: Path) -> dict[int, str]:
    """``repo/NAME/1`` and ``repo/NAME/2``, marked complete: version -> path."""
    paths = {1: repo / NAME / "1", 2: repo / NAME / "2"}
    models.build_times_model(paths[1], 1.0)
    models.build_wider_model(paths[2])
    for path in paths.values():
        (path / READY_MARKER).touch()
    return {version: str(path) for version, path in paths.items()}


def own_outputs(path: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a version's SavedModel answers itself, in this process."""
    serve = tf.saved_model.load(path).signatures["serving_default"]
    return {name: value.numpy() for name, value in serve(**inputs).items()}


@pytest.fixture(scope="module")
def paths(
    tmp_path_factory: pytest.TempPathFactory,
    start_pool: Callable[..., Supervisor],
    redis_url: str,
) -> dict[int, str]:
    """A pool serving both versions from a repository: version -> SavedModel path."""
    repo = tmp_path_factory.mktemp("gateway-version-specs")
    built = build_versions(repo)
    serve_versions(start_pool, redis_url, repo, NAME, LABELS)
    return built


@pytest.fixture(scope="module")
def gateway(paths: dict[int, str], redis_url: str) -> Iterator[GatewayServer]:
    with running_gateway(redis_url) as server:
        yield server


@pytest.fixture(scope="module")
def channel(gateway: GatewayServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"localhost:{gateway.grpc_port}") as channel:
        yield channel


def _rows(width: int, dtype: type[np.generic], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, width)).astype(dtype)


# --- metadata -----------------------------------------------------------------------------


def _tensors(signature: dict[str, Any], side: str) -> dict[str, tuple[str, list[str]]]:
    """A signature's inputs or outputs from REST metadata (JSON): name -> (dtype, shape)."""
    return {
        name: (info["dtype"], [d["size"] for d in info["tensor_shape"]["dim"]])
        for name, info in signature[side].items()
    }


@pytest.mark.parametrize(
    ("spec", "version"),
    [({}, 1), ({"version": 1}, 1), ({"version": 2}, 2), ({"version_label": "canary"}, 2)],
)
def test_grpc_metadata_shows_the_signature_of_the_version_asked_for(
    channel: grpc.Channel, spec: dict[str, Any], version: int
) -> None:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = NAME
    if "version" in spec:
        request.model_spec.version.value = spec["version"]
    if "version_label" in spec:
        request.model_spec.version_label = spec["version_label"]
    request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(request, 30.0)
    assert response.model_spec.version.value == version
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    for side in ("inputs", "outputs"):
        shown = {
            name: (
                types_pb2.DataType.Name(info.dtype),
                [str(d.size) for d in info.tensor_shape.dim],
            )
            for name, info in getattr(signature, side).items()
        }
        assert shown == SIGNATURES[version][side], side


@pytest.mark.parametrize(
    ("path", "version"), [("", 1), ("/versions/1", 1), ("/versions/2", 2), ("/labels/canary", 2)]
)
def test_rest_metadata_shows_the_signature_of_the_version_asked_for(
    gateway: GatewayServer, path: str, version: int
) -> None:
    url = f"http://localhost:{gateway.rest_port}/v1/models/{NAME}{path}/metadata"
    reply = requests.get(url, timeout=30)
    assert reply.status_code == 200, reply.text
    metadata = reply.json()
    assert metadata["model_spec"]["version"] == str(version)
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    for side in ("inputs", "outputs"):
        assert _tensors(signature, side) == SIGNATURES[version][side], side


def _oip_tensors(tensors: list[Any]) -> dict[str, tuple[str, list[int]]]:
    return {t["name"]: (t["datatype"], list(t["shape"])) for t in tensors}


@pytest.mark.parametrize(("path", "version"), [("", 1), ("/versions/1", 1), ("/versions/2", 2)])
def test_oip_rest_metadata_shows_the_version_asked_for(
    gateway: GatewayServer, path: str, version: int
) -> None:
    url = f"http://localhost:{gateway.rest_port}/v2/models/{NAME}{path}"
    metadata = requests.get(url, timeout=30).json()
    assert metadata["versions"] == ["1", "2"]
    assert _oip_tensors(metadata["inputs"]) == OIP_SIGNATURES[version]["inputs"]
    assert _oip_tensors(metadata["outputs"]) == OIP_SIGNATURES[version]["outputs"]


@pytest.mark.parametrize(("asked", "version"), [("", 1), ("1", 1), ("2", 2), ("canary", 2)])
def test_oip_grpc_metadata_shows_the_version_asked_for(
    channel: grpc.Channel, asked: str, version: int
) -> None:
    rpc: grpc.UnaryUnaryMultiCallable[
        oip_pb2.ModelMetadataRequest, oip_pb2.ModelMetadataResponse
    ] = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelMetadata",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=oip_pb2.ModelMetadataResponse.FromString,
    )
    metadata = rpc(oip_pb2.ModelMetadataRequest(name=NAME, version=asked), timeout=30)
    for side in ("inputs", "outputs"):
        shown = {t.name: (t.datatype, list(t.shape)) for t in getattr(metadata, side)}
        assert shown == OIP_SIGNATURES[version][side], side


# --- REST bodies read with the version's own spec -----------------------------------------


def test_rest_rows_are_read_with_the_input_spec_of_the_version_asked_for(
    gateway: GatewayServer, paths: dict[int, str]
) -> None:
    base = f"http://localhost:{gateway.rest_port}/v1/models/{NAME}"
    wide = _rows(6, np.float64, seed=1)
    reply = requests.post(f"{base}/versions/2:predict", json={"instances": wide.tolist()},
                          timeout=30)  # fmt: skip
    assert reply.status_code == 200, reply.text
    own = own_outputs(paths[2], {"features": wide})
    predictions = reply.json()["predictions"]
    assert [sorted(row) for row in predictions] == [["doubled", "total"]] * 3
    for name, expected in own.items():
        np.testing.assert_allclose(np.array([row[name] for row in predictions]), expected)

    narrow = _rows(4, np.float32, seed=2)
    for path in ("/versions/1", ""):  # version 1 is the default
        reply = requests.post(f"{base}{path}:predict", json={"instances": narrow.tolist()},
                              timeout=30)  # fmt: skip
        assert reply.status_code == 200, reply.text
        own = own_outputs(paths[1], {"x": narrow})
        np.testing.assert_allclose(np.array(reply.json()["predictions"]), own["y"], rtol=1e-6)


def test_rest_columns_and_named_rows_use_the_version_s_input_names(
    gateway: GatewayServer, paths: dict[int, str]
) -> None:
    base = f"http://localhost:{gateway.rest_port}/v1/models/{NAME}"
    wide = _rows(6, np.float64, seed=3)
    own = own_outputs(paths[2], {"features": wide})
    reply = requests.post(f"{base}/labels/canary:predict",
                          json={"inputs": {"features": wide.tolist()}}, timeout=30)  # fmt: skip
    assert reply.status_code == 200, reply.text
    for name, expected in own.items():
        np.testing.assert_allclose(np.array(reply.json()["outputs"][name]), expected)
    rows = [{"features": row} for row in wide.tolist()]
    reply = requests.post(f"{base}/versions/2:predict", json={"instances": rows}, timeout=30)
    assert reply.status_code == 200, reply.text
    totals = [row["total"] for row in reply.json()["predictions"]]
    np.testing.assert_allclose(np.array(totals), own["total"])

    # Version 1 has no input "features": said by the gateway, naming the version's inputs.
    reply = requests.post(f"{base}/versions/1:predict", json={"instances": rows}, timeout=30)
    assert reply.status_code == 400
    assert "has no input 'features'; it has ['x']" in reply.json()["error"]


def test_oip_infer_asks_for_the_version_s_own_outputs(
    gateway: GatewayServer, paths: dict[int, str]
) -> None:
    wide = _rows(6, np.float64, seed=4)
    body: dict[str, Any] = {
        "inputs": [{"name": "features", "shape": [3, 6], "datatype": "FP64",
                    "data": wide.ravel().tolist()}],
        "outputs": [{"name": "total"}],
    }  # fmt: skip
    url = f"http://localhost:{gateway.rest_port}/v2/models/{NAME}/versions/2/infer"
    reply = requests.post(url, json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    (output,) = reply.json()["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("total", "FP64", [3, 1])
    own = own_outputs(paths[2], {"features": wide})
    np.testing.assert_allclose(np.reshape(output["data"], output["shape"]), own["total"])
