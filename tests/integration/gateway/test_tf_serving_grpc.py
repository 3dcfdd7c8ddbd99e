"""TF Serving's gRPC API, called exactly as the TF Serving guides write it: the
``tensorflow_serving.apis`` stubs and ``tf.make_tensor_proto``."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tests.integration import models
from tests.integration.gateway.conftest import GHOST, MLP, TEXT, TWIN, running_gateway
from workers.gateway.server import GatewayServer


@pytest.fixture(scope="module")
def channel(gateway: GatewayServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"localhost:{gateway.grpc_port}") as channel:
        yield channel


def test_predict_one_input_several_rows(channel: grpc.Channel, pools: dict[str, str]) -> None:
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MLP
    request.model_spec.signature_name = "serving_default"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    result = stub.Predict(request, 10.0)

    ((name, want),) = models.keras_outputs(pools[MLP], x).items()
    assert list(result.outputs) == [name]
    np.testing.assert_allclose(tf.make_ndarray(result.outputs[name]), want, rtol=1e-5, atol=1e-6)
    assert result.model_spec.name == MLP
    assert result.model_spec.signature_name == "serving_default"


def test_predict_python_lists_one_row(channel: grpc.Channel, pools: dict[str, str]) -> None:
    """``make_tensor_proto`` of a plain list (float_val, not tensor_content)."""
    row = [0.5, -1.0, 2.0, 0.0, 1.5, -0.25, 3.0, 1.0]
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MLP
    request.inputs["x"].CopyFrom(tf.make_tensor_proto([row], dtype=tf.float32, shape=[1, 8]))
    result = stub.Predict(request, 10.0)
    ((name, want),) = models.keras_outputs(pools[MLP], np.array([row], np.float32)).items()
    np.testing.assert_allclose(tf.make_ndarray(result.outputs[name]), want, rtol=1e-5, atol=1e-6)


def test_predict_two_inputs_and_output_filter(channel: grpc.Channel, pools: dict[str, str]) -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal((3, 3)).astype(np.float32)
    want = models.keras_outputs(pools[TWIN], {"a": a, "b": b})
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = TWIN
    request.inputs["a"].CopyFrom(tf.make_tensor_proto(a))
    request.inputs["b"].CopyFrom(tf.make_tensor_proto(b))

    result = stub.Predict(request, 10.0)
    assert sorted(result.outputs) == ["y", "z"]
    for name in ("y", "z"):
        got = tf.make_ndarray(result.outputs[name])
        np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-6)

    request.output_filter.append("z")
    result = stub.Predict(request, 10.0)
    assert list(result.outputs) == ["z"]
    np.testing.assert_allclose(
        tf.make_ndarray(result.outputs["z"]), want["z"], rtol=1e-5, atol=1e-6
    )


def test_predict_bytes_in_and_out(channel: grpc.Channel) -> None:
    texts = [b"abc", b"\x00\xffzz\x00", b""]
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = TEXT
    request.inputs["text"].CopyFrom(tf.make_tensor_proto(texts))
    result = stub.Predict(request, 10.0)
    assert tf.make_ndarray(result.outputs["length"]).tolist() == [3, 5, 0]
    assert tf.make_ndarray(result.outputs["upper_bytes"]).tolist() == [
        b"ABC",
        b"\x00\xffZZ\x00",
        b"",
    ]


def test_get_model_metadata_is_the_signature_of_the_served_model(channel: grpc.Channel) -> None:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = TWIN
    request.metadata_field.append("signature_def")
    result = stub.GetModelMetadata(request, 10.0)

    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert result.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    assert {
        k: (v.dtype, [d.size for d in v.tensor_shape.dim]) for k, v in signature.inputs.items()
    } == {
        "a": (tf.float32.as_datatype_enum, [-1, 4]),
        "b": (tf.float32.as_datatype_enum, [-1, 3]),
    }
    assert sorted(signature.outputs) == ["y", "z"]

    text = get_model_metadata_pb2.GetModelMetadataRequest()
    text.model_spec.name = TEXT
    text.metadata_field.append("signature_def")
    result = stub.GetModelMetadata(text, 10.0)
    assert result.metadata["signature_def"].Unpack(signatures)
    (info,) = signatures.signature_def["serving_default"].inputs.values()
    assert info.dtype == tf.string.as_datatype_enum


def test_metadata_shows_the_outputs_before_any_answer(
    pools: dict[str, str], redis_url: str
) -> None:
    """The workers register their outputs' dtypes and shapes: a gateway that has forwarded
    nothing yet shows them (TF Serving's signature and OIP's metadata alike)."""
    with (
        running_gateway(redis_url) as fresh,
        grpc.insecure_channel(f"localhost:{fresh.grpc_port}") as channel,
    ):
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = TWIN
        request.metadata_field.append("signature_def")
        result = stub.GetModelMetadata(request, 10.0)
        oip = requests.get(f"http://localhost:{fresh.rest_port}/v2/models/{TWIN}", timeout=10)

    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert result.metadata["signature_def"].Unpack(signatures)
    outputs = signatures.signature_def["serving_default"].outputs
    assert {k: (v.dtype, [d.size for d in v.tensor_shape.dim]) for k, v in outputs.items()} == {
        "y": (tf.float32.as_datatype_enum, [-1, 2]),
        "z": (tf.float32.as_datatype_enum, [-1, 1]),
    }
    assert {t["name"]: (t["datatype"], t["shape"]) for t in oip.json()["outputs"]} == {
        "y": ("FP32", [-1, 2]),
        "z": ("FP32", [-1, 1]),
    }


def test_model_status_is_available_only_with_a_live_worker(channel: grpc.Channel) -> None:
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MLP
    (status,) = stub.GetModelStatus(request, 10.0).model_version_status
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE

    request.model_spec.name = GHOST  # served once, no worker alive
    (status,) = stub.GetModelStatus(request, 10.0).model_version_status
    assert status.state != get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert "no live worker" in status.status.error_message
