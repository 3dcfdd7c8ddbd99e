"""The parts of enqueueing that do no I/O, shared by the sync and asyncio clients."""

from __future__ import annotations

import itertools
import random
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import redis

from queueing import connection, keys, redis_state
from queueing.errors import RedisOutOfMemory, RequestError, Unavailable, UnknownModel

#: Requests per Lua call: bounds how long one call holds Redis.
CHUNK = 512

#: Requests with a body at least this large are appended with plain XADDs after a room
#: check, rather than through the atomic enqueue script (see queueing.scripts.ROOM).
LARGE_BODY = 64 * 1024


#: How long a producer trusts what it read of a model's shard count.
SHARDS_REFRESH_S = 10.0


class ShardTable:
    """The shards of each model's queue as producers see them (no I/O): read from the
    model's info hash (:func:`shards_field`) at most ``SHARDS_REFRESH_S`` ago, and the
    order in which the next round tries them (round robin, so that producers spread their
    requests; the next shard when one is full)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._known: dict[str, tuple[float, tuple[str, ...]]] = {}
        # Each producer starts at a shard of its own, so that many do not all start at 0.
        self._turn = itertools.count(random.randrange(1 << 16))

    def cached(self, model: str) -> tuple[str, ...] | None:
        """The shard names of ``model``, or None if they must be read again."""
        seen = self._known.get(keys.split_address(model)[0])
        if seen is None or self._clock() - seen[0] > SHARDS_REFRESH_S:
            return None
        return seen[1]

    def learn(self, model: str, field: bytes | str | None) -> tuple[str, ...]:
        """What the info hash's shards field says (None: no pool wrote it, one shard)."""
        count = max(1, int(field)) if field else 1
        names = keys.shard_names(model, count)
        self._known[keys.split_address(model)[0]] = (self._clock(), names)
        return names

    def forget(self, model: str) -> None:
        """Read the count again next time (a shard refused a round: it may be retired)."""
        self._known.pop(keys.split_address(model)[0], None)

    def order(self, names: tuple[str, ...]) -> list[str]:
        """``names`` in the order to try them this round."""
        if len(names) == 1:
            return list(names)
        start = next(self._turn) % len(names)
        return list(names[start:] + names[:start])


class Placement:
    """Where the requests of one round go: to the shards ``names`` in order, the requests
    one shard had no room for to the next. ``step()`` names the next shard and the indexes
    of the requests to queue on it, :meth:`placed` takes their entry ids (0: no room);
    ``entries`` ends with 0 where no shard had room (QueueFull)."""

    def __init__(self, names: list[str], count: int) -> None:
        self._names = iter(names)
        self._todo = list(range(count))
        self.entries: list[Any] = [0] * count

    def step(self) -> tuple[str, list[int]] | None:
        if not self._todo:
            return None
        name = next(self._names, None)
        return None if name is None else (name, self._todo)

    def placed(self, entries: Sequence[Any]) -> None:
        todo = []
        for index, entry in zip(self._todo, entries, strict=True):
            if entry:
                self.entries[index] = entry
            else:
                todo.append(index)
        self._todo = todo


class ScriptTries:
    """When a round of script calls that Redis refused is worth another try, and how: a
    slot that moved (MOVED means nothing ran) up to ``MAX_MOVES`` times; a node without
    the script (NoScriptError: a replica just promoted, which never saw it) once more,
    with the script's text (``body``, for EVAL, which also caches it there), since a
    SCRIPT LOAD through a topology not yet refreshed may not reach that node."""

    MAX_MOVES = 3

    def __init__(self, script: str) -> None:
        self._script = script
        self._moves = 0
        #: The script's text once a node lacked it (EVAL rather than EVALSHA); else None.
        self.body: str | None = None

    def after(self, error: redis.ResponseError) -> None:
        """Note a refusal; raise ``error`` if the round is not to be tried again."""
        if isinstance(error, redis.exceptions.NoScriptError) and self.body is None:
            self.body = self._script
            return
        self._moves += 1
        if self._moves >= self.MAX_MOVES or not connection.moving(error):
            raise error


def is_large(bodies: Sequence[bytes]) -> bool:
    return max(len(body) for body in bodies) >= LARGE_BODY


class Queued(NamedTuple):
    """What a round of enqueueing returned: the entry ids (0 where there was no room), and
    the epoch of the Redis that holds them (None: not known, as on a cluster)."""

    entries: list[Any]
    epoch: str | None


def script_keys(model: str, with_epoch: bool) -> list[str]:
    """The keys of the ENQUEUE and ROOM scripts: the model's stream and info hash, and the
    epoch's key unless it lives in another slot (``with_epoch`` False, on a cluster)."""
    names = [keys.stream(model), keys.model_info(model)]
    return [*names, keys.EPOCH] if with_epoch else names


def script_calls(
    model: str,
    request_ids: Sequence[str],
    reply_key: str,
    bodies: Sequence[bytes],
    with_epoch: bool,
) -> list[list[Any]]:
    """``[*keys, new epoch, id, reply, body, id, reply, body, ...]`` per chunk of requests,
    for the ENQUEUE script (keys: :func:`script_keys`)."""
    head = [*script_keys(model, with_epoch), uuid.uuid4().hex]
    calls = []
    for start in range(0, len(bodies), CHUNK):
        args: list[Any] = list(head)
        for request_id, body in zip(
            request_ids[start : start + CHUNK], bodies[start : start + CHUNK], strict=True
        ):
            args += [request_id, reply_key, body]
        calls.append(args)
    return calls


def queued(replies: Sequence[Sequence[Any]]) -> Queued:
    """The ENQUEUE script's replies (one per chunk: the epoch, then the entry ids)."""
    return Queued([entry for chunk in replies for entry in chunk[1:]], epoch_of(replies[0][0]))


def room_call(model: str, count: int, with_epoch: bool) -> list[Any]:
    """The ROOM script's arguments for ``count`` requests."""
    return [*script_keys(model, with_epoch), uuid.uuid4().hex, count]


def epoch_of(value: bytes | str | None) -> str | None:
    """An epoch as a script returned it (None: without the epoch's key)."""
    return value.decode() if isinstance(value, bytes) else value


def same_epoch(epochs: Sequence[str | None]) -> str | None:
    """The epoch of a round that went to several shards: theirs if all agree, else None
    (Redis restarted in between: decide as if unknown)."""
    return epochs[0] if epochs and all(e == epochs[0] for e in epochs) else None


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
    if isinstance(error, for_now) or connection.moving(error) or connection.unblocked(error):
        return Unavailable(f"cannot reach Redis at {url}: {error}")
    return None
