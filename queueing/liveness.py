"""Is any worker serving a model right now, and since when has none been?

Every heartbeat of a ready worker also stamps the model's ``keys.last_alive`` hash with the
time it was seen and the time its heartbeat lasts until, on Redis's clock (the clock every host
shares). A request may wait in the queue while no worker runs (right for background jobs,
which a pool started later will serve), but when a client gives up waiting, this says why:
``no live worker has served 'demo' since 12:03:11 (5 min ago); 8 requests waiting``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from queueing import connection, keys
from queueing.errors import RequestTimeout

#: Fields of the model's ``keys.last_alive`` hash, which heartbeats keep fresh.
FIELD_LAST_SEEN = "last_seen"
FIELD_ALIVE_UNTIL = "alive_until"


def heartbeat_fields(redis_now: float, ttl_s: float) -> dict[str, float]:
    """What a ready worker's heartbeat writes into its model's ``keys.last_alive`` hash."""
    return {FIELD_LAST_SEEN: round(redis_now, 3), FIELD_ALIVE_UNTIL: round(redis_now + ttl_s, 3)}


@dataclass(frozen=True)
class Liveness:
    """A model's last sign of life, read from Redis. Times are on Redis's clock (Unix
    seconds); ``last_seen`` is None when no worker of this version of tfpool served it."""

    model: str
    last_seen: float | None
    alive_until: float | None
    waiting: int
    now: float

    @property
    def live(self) -> bool:
        """A worker's heartbeat is current (or no worker ever stamped one: unknown)."""
        return self.alive_until is None or self.alive_until > self.now

    def describe(self) -> str:
        """E.g. ``no live worker has served 'demo' since 12:03:11 (5 min ago); 8 requests
        waiting``."""
        since = ""
        if self.last_seen is not None:
            clock = time.strftime("%H:%M:%S", time.localtime(self.last_seen))
            since = f" since {clock} ({ago(self.now - self.last_seen)})"
        plural = "" if self.waiting == 1 else "s"
        return (
            f"no live worker has served {self.model!r}{since};"
            f" {self.waiting} request{plural} waiting"
        )


def ago(seconds: float) -> str:
    """``12 s ago``, ``5 min ago``, ``3 h ago``."""
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def read(conn: redis.Redis, model: str) -> Liveness:
    """``model``'s liveness, in one round trip (two on a cluster, whose pipelines refuse
    TIME: it names no key, so no node; one more for a queue in shards)."""
    clustered = connection.clustered(conn)
    replies = _first_round(conn.pipeline(transaction=False), model, clustered).execute()
    seconds, micros = conn.time() if clustered else replies.pop()
    (last_seen, alive_until), waiting, shards = replies
    others = _other_shards(model, shards)
    if others:
        waiting += sum(_lengths(conn.pipeline(transaction=False), others).execute())
    return _liveness(model, last_seen, alive_until, waiting, seconds + micros / 1e6)


async def read_async(conn: aioredis.Redis, model: str) -> Liveness:
    """:func:`read` for asyncio."""
    clustered = connection.clustered(conn)
    replies = await _first_round(conn.pipeline(transaction=False), model, clustered).execute()
    seconds, micros = await conn.time() if clustered else replies.pop()
    (last_seen, alive_until), waiting, shards = replies
    others = _other_shards(model, shards)
    if others:
        waiting += sum(await _lengths(conn.pipeline(transaction=False), others).execute())
    return _liveness(model, last_seen, alive_until, waiting, seconds + micros / 1e6)


def _first_round(pipe: Any, model: str, clustered: bool) -> Any:
    """``pipe`` (sync or asyncio) with the liveness stamp, the first shard's length, the
    shard count, and Redis's clock unless ``clustered``."""
    pipe.hmget(keys.last_alive(model), [FIELD_LAST_SEEN, FIELD_ALIVE_UNTIL])
    pipe.xlen(keys.stream(model))
    pipe.hget(keys.model_info(model), keys.FIELD_SHARDS)
    if not clustered:
        pipe.time()
    return pipe


def _other_shards(model: str, shards: bytes | None) -> tuple[str, ...]:
    """The shards of ``model``'s queue past the first (its own stream), if it has some."""
    return keys.shard_names(model, int(shards))[1:] if shards else ()


def _lengths(pipe: Any, shards: tuple[str, ...]) -> Any:
    """``pipe`` with the length of each of ``shards``' streams."""
    for name in shards:
        pipe.xlen(keys.stream(name))
    return pipe


def _liveness(
    model: str, last_seen: bytes | None, alive_until: bytes | None, waiting: int, now: float
) -> Liveness:
    return Liveness(
        model=model,
        last_seen=None if last_seen is None else float(last_seen),
        alive_until=None if alive_until is None else float(alive_until),
        waiting=int(waiting),
        now=now,
    )


def timeout_error(conn: redis.Redis, model: str, request_id: str, timeout: float) -> RequestTimeout:
    """The :class:`RequestTimeout` of a request to ``model``, saying so when no worker is
    live. (The timeout path of :class:`~queueing.Client`.)"""
    try:
        liveness: Liveness | None = read(conn, model) if model else None
    except redis.RedisError:  # the plain message, then: Redis itself is the problem
        liveness = None
    return _timeout(liveness, request_id, timeout)


async def timeout_error_async(
    conn: aioredis.Redis, model: str, request_id: str, timeout: float
) -> RequestTimeout:
    """:func:`timeout_error` for :class:`~queueing.AsyncClient`."""
    try:
        liveness: Liveness | None = await read_async(conn, model) if model else None
    except redis.RedisError:
        liveness = None
    return _timeout(liveness, request_id, timeout)


def _timeout(liveness: Liveness | None, request_id: str, timeout: float) -> RequestTimeout:
    message = f"no result for request {request_id} within {timeout:g}s"
    if liveness is not None and not liveness.live:
        message += f": {liveness.describe()}"
    return RequestTimeout(message, request_id=request_id)
