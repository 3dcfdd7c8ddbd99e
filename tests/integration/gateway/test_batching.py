"""Many concurrent gRPC calls, each one row, are batched together by the pool: the worker's
own counters (its heartbeat) show fewer batches than requests."""

from __future__ import annotations

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tests.integration import models
from tests.integration.gateway.conftest import MLP
from tests.integration.helpers import heartbeats
from tests.waiting import wait_until
from workers.gateway.server import GatewayServer

CALLS = 64


def _counters(redis_url: str) -> tuple[int, int]:
    (beat,) = heartbeats(redis_url, MLP)
    return int(beat["batches"]), int(beat["requests"])


def test_concurrent_calls_share_batches(
    gateway: GatewayServer, pools: dict[str, str], redis_url: str
) -> None:
    x = np.random.default_rng(6).standard_normal((CALLS, 8)).astype(np.float32)
    ((name, want),) = models.keras_outputs(pools[MLP], x).items()
    batches_before, requests_before = _counters(redis_url)

    with grpc.insecure_channel(f"localhost:{gateway.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        calls = []
        for row in x:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = MLP
            request.inputs["x"].CopyFrom(tf.make_tensor_proto(row[np.newaxis]))
            calls.append(stub.Predict.future(request, 30.0))
        got = np.concatenate([tf.make_ndarray(c.result().outputs[name]) for c in calls])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # each its own row's answer

    def counted() -> tuple[int, int] | None:
        batches, requests = _counters(redis_url)
        if requests - requests_before < CALLS:
            return None
        return batches - batches_before, requests - requests_before

    batches, requests = wait_until(counted, timeout=30, what="the heartbeat to count the calls")
    assert requests == CALLS
    assert batches < requests, f"{requests} requests ran in {batches} batches: none shared"
