"""The round trips that queue requests: :class:`Enqueuer` for the sync client,
:class:`AsyncEnqueuer` for the asyncio one.

Ordinary requests go through the ENQUEUE script (cap check and XADDs in one atomic call);
large ones through a ROOM check and plain XADDs, so that no large body passes through Lua
(see :mod:`queueing.enqueue`). On a cluster each round ends with a WAIT for the replica
(see :func:`queueing.connection.check_wait`), a slot that moved is looked up again and
the call sent again (MOVED means nothing ran), and after any Redis error the topology is
read again, so that the next request goes to the new master.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from queueing import connection, enqueue, keys
from queueing.enqueue import Queued
from queueing.scripts import ENQUEUE, ROOM

#: Scripts are named by their SHA1, as EVALSHA wants.
ENQUEUE_SHA = hashlib.sha1(ENQUEUE.encode()).hexdigest()
ROOM_SHA = hashlib.sha1(ROOM.encode()).hexdigest()


class Enqueuer:
    """Queues requests that reply to ``reply_key`` on ``conn`` (the client's connection)."""

    def __init__(self, conn: redis.Redis, reply_key: str) -> None:
        self._redis = conn
        self.reply_key = reply_key
        self._shards = enqueue.ShardTable()
        self._with_epoch = not connection.clustered(conn)
        self._numkeys = len(enqueue.script_keys("", self._with_epoch))  # any model: 2 or 3

    def enqueue(self, model: str, ids: Sequence[str], bodies: Sequence[bytes]) -> Queued:
        """Queue ``bodies`` (request ``ids``) on ``model``'s queue: their entry ids, 0 for
        those no shard of the queue had room for, and the epoch of the Redis that holds
        them. One round trip (two for large ones) per shard tried: the next shard in turn,
        then the others while some find no room."""
        names = self._shards.cached(model)
        if names is None:
            field = self._redis.hget(keys.model_info(model), keys.FIELD_SHARDS)
            names = self._shards.learn(model, cast(bytes | None, field))
        if len(names) == 1:
            return self._enqueue_on(names[0], ids, bodies)
        placement = enqueue.Placement(self._shards.order(names), len(ids))
        epochs = []
        try:
            while (step := placement.step()) is not None:
                shard, todo = step
                placed = self._enqueue_on(shard, [ids[i] for i in todo],
                                          [bodies[i] for i in todo])  # fmt: skip
                placement.placed(placed.entries)
                epochs.append(placed.epoch)
        except connection.REDIS_ERRORS:
            self._shards.forget(model)  # a shard retired by a new layout, say
            raise
        return Queued(placement.entries, enqueue.same_epoch(epochs))

    def _enqueue_on(self, model: str, ids: Sequence[str], bodies: Sequence[bytes]) -> Queued:
        """Queue on one shard (``model``: its name, see ``keys.shard_names``)."""
        try:
            if not enqueue.is_large(bodies):
                calls = enqueue.script_calls(model, ids, self.reply_key, bodies, self._with_epoch)
                return enqueue.queued(self._run_scripts(ENQUEUE_SHA, ENQUEUE, calls))
            return self._enqueue_large(model, ids, bodies)
        except connection.REDIS_ERRORS:
            # On a cluster, a dead master's slots have moved, or are moving: look up the
            # topology again, so that the next request goes to the new master.
            connection.refresh(self._redis)
            raise

    def _enqueue_large(self, model: str, ids: Sequence[str], bodies: Sequence[bytes]) -> Queued:
        """Ask for room, then append with plain XADDs: two round trips, and no body passes
        through Lua. Producers racing between the two steps can overshoot the cap by what
        each of them appends at once; the queue stays bounded."""
        room_call = enqueue.room_call(model, len(bodies), self._with_epoch)
        ((epoch, room),) = self._run_scripts(ROOM_SHA, ROOM, [room_call])
        if not room:
            return Queued([0] * len(bodies), enqueue.epoch_of(epoch))
        pipe, replicas = connection.durable_pipeline(self._redis, keys.stream(model))
        fill_xadds(pipe, model, ids[:room], self.reply_key, bodies[:room], replicas)
        added = replies_of(pipe.execute(), replicas)
        return Queued(added + [0] * (len(bodies) - room), enqueue.epoch_of(epoch))

    def _run_scripts(self, sha: str, script: str, calls: list[list[Any]]) -> list[Any]:
        """One round trip of script calls (see :func:`fill_scripts`), all on one model's
        stream (``calls[i][0]``), tried again as :class:`queueing.enqueue.ScriptTries`
        says: the script's text goes only to a node that lacks it."""
        tries = enqueue.ScriptTries(script)
        while True:
            pipe, replicas = connection.durable_pipeline(self._redis, calls[0][0])
            fill_scripts(pipe, sha, calls, self._numkeys, replicas, tries.body)
            try:
                return replies_of(pipe.execute(), replicas)
            except redis.ResponseError as e:
                tries.after(e)  # raises it when it is not worth another try
                connection.refresh(self._redis)


class AsyncEnqueuer:
    """As :class:`Enqueuer`, on an asyncio connection; ``nodes`` gives the plain clients to
    single cluster nodes that a write followed by a WAIT needs."""

    def __init__(self, conn: aioredis.Redis, nodes: connection.NodeClients, reply_key: str) -> None:
        self._redis = conn
        self._nodes = nodes
        self.reply_key = reply_key
        self._shards = enqueue.ShardTable()
        self._with_epoch = not connection.clustered(conn)
        self._numkeys = len(enqueue.script_keys("", self._with_epoch))  # any model: 2 or 3

    async def enqueue(self, model: str, ids: Sequence[str], bodies: Sequence[bytes]) -> Queued:
        """As :meth:`Enqueuer.enqueue`."""
        names = self._shards.cached(model)
        if names is None:
            field = await self._redis.hget(keys.model_info(model), keys.FIELD_SHARDS)
            names = self._shards.learn(model, cast(bytes | None, field))
        if len(names) == 1:
            return await self._enqueue_on(names[0], ids, bodies)
        placement = enqueue.Placement(self._shards.order(names), len(ids))
        epochs = []
        try:
            while (step := placement.step()) is not None:
                shard, todo = step
                placed = await self._enqueue_on(shard, [ids[i] for i in todo],
                                                [bodies[i] for i in todo])  # fmt: skip
                placement.placed(placed.entries)
                epochs.append(placed.epoch)
        except connection.REDIS_ERRORS:
            self._shards.forget(model)
            raise
        return Queued(placement.entries, enqueue.same_epoch(epochs))

    async def _enqueue_on(self, model: str, ids: Sequence[str], bodies: Sequence[bytes]) -> Queued:
        try:
            if not enqueue.is_large(bodies):
                calls = enqueue.script_calls(model, ids, self.reply_key, bodies, self._with_epoch)
                return enqueue.queued(await self._run_scripts(ENQUEUE_SHA, ENQUEUE, calls))
            return await self._enqueue_large(model, ids, bodies)
        except connection.REDIS_ERRORS:
            await connection.refresh_async(self._redis)
            raise

    async def _enqueue_large(
        self, model: str, ids: Sequence[str], bodies: Sequence[bytes]
    ) -> Queued:
        room_call = enqueue.room_call(model, len(bodies), self._with_epoch)
        ((epoch, room),) = await self._run_scripts(ROOM_SHA, ROOM, [room_call])
        if not room:
            return Queued([0] * len(bodies), enqueue.epoch_of(epoch))
        pipe, replicas = self._nodes.pipeline(self._redis, keys.stream(model))
        fill_xadds(pipe, model, ids[:room], self.reply_key, bodies[:room], replicas)
        added = replies_of(await pipe.execute(), replicas)
        return Queued(added + [0] * (len(bodies) - room), enqueue.epoch_of(epoch))

    async def _run_scripts(self, sha: str, script: str, calls: list[list[Any]]) -> list[Any]:
        tries = enqueue.ScriptTries(script)
        while True:
            pipe, replicas = self._nodes.pipeline(self._redis, calls[0][0])
            fill_scripts(pipe, sha, calls, self._numkeys, replicas, tries.body)
            try:
                return replies_of(await pipe.execute(), replicas)
            except redis.ResponseError as e:
                tries.after(e)
                await connection.refresh_async(self._redis)


def fill_scripts(
    pipe: Any,
    sha: str,
    calls: list[list[Any]],
    numkeys: int,
    replicas: int,
    body: str | None = None,
) -> None:
    """EVALSHA of a script once per call (``[*keys, *args]``, its first ``numkeys`` the
    keys: :func:`queueing.enqueue.script_keys`). EVALSHA directly: redis-py's pipelined
    scripts ask SCRIPT EXISTS first, a second round trip each time. ``body``: the script's
    text, to EVAL instead (Redis lacked it). ``replicas``: on a cluster, a WAIT at the end
    for that many replicas (see :func:`replies_of`)."""
    for call in calls:
        if body is None:
            pipe.evalsha(sha, numkeys, *call)
        else:
            pipe.eval(body, numkeys, *call)
    if replicas:
        pipe.execute_command("WAIT", replicas, connection.WAIT_REPLICA_MS)


def fill_xadds(
    pipe: Any,
    model: str,
    ids: Sequence[str],
    reply_key: str,
    bodies: Sequence[bytes],
    replicas: int,
) -> None:
    """Plain XADDs, for requests the ROOM script made room for (and a WAIT, as in
    :func:`fill_scripts`)."""
    for request_id, body in zip(ids, bodies, strict=True):
        pipe.xadd(keys.stream(model), enqueue.entry_fields(request_id, reply_key, body))
    if replicas:
        pipe.execute_command("WAIT", replicas, connection.WAIT_REPLICA_MS)


def replies_of(replies: list[Any], replicas: int) -> list[Any]:
    """The replies of a pipeline filled by :func:`fill_scripts` or :func:`fill_xadds`,
    without its WAIT's. A request a replica has not confirmed could vanish in a failover
    without a trace: it is refused (:class:`NotDurable`, so Unavailable) rather than
    waited for forever. (It may still be answered: the answer is dropped.)"""
    connection.check_wait(replies, replicas)
    return replies[:-1] if replicas else replies
