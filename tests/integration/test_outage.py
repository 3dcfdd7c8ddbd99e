"""Redis goes away under load and comes back: nothing dies, nothing hangs, every request
ends in its result or a clear error, and service resumes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from queueing import AsyncClient, Client, RequestError, RequestLost, keys
from tests.integration.conftest import PoolFactory
from tests.waiting import wait_until
from workers.embedded_redis import RedisServer, free_port

#: How long Redis stays down.
OUTAGE_S = 4.0


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """A Redis of this module's own, set up before (so torn down after) its pools."""
    server = RedisServer(port=free_port(outside_ephemeral=True)).start()
    yield server
    server.stop()


def test_redis_down_for_seconds_under_load(
    server: RedisServer, start_pool: PoolFactory, mlp_path: str
) -> None:
    supervisor = start_pool(mlp_path, name="outage", url=server.url, heartbeat_s=0.5)
    x = np.ones((2, 8), np.float32)
    outcomes: Counter[str] = Counter()
    stop = threading.Event()
    recovered = threading.Event()
    outage_over = threading.Event()

    def produce() -> None:
        with Client(server.url, socket_timeout_s=2) as client:
            while not stop.is_set():
                try:
                    client.predict("outage", x, timeout=15)
                    outcomes["ok"] += 1
                    if outage_over.is_set():
                        recovered.set()
                except RequestError as e:  # the typed errors: Unavailable, RequestLost, ...
                    outcomes[type(e).__name__] += 1
                    time.sleep(0.05)

    threads = [threading.Thread(target=produce) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: outcomes["ok"] >= 50, timeout=60, what="traffic before the outage")
        server.stop()
        time.sleep(OUTAGE_S)  # the outage itself: a duration, not a wait for a condition
        server.start()
        outage_over.set()
        wait_until(recovered.is_set, timeout=60, what="a result after the outage")
    finally:
        stop.set()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "a producer hung"

    print(f"\noutage of {OUTAGE_S:.0f}s: {dict(outcomes)}")
    # Unavailable while Redis is down; RequestLost for requests it lost on restart (no
    # persistence here); UnknownModel in the moment after the restart before the workers
    # have registered the model again on the empty Redis.
    errors = {"Unavailable", "RequestLost", "RequestTimeout", "UnknownModel"}
    assert set(outcomes) <= {"ok"} | errors
    assert sum(outcomes[e] for e in errors) > 0
    assert not [e for e in supervisor.events if e[0] == "crash"]  # no worker died
    assert len(supervisor.serving_pids()) == 1


def _queue_without_workers(server: RedisServer, model: str) -> None:
    """Make ``model`` look served (its info hash, as workers write it) with no worker to
    answer: its requests wait in the queue until Redis loses them."""
    conn = redis.Redis.from_url(server.url)
    conn.hset(keys.model_info(model), mapping={"max_queue": 0})
    conn.close()


def test_client_raises_request_lost_after_an_empty_restart(server: RedisServer) -> None:
    _queue_without_workers(server, "lost-sync")
    with Client(server.url, socket_timeout_s=2) as client:
        future = client.submit("lost-sync", np.ones(8, np.float32))
        # The reader must have seen this Redis once, or it has nothing to compare with.
        wait_until(lambda: client._redis_run_id, what="the reader's first look at Redis")
        server.stop()
        server.start()  # no persistence: the queue and the reply list are gone
        with pytest.raises(RequestLost):
            client.wait(future, timeout=30)
        assert client.pending == 0


def test_async_client_raises_request_lost_after_an_empty_restart(server: RedisServer) -> None:
    _queue_without_workers(server, "lost-async")

    async def main() -> None:
        async with AsyncClient(server.url, socket_timeout_s=2) as client:
            future = await client.submit("lost-async", np.ones(8, np.float32))
            # The reader must have seen this Redis once, or it has nothing to compare with.
            await asyncio.wait_for(_seen_redis(client), timeout=30)
            server.stop()
            server.start()  # no persistence: the queue and the reply list are gone
            with pytest.raises(RequestLost):
                await client.wait(future, timeout=30)
            assert client.pending == 0

    asyncio.run(main())


async def _seen_redis(client: AsyncClient) -> None:
    while client._redis_run_id is None:
        await asyncio.sleep(0.01)
