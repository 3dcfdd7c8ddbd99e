"""Errors as TF Serving and Triton report them: the gRPC status and the HTTP status each
maps to, with tfpool's own message; and health that follows the pool's real state."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any, cast

import grpc
import numpy as np
import pytest
import redis
import requests
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from queueing import Client, QueueFull, keys, wire
from tests.integration.gateway.conftest import GHOST, MLP, TINY_QUEUE, running_gateway
from tests.waiting import wait_until
from workers.gateway.server import GatewayServer

ROW = np.zeros((1, 8), np.float32)


@pytest.fixture(scope="module")
def channel(gateway: GatewayServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"localhost:{gateway.grpc_port}") as channel:
        yield channel


def _predict(
    channel: grpc.Channel, model: str, x: np.ndarray, timeout: float = 10.0
) -> grpc.RpcError:
    """The error a TF Serving client gets for ``x`` sent to ``model``."""
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(request, timeout)
    return caught.value


def _rest(gateway: GatewayServer, model: str, body: dict[str, Any]) -> requests.Response:
    url = f"http://localhost:{gateway.rest_port}/v1/models/{model}:predict"
    return requests.post(url, json=body, timeout=10)


def test_unknown_model_is_not_found(channel: grpc.Channel, gateway: GatewayServer) -> None:
    error = _predict(channel, "no-such-model", ROW)
    assert error.code() == grpc.StatusCode.NOT_FOUND and "no-such-model" in str(error.details())
    reply = _rest(gateway, "no-such-model", {"instances": ROW.tolist()})
    assert reply.status_code == 404 and "no-such-model" in reply.json()["error"]
    url = f"http://localhost:{gateway.rest_port}/v2/models/no-such-model/infer"
    assert requests.post(url, json={"inputs": []}, timeout=10).status_code == 404


def test_wrong_dtype_or_shape_is_invalid_argument(
    channel: grpc.Channel, gateway: GatewayServer
) -> None:
    error = _predict(channel, MLP, ROW.astype(np.float64))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "float32" in str(error.details()) and "float64" in str(error.details())
    error = _predict(channel, MLP, np.zeros((2, 5), np.float32))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "[2, 5]" in str(error.details())

    reply = _rest(gateway, MLP, {"instances": [[1.0, 2.0, 3.0]]})
    assert reply.status_code == 400 and "expected float32 [*, 8]" in reply.json()["error"]
    assert _rest(gateway, MLP, {"instances": [["a"] * 8]}).status_code == 400
    assert _rest(gateway, MLP, {"rows": []}).status_code == 400
    bad_json = requests.post(
        f"http://localhost:{gateway.rest_port}/v1/models/{MLP}:predict", data=b"{", timeout=10
    )
    assert bad_json.status_code == 400


def test_full_queue_is_resource_exhausted(
    channel: grpc.Channel, gateway: GatewayServer, redis_url: str
) -> None:
    with Client(redis_url) as client:
        with contextlib.suppress(QueueFull):  # its one place, taken by a request nobody serves
            client.submit(TINY_QUEUE, ROW)
        error = _predict(channel, TINY_QUEUE, ROW)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in str(error.details())
        reply = _rest(gateway, TINY_QUEUE, {"instances": ROW.tolist()})
        assert reply.status_code == 429 and reply.headers["Retry-After"] == "1"


def test_grpc_deadline_is_the_requests_deadline(channel: grpc.Channel, redis_url: str) -> None:
    error = _predict(channel, GHOST, ROW, timeout=0.5)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The request went to the pool with the call's deadline: no worker will run it late.
    conn = redis.Redis.from_url(redis_url)
    try:
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], conn.xrange(keys.stream(GHOST)))
    finally:
        conn.close()
    deadlines = [
        wire.decode_request_body(fields[keys.FIELD_BODY]).deadline_ms for _, fields in entries
    ]
    assert deadlines and all(d is not None and 0 < d <= 500 for d in deadlines)


def test_rest_wait_is_bounded(pools: dict[str, str], redis_url: str) -> None:
    with running_gateway(redis_url, timeout_s=0.3) as gateway:
        reply = _rest(gateway, GHOST, {"instances": ROW.tolist()})
    assert reply.status_code == 504 and "within 0.3s" in reply.json()["error"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_redis_unreachable_is_unavailable() -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"
    with (
        running_gateway(url) as gateway,
        grpc.insecure_channel(f"localhost:{gateway.grpc_port}") as channel,
    ):
        error = _predict(channel, MLP, ROW)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot reach Redis" in str(error.details())
        reply = _rest(gateway, MLP, {"instances": ROW.tolist()})
        assert reply.status_code == 503 and "cannot reach Redis" in reply.json()["error"]
        ready = requests.get(f"http://localhost:{gateway.rest_port}/v2/health/ready", timeout=10)
        assert ready.status_code == 503
        health = health_pb2_grpc.HealthStub(channel)
        wait_until(
            lambda: (
                health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            ),
            timeout=30,
            what="the gateway to report NOT_SERVING",
        )


def test_grpc_health_follows_the_pool(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING

    def status(service: str) -> int | None:
        try:
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            return int(answer.status)
        except grpc.RpcError:  # not known yet: the health watcher has not run
            return None

    wait_until(lambda: status(GHOST) is not None, timeout=30, what="the health watcher")
    assert status("") == serving
    assert status(MLP) == serving
    assert status(GHOST) == health_pb2.HealthCheckResponse.NOT_SERVING
