"""Posting answers: turn them into Redis commands (a pure step, :func:`round_commands`),
then send those, once per round (:class:`Writer`).

On one Redis, replies go first, then ``XACK`` + ``XDEL``, all in one MULTI/EXEC: Redis runs
all of it or, when it refuses a write (out of memory), none of it, so a request is never
acked without its answer. A crash before the EXEC means a second delivery and a duplicate
result, which the client drops by id, never a lost one. A round Redis does not take is kept
and sent again, with whatever answers came meanwhile, until it is stored: its entries stay
held, so their claims are renewed and no other worker takes them over.

On a Redis Cluster one transaction cannot span slots, and a round's reply streams (one per
producer, each under its producer's hash tag) live in other slots than the model's stream.
So a round goes in two steps, in this order: (1) the answers (replies, kept results), one
pipeline per master, each ended by ``WAIT`` for a replica so that a failover cannot take
them back; (2) only when every one of them is stored, one MULTI/EXEC in the model's slot
with the dead letters, attempt counts and the acks. The guarantee is the same as above,
step for step: a failure in (1) acks nothing and the round is sent again (a producer may
get an answer twice and drops the repeat by id); a failure in (2), or a crash between the
two, leaves the requests pending, to be answered again, never acked unanswered. What the
split gives up is only the all-or-nothing of the answers among themselves, which nothing
relied on: each answer is delivered at least once, and exactly once as the client sees it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, cast

import redis
from redis.crc import key_slot
from redis.typing import EncodableT

from queueing import connection, keys, redis_state, wire
from queueing.errors import ModelError
from workers import shards
from workers.messages import Answer
from workers.metrics import Recorder, outcome
from workers.shared import HeldEntries, StreamClock

log = logging.getLogger(__name__)

#: One Redis command, as ``execute_command`` takes it.
Command = tuple[EncodableT, ...]

#: How long a closing writer keeps trying to post answers Redis does not take; what is
#: still unposted then stays pending, for another worker to take over.
DRAIN_S = 25.0

#: Longest wait between two tries of a round Redis did not take.
MAX_BACKOFF_S = 1.0


def encode(answer: Answer) -> bytes | None:
    """The result or error to send the producer (None when its id could not be read)."""
    if answer.request_id is None:
        return None
    if answer.error is not None:
        return wire.encode_error(answer.request_id, answer.error)
    try:
        return wire.encode_result(
            answer.request_id, cast(wire.Outputs, answer.outputs), answer.version
        )
    except Exception as e:  # e.g. an output dtype the wire does not carry
        error = ModelError(f"cannot send the result: {e}", request_id=answer.request_id)
        return wire.encode_error(answer.request_id, error)


def round_commands(
    answers: list[Answer],
    payloads: list[bytes | None],
    *,
    model: str,
    result_ttl_s: int,
    shard_count: int = 1,
) -> tuple[list[Command], list[Command]]:
    """The commands that post ``answers`` (``payloads``: theirs, from :func:`encode`), as
    ``(posts, acks)``. ``posts``: kept results and replies (one XADD per reply stream, of all
    its results), keys of other slots than the model's. ``acks``: per shard of the model's
    queue (``shard_count`` of them, see :mod:`workers.shards`), its dead letters, attempt
    counts cleared, and last its acks, all in that shard's slot. Nothing may be acked
    before every post is stored."""
    posts: list[Command] = []
    replies: dict[str, list[bytes]] = {}
    for a, payload in zip(answers, payloads, strict=True):
        if payload is not None and a.keep_s:
            kept = keys.kept_result(cast(str, a.request_id))
            posts += [("DEL", kept), ("RPUSH", kept, payload), ("EXPIRE", kept, a.keep_s)]
        if a.reply and payload is not None:
            replies.setdefault(a.reply, []).append(payload)
    for key, results in replies.items():
        posts += [("XADD", key, "*", *keys.result_fields(results)),
                  ("EXPIRE", key, result_ttl_s)]  # fmt: skip
    names = keys.shard_names(model, shard_count)
    by_shard: dict[int, list[tuple[Answer, bytes]]] = {}
    for a in answers:
        shard, entry_id = shards.split(a.entry_id)
        by_shard.setdefault(shard, []).append((a, entry_id))
    acks: list[Command] = []
    for shard, shard_answers in sorted(by_shard.items()):
        acks += _shard_acks(names[shard], shard_answers)
    return posts, acks


def _shard_acks(name: str, answers: list[tuple[Answer, bytes]]) -> list[Command]:
    """Dead letters, attempt counts cleared, acks: the commands of one shard (``name``)."""
    acks: list[Command] = []
    for a, entry_id in answers:
        if a.dead_reason is not None:
            fields: dict[bytes, bytes | str] = {**(a.dead_fields or {})}
            fields.update({b"reason": a.dead_reason, b"entry": entry_id})
            flat: list[bytes | str] = [item for pair in fields.items() for item in pair]
            acks.append(("XADD", keys.dead_letters(name), "*", *flat))
    suspects = [entry_id for a, entry_id in answers if a.suspect]
    if suspects:
        acks.append(("HDEL", keys.attempts(name), *suspects))
    entry_ids = [entry_id for _, entry_id in answers]
    stream = keys.stream(name)
    acks += [("XACK", stream, keys.GROUP, *entry_ids), ("XDEL", stream, *entry_ids)]
    return acks


def redis_commands(
    answers: list[Answer],
    payloads: list[bytes | None],
    *,
    model: str,
    result_ttl_s: int,
    shard_count: int = 1,
) -> list[Command]:
    """:func:`round_commands` as one list, posts first: what one MULTI/EXEC sends on one
    Redis."""
    posts, acks = round_commands(answers, payloads, model=model, result_ttl_s=result_ttl_s,
                                 shard_count=shard_count)  # fmt: skip
    return posts + acks


class Writer:
    """The writer thread (:meth:`run`), and the two ways answers reach Redis: through its
    queue (:meth:`submit`), or sent at once on the caller's thread (:meth:`post_now`)."""

    def __init__(
        self,
        *,
        redis_url: str,
        model: str,
        result_ttl_s: int,
        shard_count: int = 1,
        held: HeldEntries,
        shared: redis.Redis,
        metrics: Recorder,
        clock: StreamClock,
    ) -> None:
        self.redis_url = redis_url
        self.model = model
        self.result_ttl_s = result_ttl_s
        self.shard_count = shard_count
        self.held = held
        self._shared = shared  # the worker's pooled client, for post_now on other threads
        self.metrics = metrics
        self.clock = clock
        self._queue: queue.Queue[list[Answer] | None] = queue.Queue()
        self._unstored = 0  # answers submitted and not yet stored, under _settled
        self._settled = threading.Condition()

    def submit(self, answers: list[Answer]) -> None:
        """Post ``answers`` in the writer's next round."""
        if answers:
            with self._settled:
                self._unstored += len(answers)
            self._queue.put(answers)

    def settle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every answer submitted is stored (before a
        batch that may kill the worker, and the answers waiting here with it). False if
        some are still waiting (Redis is not taking them)."""
        with self._settled:
            return self._settled.wait_for(lambda: self._unstored == 0, timeout=timeout)

    def idle(self) -> bool:
        """Nothing submitted waits to be stored (the writer thread has nothing to do)."""
        with self._settled:
            return self._unstored == 0

    def post_now(self, answers: list[Answer]) -> None:
        """Post ``answers`` before returning, on the caller's thread: for answers that must
        not wait for the next batch (which may kill the worker, and them with it). If Redis
        does not take them, the writer keeps them and tries again."""
        if not self._send(answers, self._shared):
            self.submit(answers)

    def close(self) -> None:
        """The writer posts what it has, then :meth:`run` returns."""
        self._queue.put(None)

    def run(self) -> None:
        """The writer thread: take every ready list of answers, post them in one round;
        keep what Redis does not take, and try again (with what came meanwhile) after a
        backoff, until it is stored or, once closing, until DRAIN_S has passed."""
        conn = connection.connect(self.redis_url, socket_timeout=10, single_connection_client=True)
        unposted: list[Answer] = []
        backoff = 0.05
        closing = False
        give_up = float("inf")
        while not (closing and not unposted):
            if not closing:
                more, closing = self._gather(wait=backoff if unposted else None)
                unposted += more
                if closing:
                    give_up = time.monotonic() + DRAIN_S
            if not unposted:
                continue
            if self._send(unposted, conn):
                with self._settled:
                    self._unstored -= len(unposted)
                    self._settled.notify_all()
                unposted, backoff = [], 0.05
                continue
            if time.monotonic() > give_up:
                log.error("writer: %d answers unposted at exit; they stay pending for another"
                          " worker", len(unposted))  # fmt: skip
                break
            if closing:
                time.sleep(backoff)  # no new answers to wait for: just the backoff
            backoff = min(backoff * 2, MAX_BACKOFF_S)
        conn.close()

    def _gather(self, *, wait: float | None) -> tuple[list[Answer], bool]:
        """The answers ready now, waiting up to ``wait`` seconds for the first (None: until
        one comes), and whether the writer was closed."""
        answers: list[Answer] = []
        try:
            item = self._queue.get(timeout=wait)
            while item is not None:
                answers += item
                item = self._queue.get_nowait()
        except queue.Empty:
            return answers, False
        return answers, True

    def _send(self, answers: list[Answer], conn: redis.Redis) -> bool:
        """One try at posting ``answers``. True when done with them (stored, or refused for
        good and logged); False when Redis did not take them now (try again)."""
        if not answers:  # a batch that only started a split request completes nothing
            return True
        payloads = [encode(a) for a in answers]
        posts, acks = round_commands(answers, payloads, model=self.model,
                                     result_ttl_s=self.result_ttl_s,
                                     shard_count=self.shard_count)  # fmt: skip
        try:
            if connection.clustered(conn):
                self._post_apart(conn, posts)
                # One MULTI/EXEC per shard, in its slot. If one fails, the round is sent
                # again whole: the acks that ran ack nothing the second time.
                for key, commands in _by_key(acks).items():
                    pipe, _ = connection.durable_pipeline(conn, key, transaction=True)
                    _fill(pipe, commands).execute()
            else:
                pipe = conn.pipeline(transaction=True)
                _fill(pipe, posts + acks).execute()
            self._count(answers)
        except connection.REDIS_ERRORS as e:
            if passing(e):
                log.warning("writer: %d answers not stored (%s); keeping them", len(answers), e)
                connection.refresh(conn)  # a cluster may have moved: learn where to now
                return False
            # Refused at run time, after EXEC: retrying the same commands cannot help.
            log.exception("writer: Redis refused part of a round of %d answers", len(answers))
        self.held.discard(a.entry_id for a in answers)
        return True

    def _count(self, answers: list[Answer]) -> None:
        """Outcomes and latencies (arrival -> now) of answers just stored. Counted here,
        not when made: a request delivered again after a crash is counted once."""
        now = time.monotonic()
        self.metrics.answered(
            (outcome(a.error, dead=a.dead_reason is not None), now - self.clock.arrival(a.entry_id))
            for a in answers
        )

    @staticmethod
    def _post_apart(conn: redis.Redis, posts: list[Command]) -> None:
        """The posts of a round on a cluster: one pipeline per master, each ended by a WAIT
        for its replica. Raises on any refusal for now (nothing may be acked then); logs a
        refusal for good and goes on (as the MULTI/EXEC of one Redis does: the others ran)."""
        by_key: dict[str, list[Command]] = {}
        for command in posts:
            by_key.setdefault(str(command[1]), []).append(command)
        by_node: dict[str, list[Command]] = {}
        first_key: dict[str, str] = {}
        for key, commands in by_key.items():
            node = connection.node_name(conn, key)
            by_node.setdefault(node, []).extend(commands)
            first_key.setdefault(node, key)
        for node, commands in by_node.items():
            pipe, replicas = connection.durable_pipeline(conn, first_key[node])
            _fill(pipe, commands)
            if replicas:
                pipe.execute_command("WAIT", replicas, connection.WAIT_REPLICA_MS)
            replies: list[Any] = pipe.execute(raise_on_error=False)
            errors = [r for r in replies if isinstance(r, Exception)]
            for error in errors:
                if passing(error):
                    raise error
            if errors:
                log.error("writer: Redis refused %d answer commands: %s", len(errors), errors[0])
            connection.check_wait(replies, replicas)


def _by_key(acks: list[Command]) -> dict[str, list[Command]]:
    """The acks of a round by shard: under the first key of each shard's commands (every
    key of one shard shares its slot)."""
    groups: dict[str, list[Command]] = {}
    first: dict[int, str] = {}
    for command in acks:
        key = str(command[1])
        slot = key_slot(key.encode())
        groups.setdefault(first.setdefault(slot, key), []).append(command)
    return groups


def _fill(pipe: Any, commands: list[Command]) -> Any:
    """``pipe`` with ``commands`` queued (redis-py leaves execute_command untyped)."""
    for command in commands:
        pipe.execute_command(*command)
    return pipe


def passing(error: BaseException) -> bool:
    """Whether Redis refused for now (unreachable, loading, out of memory, a replica during
    a failover, a failing snapshot, a cluster slot that moved or has no master yet) rather
    than for good."""
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
        return True  # BusyLoadingError (LOADING) is a ConnectionError
    if connection.moving(error) or connection.unblocked(error):
        return True
    refused_for_now = (
        redis.exceptions.OutOfMemoryError,  # a command of the round, refused as it was queued
        redis.exceptions.ExecAbortError,  # ... and so the whole round
        redis.exceptions.ReadOnlyError,
    )
    if isinstance(error, refused_for_now):
        return True
    if not isinstance(error, redis.RedisError):
        return False
    return redis_state.out_of_memory(error) or str(error).startswith("MISCONF")
