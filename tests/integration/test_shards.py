"""A model's queue split into shards (option ``shards``): producers spread their requests,
a full shard is skipped before QueueFull, the cap and deadlines hold per shard, every
shard is read, and ``tfpool status`` lists them; on one Redis, and the cap and deadlines
on a Redis Cluster too (more there: test_cluster.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from queueing import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    QueueFull,
    UnknownModel,
    connection,
    keys,
    liveness,
)
from tests.integration import models
from tests.integration.conftest import PoolFactory
from tests.waiting import wait_until
from workers.embedded_cluster import LocalCluster
from workers.status import collect, render


@pytest.fixture(scope="module")
def shard_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(masters=3, replicas=1, node_timeout_ms=2000) as started:
        yield started


def _rows(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(8).astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize("where", ["redis", "cluster"])
def test_a_full_shard_is_skipped_and_cap_and_deadlines_hold_per_shard(
    where: str, start_pool: PoolFactory, mlp_path: str, redis_url: str,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    url = redis_url
    if where == "cluster":
        url = request.getfixturevalue("shard_cluster").url
    redis_client = connection.connect(url, socket_timeout=10)
    request.addfinalizer(redis_client.close)
    name = f"sharded-cap-{where}"
    names = keys.shard_names(name, 3)
    # A pool registers the model's three shards (cap 4 each), then stops: nobody reads.
    start_pool(mlp_path, name=name, url=url, shards=3, max_queue=4).drain(timeout=30)
    assert redis_client.hget(keys.model_info(name), keys.FIELD_SHARDS) == b"3"
    rows = _rows(13, seed=1)
    with Client(url) as client:
        # A round of 4 that must be answered within a second fills one shard; of the next
        # round of 9, the other shards take 4 each, and one finds no room anywhere.
        expiring = client.submit_many(name, rows[:4], deadline=1.0)
        futures = client.submit_many(name, rows[4:])
        full = [i for i, f in enumerate(futures)
                if f.done() and isinstance(f.exception(), QueueFull)]  # fmt: skip
        assert len(full) == 1
        assert [redis_client.xlen(keys.stream(n)) for n in names] == [4, 4, 4]
        with pytest.raises(QueueFull):
            client.submit(name, rows[0])
        status = collect(redis_client)
        (model,) = [m for m in status.models if m.name == name]
        assert [(q.shard, q.stream, q.waiting) for q in model.shards] == [
            (i, keys.stream(n), 4) for i, n in enumerate(names)
        ]
        assert model.waiting == 12
        # What a producer whose request times out is told counts every shard.
        assert liveness.read(redis_client, name).waiting == 12
        assert keys.stream(names[2]) in render(status)
        (as_json,) = [m for m in json.loads(json.dumps(status.to_json()))["models"]
                      if m["name"] == name]  # fmt: skip
        assert [q["waiting"] for q in as_json["shards"]] == [4, 4, 4]
        # A new pool (starting takes longer than the deadline) reads every shard: the
        # expired requests get DeadlineExceeded, each of the others its own row's answer.
        start_pool(mlp_path, name=name, url=url, shards=3, max_queue=4)
        for future in expiring:
            with pytest.raises(DeadlineExceeded):
                client.wait(future, timeout=60)
        expected = next(iter(models.keras_outputs(mlp_path, np.stack(rows[4:])).values()))
        for i, future in enumerate(futures):
            if i in full:
                continue
            got = np.asarray(client.wait(future, timeout=60))
            np.testing.assert_allclose(got, expected[i], rtol=1e-5, atol=1e-6)
    assert [redis_client.xlen(keys.stream(n)) for n in names] == [0, 0, 0]


def test_producers_spread_over_the_shards_and_get_their_own_answers(
    start_pool: PoolFactory, mlp_path: str, redis_client: redis.Redis, redis_url: str
) -> None:
    name = "sharded-spread"
    start_pool(mlp_path, name=name, shards=3, max_batch_size=16, max_latency_ms=5)
    rows = _rows(90, seed=2)
    expected = next(iter(models.keras_outputs(mlp_path, np.stack(rows)).values()))
    with Client(redis_url) as client:
        futures = [client.submit(name, row) for row in rows]  # a submit() loop
        got = [np.asarray(client.wait(f, timeout=60)) for f in futures]
        np.testing.assert_allclose(np.stack(got), expected, rtol=1e-5, atol=1e-6)
        # Rounds go to the shards in turn: nine rounds of ten, three on each.
        rounds = [client.submit_many(name, rows[i : i + 10]) for i in range(0, 90, 10)]
        got = [np.asarray(client.wait(f, timeout=60)) for futures in rounds for f in futures]
        np.testing.assert_allclose(np.stack(got), expected, rtol=1e-5, atol=1e-6)

    async def from_tasks() -> list[np.ndarray]:
        async with AsyncClient(redis_url) as aclient:
            answers = await asyncio.gather(*(aclient.predict(name, row) for row in rows))
            return [np.asarray(a) for a in answers]

    np.testing.assert_allclose(np.stack(asyncio.run(from_tasks())), expected, rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    # Every shard carried some (the stream's last id says one was added), and each of its
    # entries was acked and deleted in its own stream: none is left there.
    for shard in keys.shard_names(name, 3):
        info = redis_client.xinfo_stream(keys.stream(shard))
        assert info["last-generated-id"] not in (b"0-0", "0-0"), shard
        stream = keys.stream(shard)

        def drained(stream: str = stream) -> bool:
            return redis_client.xlen(stream) == 0

        wait_until(drained, timeout=30, what=f"{stream}'s entries acked and deleted")


def test_a_pool_with_fewer_shards_retires_the_others_and_producers_follow(
    start_pool: PoolFactory, mlp_path: str, redis_client: redis.Redis, redis_url: str
) -> None:
    name = "resharded"
    old = keys.shard_names(name, 3)
    rows = _rows(8, seed=3)
    expected = next(iter(models.keras_outputs(mlp_path, np.stack(rows)).values()))
    with Client(redis_url) as client:
        first = start_pool(mlp_path, name=name, shards=3)
        got = np.asarray(client.predict(name, rows[0], timeout=60))
        np.testing.assert_allclose(got, expected[0], rtol=1e-5, atol=1e-6)  # 3 shards known
        first.drain(timeout=30)
        start_pool(mlp_path, name=name, shards=1)
        # The old layout's other shards are no longer registered: nothing queues there.
        assert [redis_client.exists(keys.model_info(n)) for n in old] == [1, 0, 0]
        refused = 0
        for i, row in enumerate(rows[1:], start=1):
            try:
                got = np.asarray(client.predict(name, row, timeout=60))
            except UnknownModel:  # a round sent to a retired shard, before the client knew
                refused += 1
                continue
            np.testing.assert_allclose(got, expected[i], rtol=1e-5, atol=1e-6)
        assert refused <= 1
    assert [redis_client.xlen(keys.stream(n)) for n in old] == [0, 0, 0]
