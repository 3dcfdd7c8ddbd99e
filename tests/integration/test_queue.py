"""Admission control against a real Redis: the queue cap, for small and large requests."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import redis

from queueing import Client, QueueFull, UnknownModel, keys, wire
from queueing.enqueue import LARGE_BODY
from tests.waiting import wait_until

SMALL = np.zeros(16, np.float32)
LARGE = np.zeros(LARGE_BODY // 4 + 16, np.float32)  # just over the large-body threshold


@pytest.mark.parametrize("row", [SMALL, LARGE], ids=["small", "large"])
def test_queue_full_at_the_cap_and_nothing_beyond(
    row: np.ndarray, redis_client: redis.Redis, client: Client
) -> None:
    name = f"capped-{row.size}"
    # A model whose pool is down: registered, capped at 5, nobody reading.
    redis_client.delete(keys.stream(name))
    redis_client.hset(keys.model_info(name), mapping={"max_queue": 5})
    futures = client.submit_many(name, [row] * 8)
    full = [f for f in futures if f.done() and isinstance(f.exception(), QueueFull)]
    assert len(full) == 3
    assert all(not f.done() for f in futures[:5])  # the first five wait in the queue
    with pytest.raises(QueueFull, match=f"queue of model '{name}' is full"):
        client.submit(name, row)
    assert redis_client.xlen(keys.stream(name)) == 5
    assert client.pending == 5


@pytest.mark.parametrize("row", [SMALL, LARGE], ids=["small", "large"])
def test_unknown_model_for_small_and_large_requests(row: np.ndarray, client: Client) -> None:
    with pytest.raises(UnknownModel):
        client.submit("never-served", row)
    assert client.pending == 0


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    with Client(redis_url) as c:
        yield c


def test_a_result_posted_twice_resolves_its_future_once(
    redis_client: redis.Redis, client: Client
) -> None:
    # What a worker that died between posting a result and acking its request leaves
    # behind: the request runs again and its result arrives a second time.
    redis_client.hset(keys.model_info("twice"), mapping={"max_queue": 0})
    future = client.submit("twice", SMALL)
    result = wire.encode_result(future.request_id, np.arange(3, dtype=np.float32))
    redis_client.xadd(client.reply_key, {b"0": result})
    redis_client.xadd(client.reply_key, {b"0": result})
    np.testing.assert_array_equal(np.asarray(client.wait(future, timeout=10)), [0, 1, 2])
    wait_until(lambda: client.duplicates_ignored == 1, what="the repeat to be dropped")
    assert client.pending == 0


def test_requests_queue_after_redis_forgets_the_scripts(
    redis_client: redis.Redis, client: Client
) -> None:
    """A Redis restarted, flushed of its scripts, or a replica just promoted does not know
    the enqueue script: the request is sent again with the script's text (EVAL)."""
    name = "scripts-forgotten"
    redis_client.delete(keys.stream(name))
    redis_client.hset(keys.model_info(name), mapping={"max_queue": 0})
    client.submit_many(name, [SMALL])  # submit_many queues before it returns
    for row in (SMALL, LARGE):  # the enqueue script, and the room check of large bodies
        redis_client.script_flush()
        (future,) = client.submit_many(name, [row])
        assert not future.done()
    assert redis_client.xlen(keys.stream(name)) == 3
