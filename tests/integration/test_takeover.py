"""Requests of a dead worker come back fast, and only those that may have killed it run
alone: the batch it was running (its supervisor knows it, see workers.running), not the
requests it only held."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from queueing import Client, DeadLettered, keys
from tests.integration.conftest import PoolFactory
from tests.integration.helpers import heartbeats, start_serve, stop_process
from tests.integration.poison import BATCH_LOG, MARKER, SLOW, build_poison_model
from tests.waiting import wait_until

#: Long enough that nothing in these tests is taken over by idle time.
CLAIM_IDLE_MS = 120_000


def _row(value: float) -> np.ndarray:
    return np.full(4, value, np.float32)


def _batches(log: Path) -> list[set[float]]:
    """Every batch the model ran, as the set of requests in it (a request is one row of
    one distinct value; padding repeats rows)."""
    return [{row[0] for row in json.loads(line)} for line in log.read_text().splitlines()]


def _read(url: str, name: str, shards: int) -> int:
    """How many of ``name``'s requests workers have read and not yet acked."""
    conn = redis.Redis.from_url(url)
    try:
        return sum(
            int(conn.xpending(keys.stream(shard), keys.GROUP)["pending"])
            for shard in keys.shard_names(name, shards)
        )
    finally:
        conn.close()


@pytest.mark.parametrize("shards", [1, 3])
def test_only_the_batch_that_killed_its_worker_runs_alone(
    shards: int,
    start_pool: PoolFactory,
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``shards=3`` the requests come from three streams (one per round of the
    producer), whose entry ids may be equal: the worker still tells them apart."""
    log = tmp_path / "batches.jsonl"
    log.touch()
    monkeypatch.setenv(BATCH_LOG, str(log))  # inherited by the workers the pool spawns
    name = f"takeover{shards}"
    supervisor = start_pool(
        build_poison_model(model_dir), name=name, max_batch_size=4, shards=shards,
        max_latency_ms=200, max_deliveries=2, claim_idle_ms=CLAIM_IDLE_MS,
        preload=["tests.integration.poison"],
    )  # fmt: skip
    warm_up = len(log.read_text().splitlines())
    url = supervisor.config.redis_url
    with Client(url) as client:
        slow = client.submit(name, _row(SLOW))  # holds the worker 1.5 s
        wait_until(lambda: len(log.read_text().splitlines()) > warm_up, timeout=30,
                   what="the slow batch to start")  # fmt: skip
        # Read while the slow batch runs: the first four make the next (fatal) batch, the
        # others wait in the worker's hands. Each four read before the next are sent: with
        # three shards, the reader might otherwise find the second four first.
        first = client.submit_many(name, [_row(MARKER), _row(1), _row(2), _row(3)])
        wait_until(lambda: _read(url, name, shards) == 5, timeout=30, what="the first four read")
        waiting = client.submit_many(name, [_row(v) for v in (4, 5, 6, 7)])
        wait_until(lambda: _read(url, name, shards) == 9, timeout=30, what="the others read")
        client.wait(slow, timeout=30)
        with pytest.raises(DeadLettered):
            client.wait(first[0], timeout=120)
        for future in [*first[1:], *waiting]:
            client.wait(future, timeout=120)

    ours = {SLOW, MARKER, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0}  # not the successors' warm-up
    batches = [b for b in _batches(log)[warm_up:] if b & ours]
    fatal_at = next(i for i, b in enumerate(batches) if MARKER in b)
    fatal = batches[fatal_at]
    after = batches[fatal_at + 1 :]
    print(f"\nfatal batch {sorted(fatal)}; after it: {[sorted(b) for b in after]}")
    assert fatal >= {MARKER, 1.0}  # the batch that killed held the pill and company
    # Each of the fatal batch's requests then ran alone, once (the pill too, killing a
    # second worker: max_deliveries=2 then dead-letters it), never in company.
    for value in fatal:
        assert [b for b in after if value in b] == [{value}], value
    # What the dead worker only held (the slow request, whose answer died with it, and
    # those read while it ran) was batched as usual: in company, not one by one.
    held = {SLOW, 4.0, 5.0, 6.0, 7.0} | ({1.0, 2.0, 3.0} - fatal)
    assert any(len(b & held) >= 2 for b in after), after
    crashes = [e for e in supervisor.events if e[0] == "crash"]
    assert len(crashes) == 2, crashes


def test_a_killed_pools_requests_are_taken_in_one_sweep_long_before_claim_idle(
    start_pool: PoolFactory, model_dir: Path, redis_url: str
) -> None:
    """The whole pool (supervisor and worker) killed at once while it holds requests: no
    successor knows what it held. Another pool takes them over once the dead worker's
    heartbeat expires, not after claim_idle_ms, all in one sweep."""
    path = build_poison_model(model_dir)
    common = ["--model", path, "--name", "orphaned", "--redis-url", redis_url,
              "--workers", "1", "--max-batch-size", "4", "--heartbeat-s", "0.2",
              "--claim-idle-ms", str(CLAIM_IDLE_MS),
              "--preload", "tests.integration.poison"]  # fmt: skip
    doomed = start_serve(*common, new_session=True)
    conn = redis.Redis.from_url(redis_url)
    try:
        with Client(redis_url) as client:
            wait_until(lambda: heartbeats(redis_url, "orphaned"), timeout=120, what="ready")
            futures = [client.submit("orphaned", _row(SLOW))]
            futures += client.submit_many("orphaned", [_row(v) for v in range(1, 12)])

            def held() -> int | None:
                info = conn.xpending(keys.stream("orphaned"), keys.GROUP)
                return int(info["pending"]) if int(info["pending"]) >= 8 else None

            wait_until(held, timeout=30, what="the worker to hold the requests")
            os.killpg(doomed.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            start_pool(path, name="orphaned", max_batch_size=4, heartbeat_s=0.2,
                       claim_idle_ms=CLAIM_IDLE_MS,
                       preload=["tests.integration.poison"])  # fmt: skip
            for future in futures:  # before claim_idle_ms could have taken any of them
                client.wait(future, timeout=CLAIM_IDLE_MS / 2000)
            took = time.monotonic() - killed_at
        print(
            f"\n12 requests of a killed pool answered {took:.1f}s after the kill"
            f" (claim_idle_ms {CLAIM_IDLE_MS}, a new pool's start included)"
        )
    finally:
        stop_process(doomed)
        conn.close()
