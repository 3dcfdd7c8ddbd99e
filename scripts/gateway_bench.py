"""The gateway's cost: TF Serving gRPC ``Predict`` from many concurrent calls through
``tfpool gateway``, against the direct ``AsyncClient`` on the same pool, in one run.

    python scripts/gateway_bench.py                       # bench `mlp`, 64 calls in flight
    python scripts/gateway_bench.py --concurrency 128 --seconds 10 --rows 8

Starts a private redis-server, a pool of the bench `mlp` (one CPU worker) and a gateway
process (``tfpool gateway``, as it runs in production), then runs a closed loop of
``--concurrency`` calls in flight, one after the other for each path: the direct client,
then gRPC ``Predict``. Each call sends ``--rows`` rows and waits for its answer. The gRPC
calls are what a TF Serving client sends (``PredictRequest`` with a ``TensorProto`` built
from a numpy array), made on ``grpc.aio`` with the gateway's own wire-identical messages,
so that this process needs no TensorFlow.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, cast

import grpc
import numpy as np
import psutil

from queueing import AsyncClient
from workers.bench import build_model
from workers.cli import redis_url_or_embedded
from workers.config import PoolConfig
from workers.gateway import tensors
from workers.gateway.proto import tfs_pb2
from workers.placement import Slot, cpu_count
from workers.supervisor import Supervisor

PREDICT = "/tensorflow.serving.PredictionService/Predict"


@dataclass
class _Run:
    """One path's figures: calls/s, latencies (ms), CPU seconds of this process and of
    the gateway's over the measured window."""

    rate: float
    latencies: list[float]
    own_cpu_s: float
    gateway_cpu_s: float


async def _closed_loop(
    call: Callable[[], Awaitable[object]],
    *,
    concurrency: int,
    warmup_s: float,
    seconds: float,
    gateway: psutil.Process,
) -> _Run:
    """``concurrency`` calls in flight; figures from the window after ``warmup_s``."""
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from, stop_at = start + warmup_s, start + warmup_s + seconds
    cpu: dict[str, float] = {}

    async def one_slot() -> None:
        while (now := loop.time()) < stop_at:
            await call()
            if now >= measure_from:
                latencies.append((loop.time() - now) * 1000)

    async def mark_start() -> None:
        await asyncio.sleep(warmup_s)
        cpu["own"], cpu["gateway"] = time.process_time(), sum(gateway.cpu_times()[:2])

    marker = asyncio.create_task(mark_start())
    await asyncio.gather(*(one_slot() for _ in range(concurrency)))
    await marker
    return _Run(
        rate=len(latencies) / seconds,
        latencies=latencies,
        own_cpu_s=time.process_time() - cpu["own"],
        gateway_cpu_s=sum(gateway.cpu_times()[:2]) - cpu["gateway"],
    )


def _line(name: str, run: _Run, rows: int) -> str:
    p50, p99 = np.percentile(run.latencies, [50, 99])
    calls = len(run.latencies)
    return (
        f"{name:<22} {run.rate:>7,.0f} req/s {run.rate * rows:>8,.0f} rows/s"
        f"   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms"
        f"   CPU/req: caller {run.own_cpu_s / calls * 1e6:4.0f} us,"
        f" gateway {run.gateway_cpu_s / calls * 1e6:4.0f} us"
    )


async def _measure(
    args: argparse.Namespace, redis_url: str, grpc_port: int, gateway: psutil.Process
) -> list[str]:
    x = np.random.default_rng(0).standard_normal((args.rows, 64)).astype(np.float32)
    lines = []
    async with AsyncClient(redis_url) as client:

        async def direct() -> object:
            return await client.predict("mlp", x)

        run = await _closed_loop(
            direct, concurrency=args.concurrency, warmup_s=1.0, seconds=args.seconds,
            gateway=gateway,
        )  # fmt: skip
        lines.append(_line("direct AsyncClient", run, args.rows))

    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        predict = channel.unary_unary(
            PREDICT,
            request_serializer=tfs_pb2.PredictRequest.SerializeToString,
            response_deserializer=tfs_pb2.PredictResponse.FromString,
        )

        async def through_gateway() -> object:
            request = tfs_pb2.PredictRequest()
            request.model_spec.name = "mlp"
            request.inputs["x"].CopyFrom(tensors.to_tensor_proto(x))
            response = await predict(request, timeout=30.0)
            return tensors.from_tensor_proto(response.outputs["y"], "y")

        run = await _closed_loop(
            through_gateway, concurrency=args.concurrency, warmup_s=1.0, seconds=args.seconds,
            gateway=gateway,
        )  # fmt: skip
        lines.append(_line("gateway gRPC Predict", run, args.rows))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight")
    parser.add_argument("--rows", type=int, default=1, help="rows per call")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured per path")
    parser.add_argument("--threads", type=int, default=cpu_count(), help="intra-op threads")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, redis_url_or_embedded(None) as url:
        path = build_model("mlp", tmp)
        config = PoolConfig(model=path, name="mlp", redis_url=url, log_level="WARNING",
                            max_batch_size=64, max_queue=0)  # fmt: skip
        supervisor = Supervisor(config, slots=[Slot(0, None, args.threads, 1)])
        supervisor.start()
        where = ["--host", "127.0.0.1", "--grpc-port", "0", "--rest-port", "0"]
        gateway = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "gateway", "--redis-url", url, *where],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            line = cast(IO[str], gateway.stdout).readline()
            port = re.search(r"gRPC on port (\d+)", line)
            if port is None or not supervisor.wait_ready(timeout=600):
                print(f"gateway_bench: the pool or the gateway did not start: {line}")
                return 1
            started = time.monotonic()
            lines = asyncio.run(_measure(args, url, int(port[1]), psutil.Process(gateway.pid)))
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
            supervisor.drain()
    print(f"\nmlp, {args.rows} row(s) per call, {args.concurrency} calls in flight,"
          f" {cpu_count()} cores ({time.monotonic() - started:.0f}s):")  # fmt: skip
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
