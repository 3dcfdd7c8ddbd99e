"""Overload: producers at several times the pool's capacity against a bounded queue."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import redis

from queueing import Client, QueueFull, keys
from tests.integration.conftest import PoolFactory
from tests.integration.helpers import heartbeats
from tests.waiting import wait_until

CAP = 200


def test_past_capacity_producers_get_queue_full_at_once_and_the_pool_keeps_serving(
    start_pool: PoolFactory, mlp_path: str, redis_url: str
) -> None:
    start_pool(mlp_path, name="overload", max_queue=CAP, max_batch_size=32, heartbeat_s=0.25)
    conn = redis.Redis.from_url(redis_url)
    outcomes: Counter[str] = Counter()
    longest_queue = [0]
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

    def watch_queue() -> None:
        while not stop.wait(0.005):  # sample the queue length every 5 ms
            length: int = conn.xlen(keys.stream("overload"))
            longest_queue[0] = max(longest_queue[0], length)

    threads = [threading.Thread(target=flood) for _ in range(3)]
    threads.append(threading.Thread(target=watch_queue))
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
    conn.close()

    print(f"\noverload: {dict(outcomes)}, longest queue {longest_queue[0]} (cap {CAP})")
    assert set(outcomes) == {"ok", "QueueFull", "DeadlineExceeded"}  # nothing unexpected
    assert longest_queue[0] <= CAP  # Redis holds at most the cap, whatever comes


def _served(url: str) -> int:
    return sum(int(b["requests"]) for b in heartbeats(url, "overload"))
