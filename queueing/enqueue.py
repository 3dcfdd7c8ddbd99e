"""The parts of enqueueing that do no I/O, shared by the sync and asyncio clients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from queueing import connection, keys, redis_state
from queueing.errors import RedisOutOfMemory, RequestError, Unavailable, UnknownModel

#: Requests per Lua call: bounds how long one call holds Redis.
CHUNK = 512

#: Requests with a body at least this large are appended with plain XADDs after a room
#: check, rather than through the atomic enqueue script (see queueing.scripts.ROOM).
LARGE_BODY = 64 * 1024


def is_large(bodies: Sequence[bytes]) -> bool:
    return max(len(body) for body in bodies) >= LARGE_BODY


def script_calls(
    model: str, request_ids: Sequence[str], reply_key: str, bodies: Sequence[bytes]
) -> list[list[Any]]:
    """``[stream, info, id, reply, body, id, reply, body, ...]`` per chunk of requests,
    for the ENQUEUE script."""
    head = [keys.stream(model), keys.model_info(model)]
    calls = []
    for start in range(0, len(bodies), CHUNK):
        args: list[Any] = list(head)
        for request_id, body in zip(
            request_ids[start : start + CHUNK], bodies[start : start + CHUNK], strict=True
        ):
            args += [request_id, reply_key, body]
        calls.append(args)
    return calls


def room_call(model: str, count: int) -> list[Any]:
    """The ROOM script's arguments for ``count`` requests."""
    return [keys.stream(model), keys.model_info(model), count]


def entry_fields(request_id: str, reply_key: str, body: bytes) -> dict[Any, Any]:
    """A request's stream entry, for a plain XADD."""
    return {keys.FIELD_ID: request_id, keys.FIELD_REPLY: reply_key, keys.FIELD_BODY: body}


def as_request_error(error: BaseException, model: str, url: str) -> RequestError | None:
    """The typed error a producer should see for a Redis error while enqueueing, if any.
    A cluster mid-failover (a slot without a master, a write no replica confirmed) is
    Redis being unavailable for now, as an unreachable Redis is."""
    if isinstance(error, redis.ResponseError) and "UNKNOWN_MODEL" in str(error):
        return UnknownModel(f"no pool serves model {model!r} on this Redis")
    if isinstance(error, redis.RedisError) and redis_state.out_of_memory(error):
        return RedisOutOfMemory(
            f"Redis at {url} is out of memory (maxmemory) and refuses new requests: {error}"
        )
    # READONLY: a master just turned replica in a failover, before it redirects us.
    for_now = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError)
    if isinstance(error, for_now) or connection.moving(error):
        return Unavailable(f"cannot reach Redis at {url}: {error}")
    return None
