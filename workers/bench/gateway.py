"""The gateway scenarios' parts: a ``tfpool gateway`` process in front of the bench's pool,
as it runs in production, and a producer's closed loop of TF Serving gRPC ``Predict``
calls the way TF Serving's own example client makes them (``stub.Predict.future(request,
timeout)`` with a semaphore bounding the calls in flight, one ``TensorProto`` built per
call from a numpy array). The messages are the gateway's wire-identical copies of TF
Serving's, so that the producers, like the rest of the benchmark, need no TensorFlow."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any, cast

import numpy as np

PREDICT = "/tensorflow.serving.PredictionService/Predict"


class GatewayProcess:
    """``tfpool gateway`` on a free port of 127.0.0.1, until :meth:`stop` (or the end of a
    ``with`` block)."""

    def __init__(self, redis_url: str, *, timeout_s: float = 120.0) -> None:
        where = ["--host", "127.0.0.1", "--grpc-port", "0", "--rest-port", "0"]
        self._process = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "gateway", *where],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "TFPOOL_REDIS_URL": redis_url},  # off the command line: a password
        )
        self.pid = self._process.pid
        # The gateway prints its ports once it listens; nothing else goes to its stdout.
        found: list[str] = []
        reader = threading.Thread(
            target=lambda: found.append(cast(IO[str], self._process.stdout).readline()),
            daemon=True,
        )
        reader.start()
        reader.join(timeout_s)
        port = re.search(r"gRPC on port (\d+)", found[0]) if found else None
        if port is None:
            self.stop()
            raise RuntimeError(f"tfpool gateway did not start: {found[0] if found else '-'}")
        self.address = f"127.0.0.1:{port[1]}"

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def grpc_closed_loop(
    address: str,
    model: str,
    input_name: str,
    x: np.ndarray,
    *,
    concurrency: int,
    record: Callable[[float], Callable[[Any], None]],
    end: float,
) -> None:
    """``concurrency`` ``Predict`` calls in flight until ``end`` (perf_counter); each
    answer is read back into numpy, as a client would."""
    import grpc

    from workers.gateway import tensors
    from workers.gateway.proto import tfs_pb2

    def read(future: Any) -> None:
        if future.exception() is None:
            for name, proto in future.result().outputs.items():
                tensors.from_tensor_proto(proto, name)

    channel = grpc.insecure_channel(address)
    predict = channel.unary_unary(
        PREDICT,
        request_serializer=tfs_pb2.PredictRequest.SerializeToString,
        response_deserializer=tfs_pb2.PredictResponse.FromString,
    )
    slots = threading.Semaphore(concurrency)
    while time.perf_counter() < end:
        slots.acquire()
        request = tfs_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = "serving_default"
        request.inputs[input_name].CopyFrom(tensors.to_tensor_proto(x))
        sent_at = time.perf_counter()
        future = predict.future(request, 30.0)
        future.add_done_callback(read)
        future.add_done_callback(record(sent_at))
        future.add_done_callback(lambda _: slots.release())
    for _ in range(concurrency):  # let what is in flight come back
        slots.acquire(timeout=60)
    channel.close()
