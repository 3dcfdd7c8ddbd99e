"""Automatic coalescing in the clients: requests submitted close together travel in one
round trip, and each keeps what it had alone: its own answer, its deadline, its own
``QueueFull``, its own dead letter when it kills its worker, one result however many times
it is posted, and nothing left behind when its client dies or closes mid-coalesce.

To make requests wait together without timing, Redis is paused for writes (``CLIENT PAUSE
... WRITE``, Redis >= 6.2) while they are submitted: the sender's first round trip blocks,
everything submitted meanwhile waits in the client, and leaves together on ``CLIENT
UNPAUSE``. How many round trips they took is read from Redis's own command counters."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import redis

from queueing import AsyncClient, Client, DeadLettered, DeadlineExceeded, QueueFull, keys, wire
from queueing.errors import RequestError
from tests.integration import models
from tests.integration.conftest import PoolFactory
from tests.integration.poison import MARKER, build_poison_model
from tests.waiting import wait_until
from workers.supervisor import Supervisor

MODEL = "coalesced"


@pytest.fixture(scope="module")
def pool(start_pool: PoolFactory, model_dir: Path) -> tuple[Supervisor, str]:
    path = build_poison_model(model_dir)
    supervisor = start_pool(path, name=MODEL, max_batch_size=8, claim_idle_ms=1000,
                            max_deliveries=2, preload=["tests.integration.poison"])  # fmt: skip
    return supervisor, path


def _rows(n: int, start: float = 0.0) -> list[np.ndarray]:
    """``n`` distinct rows of 4 values, none a whole number (the poison markers are)."""
    return [np.arange(4, dtype=np.float32) / 8 + 0.0625 + start + i for i in range(n)]


def _want(path: str, rows: list[np.ndarray]) -> np.ndarray:
    return next(iter(models.keras_outputs(path, np.stack(rows)).values()))


def _script_calls(conn: redis.Redis) -> int:
    """How many enqueue round trips Redis has run (every client's; workers use none)."""
    stats = conn.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@contextmanager
def _writes_paused(conn: redis.Redis) -> Iterator[None]:
    """Redis holds every write until the block ends (60 s at most, should a test fail)."""
    conn.client_pause(60_000, all=False)  # CLIENT PAUSE 60000 WRITE
    try:
        yield
    finally:
        conn.client_unpause()


def _held(client: Client) -> Callable[[], bool]:
    """Whether the sender has taken everything submitted (and is blocked sending it)."""
    return lambda: len(client._outbox) == 0


def _flowing(client: Client) -> None:
    """One request answered: the model is flowing, and submit() no longer waits."""
    client.predict(MODEL, _rows(1, 100.0)[0], timeout=60)


def test_a_submit_loop_travels_in_one_round_trip_and_each_gets_its_answer(
    pool: tuple[Supervisor, str], redis_client: redis.Redis, client: Client
) -> None:
    _flowing(client)
    rows = _rows(40)
    with _writes_paused(redis_client):
        first = client.submit(MODEL, rows[0])
        wait_until(_held(client), what="the sender blocked on its first round trip")
        before = _script_calls(redis_client)
        rest = [client.submit(MODEL, row) for row in rows[1:]]  # return without waiting
        assert not any(f.done() for f in rest)
    got = [np.asarray(client.wait(f, timeout=60)) for f in [first, *rest]]
    # The 39 held in the client left together: one script call (and the first's own).
    assert _script_calls(redis_client) - before <= 2
    np.testing.assert_allclose(np.stack(got), _want(pool[1], rows), rtol=1e-5, atol=1e-6)


def test_predict_from_many_threads_each_gets_its_own_answer(
    pool: tuple[Supervisor, str], client: Client
) -> None:
    rows = _rows(64, 200.0)
    got: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(len(rows))

    def call(i: int) -> None:
        barrier.wait()
        got[i] = np.asarray(client.predict(MODEL, rows[i], timeout=60))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(rows))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(got) == list(range(len(rows)))
    want = _want(pool[1], rows)
    np.testing.assert_allclose(np.stack([got[i] for i in range(len(rows))]), want, rtol=1e-5,
                               atol=1e-6)  # fmt: skip


def test_asyncio_tasks_travel_together(
    pool: tuple[Supervisor, str], redis_client: redis.Redis, redis_url: str
) -> None:
    rows = _rows(1000, 300.0)

    async def main() -> list[np.ndarray]:
        async with AsyncClient(redis_url) as client:
            await client.predict(MODEL, rows[0], timeout=60)
            before = _script_calls(redis_client)
            got = await asyncio.gather(*(client.predict(MODEL, r, timeout=120) for r in rows))
            # Every task submitted before the sender ran once: a few calls of 512, not 1,000.
            assert _script_calls(redis_client) - before <= 4
            return [np.asarray(g) for g in got]

    got = asyncio.run(main())
    np.testing.assert_allclose(np.stack(got), _want(pool[1], rows), rtol=1e-5, atol=1e-6)


def test_time_held_in_the_client_counts_against_the_deadline(
    pool: tuple[Supervisor, str], redis_client: redis.Redis, client: Client
) -> None:
    _flowing(client)
    with _writes_paused(redis_client):
        first = client.submit(MODEL, _rows(1)[0])
        wait_until(_held(client), what="the sender blocked on its first round trip")
        late = [client.submit(MODEL, row, deadline=0.05) for row in _rows(5, 400.0)]
        time.sleep(0.2)  # a duration, not a wait for a condition: longer than the deadline
    for future in late:  # held in the client past their deadline: never run
        with pytest.raises(DeadlineExceeded):
            client.wait(future, timeout=60)
    client.wait(first, timeout=60)


def test_queue_full_lands_on_each_refused_request(
    redis_client: redis.Redis, client: Client
) -> None:
    name = "coalesced-capped"
    # Registered, capped at 5, nobody reading.
    redis_client.delete(keys.stream(name))
    redis_client.hset(keys.model_info(name), mapping={"max_queue": 5})
    client.submit(name, _rows(1)[0])  # the first waits for its round trip: accepted
    outcomes: list[Any] = []
    for row in _rows(10):
        try:
            outcomes.append(client.submit(name, row))
        except QueueFull as e:  # raised at once once the model is known to refuse
            outcomes.append(e)

    def refused() -> list[BaseException | None]:
        return [o if isinstance(o, QueueFull) else o.exception() for o in outcomes
                if isinstance(o, QueueFull) or o.done()]  # fmt: skip

    wait_until(lambda: len(refused()) >= 6, what="the refusals")
    assert len(refused()) == 6 and redis_client.xlen(keys.stream(name)) == 5
    assert all(isinstance(e, QueueFull) and e.request_id for e in refused())
    assert client.pending == 5


def test_a_poison_request_travelling_with_others_is_the_only_one_dead_lettered(
    pool: tuple[Supervisor, str], redis_client: redis.Redis, client: Client
) -> None:
    path = pool[1]
    _flowing(client)
    good = _rows(12, 500.0)
    pill = np.full(4, MARKER, np.float32)
    with _writes_paused(redis_client):
        first = client.submit(MODEL, good[0])
        wait_until(_held(client), what="the sender blocked on its first round trip")
        rest = [client.submit(MODEL, row) for row in [*good[1:6], pill, *good[6:]]]
    poisoned = rest.pop(5)
    with pytest.raises(DeadLettered):
        client.wait(poisoned, timeout=180)
    got = [np.asarray(client.wait(f, timeout=180)) for f in [first, *rest]]
    np.testing.assert_allclose(np.stack(got), _want(path, good), rtol=1e-5, atol=1e-6)
    dead = cast(list[Any], redis_client.xrange(keys.dead_letters(MODEL)))
    assert [fields[b"id"].decode() for _, fields in dead] == [poisoned.request_id]


def test_results_posted_twice_resolve_each_coalesced_future_once(
    redis_client: redis.Redis, client: Client
) -> None:
    name = "coalesced-twice"
    redis_client.hset(keys.model_info(name), mapping={"max_queue": 0})
    client.submit(name, _rows(1)[0])  # accepted: the model flows
    futures = [client.submit(name, row) for row in _rows(20)]
    for i, future in enumerate(futures):  # each answer posted twice, as after a crash
        result = wire.encode_result(future.request_id, np.full(2, i, np.float32))
        redis_client.xadd(client.reply_key, {b"0": result})
        redis_client.xadd(client.reply_key, {b"0": result})
    got = [np.asarray(client.wait(f, timeout=30)) for f in futures]
    assert [g[0] for g in got] == list(range(20))
    wait_until(lambda: client.duplicates_ignored == 20, what="every repeat dropped")


def test_closing_mid_coalesce_fails_what_was_not_sent(
    pool: tuple[Supervisor, str], redis_client: redis.Redis, redis_url: str
) -> None:
    client = Client(redis_url)
    _flowing(client)
    with _writes_paused(redis_client):
        first = client.submit(MODEL, _rows(1)[0])
        wait_until(_held(client), what="the sender blocked on its first round trip")
        unsent = [client.submit(MODEL, row) for row in _rows(10, 600.0)]
        closing = threading.Thread(target=client.close)
        closing.start()
        wait_until(lambda: client._closed.is_set(), what="close() under way")
    closing.join(timeout=60)
    assert not closing.is_alive()
    for future in unsent:
        with pytest.raises(RequestError, match="client closed"):
            future.result(timeout=0)
    assert first.done()  # answered, or failed by close(): never left waiting


PRODUCER = """
import sys
import numpy as np
from queueing import Client
client = Client(sys.argv[1])
row = np.ones(4, np.float32)
client.predict(sys.argv[2], row, timeout=120)
for i in range(1_000_000):
    client.submit(sys.argv[2], row)
    if i == 2000:
        print("submitting", flush=True)
"""


def test_a_producer_killed_mid_coalesce_leaves_nothing_stuck(
    pool: tuple[Supervisor, str], redis_client: redis.Redis, redis_url: str, client: Client
) -> None:
    producer = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, redis_url, MODEL], stdout=subprocess.PIPE, text=True
    )
    try:
        assert producer.stdout is not None
        assert producer.stdout.readline().strip() == "submitting"
    finally:
        producer.kill()
        producer.wait(timeout=30)
    # What it queued is served and acked (answers to a reply stream nobody reads, which
    # expires); what it held in memory died with it. Others are served throughout.
    row = _rows(1, 700.0)[0]
    np.testing.assert_allclose(
        np.asarray(client.predict(MODEL, row, timeout=120)), _want(pool[1], [row])[0], rtol=1e-5
    )

    def drained() -> bool:
        pending = redis_client.xpending(keys.stream(MODEL), keys.GROUP)
        return pending["pending"] == 0 and redis_client.xlen(keys.stream(MODEL)) == 0

    wait_until(drained, timeout=120, what="the dead producer's requests answered and acked")
