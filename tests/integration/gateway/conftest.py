"""Gateway fixtures: pools of real models, and a gateway in front of them, shared by every
gateway test (package scope: each pool starts once)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import tensorflow as tf
from redis.typing import EncodableT, FieldT

from queueing import keys
from tests.integration import models
from tests.waiting import wait_until
from workers.config import PoolConfig
from workers.gateway.server import GatewayConfig, GatewayServer
from workers.placement import Slot
from workers.supervisor import Supervisor

#: Pool names the tests use.
MLP, TWIN, TEXT = "gw-mlp", "gw-twin", "gw-text"
#: A model with info in Redis (a pool served it once) and no live worker.
GHOST = "gw-ghost"
#: The same, with a queue of one request.
TINY_QUEUE = "gw-tiny-queue"


class _Text(tf.Module):
    """text [*] string -> length [*] int32, upper_bytes [*] string."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serve(self, text: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"length": tf.strings.length(text), "upper_bytes": tf.strings.upper(text)}


def build_text_model(directory: Path) -> str:
    path = str(directory / "text")
    module = _Text()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return path


@pytest.fixture(scope="package")
def pools(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Pools of three models (one CPU worker each) by name -> model path, and two models
    registered in Redis with no worker alive."""
    directory = tmp_path_factory.mktemp("gateway-models")
    paths = {
        MLP: models.build_keras_mlp(directory),
        TWIN: models.build_keras_two_in_two_out(directory)[0],
        TEXT: build_text_model(directory),
    }
    supervisors = []
    try:
        for name, path in paths.items():
            # A generous latency budget: concurrent calls must find company in the queue.
            config = PoolConfig(model=path, name=name, redis_url=redis_url, workers=1,
                                max_latency_ms=20, heartbeat_s=0.25, max_batch_size=64)  # fmt: skip
            supervisor = Supervisor(config, slots=[Slot(0, None, 1, 1)])
            supervisor.start()
            supervisors.append(supervisor)
        for supervisor in supervisors:
            assert supervisor.wait_ready(timeout=180), "pool did not become ready"
        _register_ghosts(redis_url)
        yield paths
    finally:
        for supervisor in supervisors:
            supervisor.drain(timeout=30)


def _register_ghosts(redis_url: str) -> None:
    """What a pool leaves in Redis after its workers are gone: its info and stream."""
    conn = redis.Redis.from_url(redis_url)
    try:
        for name, cap in ((GHOST, 1000), (TINY_QUEUE, 1)):
            conn.xgroup_create(keys.stream(name), keys.GROUP, id="0", mkstream=True)
            info: dict[FieldT, EncodableT] = {
                "max_queue": cap,
                "inputs": "x: float32 [*, 8]",
                "outputs": "y",
            }
            conn.hset(keys.model_info(name), mapping=info)
            conn.sadd(keys.MODELS, name)
    finally:
        conn.close()


def serve_versions(
    start_pool: Any, redis_url: str, repo: Path, name: str, labels: dict[str, int]
) -> None:
    """A pool serving every version of ``name`` in the repository ``repo`` with ``labels``,
    once both versions 1 and 2 are served."""
    settings = {name: {"version_policy": "all", "labels": labels}}
    start_pool("", model_repo=str(repo), models=settings, workers=1, poll_s=0.5)
    conn = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: conn.hget(keys.model_info(name), "versions") == b"1, 2",
                   timeout=120, what="versions 1 and 2 served")  # fmt: skip
    finally:
        conn.close()


@contextmanager
def running_gateway(redis_url: str, **options: Any) -> Iterator[GatewayServer]:
    """A gateway on free loopback ports, its event loop in a thread of this process."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-gateway", daemon=True)
    thread.start()
    config = GatewayConfig(redis_url=redis_url, host="127.0.0.1", grpc_port=0, rest_port=0,
                           **options)  # fmt: skip
    server = GatewayServer(config)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=30)
        yield server
        asyncio.run_coroutine_threadsafe(server.stop(1.0), loop).result(timeout=30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


@pytest.fixture(scope="package")
def gateway(pools: dict[str, str], redis_url: str) -> Iterator[GatewayServer]:
    with running_gateway(redis_url) as server:
        yield server
