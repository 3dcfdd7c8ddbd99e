"""A frame that fails yields its error in its place, through ``Client.stream`` and
``AsyncClient.stream`` alike: ``QueueFull``, ``RequestTimeout`` and ``DeadlineExceeded``."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from queueing import AsyncClient, Client, keys
from queueing.errors import RequestError
from queueing.wire import Outputs
from tests.integration.conftest import PoolFactory
from tests.integration.poison import SLOW, build_poison_model
from tests.waiting import wait_until
from workers.supervisor import Supervisor

MODEL = "stream-errors"
CAP = 3


@pytest.fixture(scope="module")
def pool(start_pool: PoolFactory, model_dir: Path) -> Supervisor:
    # One row per batch: a frame queued behind the slow one waits its whole 1.5 s.
    return start_pool(build_poison_model(model_dir), name=MODEL, max_batch_size=1,
                      max_queue=CAP, preload=["tests.integration.poison"])  # fmt: skip


def _kinds(results: list[Outputs | RequestError]) -> list[str]:
    return [type(r).__name__ if isinstance(r, RequestError) else "ok" for r in results]


def _frames(n: int) -> list[np.ndarray]:
    return [np.full(4, float(i), np.float32) for i in range(n)]


@pytest.fixture
def stopped_worker(pool: Supervisor, redis_url: str) -> Iterator[None]:
    """The worker stopped (SIGSTOP): what is queued stays queued; resumed afterwards."""
    conn = redis.Redis.from_url(redis_url)
    wait_until(lambda: conn.xlen(keys.stream(MODEL)) == 0, what="an empty queue")
    (worker,) = pool.serving_pids()
    os.kill(worker, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(worker, signal.SIGCONT)
        wait_until(lambda: conn.xlen(keys.stream(MODEL)) == 0, what="the queue drained")
        conn.close()


# The cap admits 3 frames, which then wait for a worker that does not run: 3 timeouts in
# their places, then 3 frames refused at once.
QUEUE_FULL_AND_TIMEOUTS = ["RequestTimeout"] * CAP + ["QueueFull"] * 3


def test_queue_full_and_timeouts_through_client_stream(
    stopped_worker: None, redis_url: str
) -> None:
    with Client(redis_url) as client:
        results = list(client.stream(MODEL, _frames(6), window=6, timeout=1))
    assert _kinds(results) == QUEUE_FULL_AND_TIMEOUTS


def test_queue_full_and_timeouts_through_async_client_stream(
    stopped_worker: None, redis_url: str
) -> None:
    async def run() -> list[Outputs | RequestError]:
        async with AsyncClient(redis_url) as client:
            return [r async for r in client.stream(MODEL, _frames(6), window=6, timeout=1)]

    assert _kinds(asyncio.run(run())) == QUEUE_FULL_AND_TIMEOUTS


# Behind a frame that takes 1.5 s, the next two are not started within 300 ms: never run.
LATE = ["ok", "DeadlineExceeded", "DeadlineExceeded"]


def _late_frames() -> list[np.ndarray]:
    return [np.full(4, SLOW, np.float32), *_frames(2)]


def test_deadline_exceeded_through_client_stream(pool: Supervisor, redis_url: str) -> None:
    with Client(redis_url) as client:
        results = list(client.stream(MODEL, _late_frames(), window=3, deadline_ms=300))
    assert _kinds(results) == LATE


def test_deadline_exceeded_through_async_client_stream(pool: Supervisor, redis_url: str) -> None:
    async def run() -> list[Outputs | RequestError]:
        async with AsyncClient(redis_url) as client:
            stream = client.stream(MODEL, _late_frames(), window=3, deadline_ms=300)
            return [r async for r in stream]

    assert _kinds(asyncio.run(run())) == LATE
