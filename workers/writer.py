"""Posting answers: turn them into Redis commands (a pure step, :func:`redis_commands`),
then send those in one MULTI/EXEC per round (:class:`Writer`).

Replies go first, then ``XACK`` + ``XDEL``, all in one transaction: Redis runs all of it or,
when it refuses a write (out of memory), none of it, so a request is never acked without
its answer. A crash before the EXEC means a second delivery and a duplicate result, which
the client drops by id, never a lost one. A round Redis does not take is kept and sent
again, with whatever answers came meanwhile, until it is stored: its entries stay held, so
their claims are renewed and no other worker takes them over.
"""

from __future__ import annotations

import logging
import queue
import time
from typing import Any, cast

import redis
from redis.typing import EncodableT

from queueing import keys, redis_state, wire
from queueing.errors import ModelError
from workers.messages import Answer
from workers.shared import HeldEntries

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


def redis_commands(
    answers: list[Answer], payloads: list[bytes | None], *, model: str, result_ttl_s: int
) -> list[Command]:
    """The commands that post ``answers`` (``payloads``: theirs, from :func:`encode`), in
    order: dead letters and kept results, replies (one XADD per reply stream, of all its
    results), attempt counts cleared, and last the acks, so that nothing is acked before
    it is answered."""
    commands: list[Command] = []
    replies: dict[str, list[bytes]] = {}
    for a, payload in zip(answers, payloads, strict=True):
        if a.dead_reason is not None:
            fields: dict[bytes, bytes | str] = {**(a.dead_fields or {})}
            fields.update({b"reason": a.dead_reason, b"entry": a.entry_id})
            flat: list[bytes | str] = [item for pair in fields.items() for item in pair]
            commands.append(("XADD", keys.dead_letters(model), "*", *flat))
        if payload is not None and a.keep_s:
            kept = keys.kept_result(cast(str, a.request_id))
            commands += [("DEL", kept), ("RPUSH", kept, payload), ("EXPIRE", kept, a.keep_s)]
        if a.reply and payload is not None:
            replies.setdefault(a.reply, []).append(payload)
    for key, results in replies.items():
        commands += [("XADD", key, "*", *keys.result_fields(results)),
                     ("EXPIRE", key, result_ttl_s)]  # fmt: skip
    suspects = [a.entry_id for a in answers if a.suspect]
    if suspects:
        commands.append(("HDEL", keys.attempts(model), *suspects))
    entry_ids = [a.entry_id for a in answers]
    stream = keys.stream(model)
    commands += [("XACK", stream, keys.GROUP, *entry_ids), ("XDEL", stream, *entry_ids)]
    return commands


class Writer:
    """The writer thread (:meth:`run`), and the two ways answers reach Redis: through its
    queue (:meth:`submit`), or sent at once on the caller's thread (:meth:`post_now`)."""

    def __init__(
        self,
        *,
        redis_url: str,
        model: str,
        result_ttl_s: int,
        held: HeldEntries,
        shared: redis.Redis,
    ) -> None:
        self.redis_url = redis_url
        self.model = model
        self.result_ttl_s = result_ttl_s
        self.held = held
        self._shared = shared  # the worker's pooled client, for post_now on other threads
        self._queue: queue.Queue[list[Answer] | None] = queue.Queue()

    def submit(self, answers: list[Answer]) -> None:
        """Post ``answers`` in the writer's next round."""
        if answers:
            self._queue.put(answers)

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
        conn = redis.Redis.from_url(
            self.redis_url, socket_timeout=10, single_connection_client=True
        )
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
        commands = redis_commands(answers, payloads, model=self.model,
                                  result_ttl_s=self.result_ttl_s)  # fmt: skip
        pipe: Any = conn.pipeline(transaction=True)  # redis-py leaves this call untyped
        for command in commands:
            pipe.execute_command(*command)
        try:
            pipe.execute()
        except redis.RedisError as e:
            if passing(e):
                log.warning("writer: %d answers not stored (%s); keeping them", len(answers), e)
                return False
            # Refused at run time, after EXEC: retrying the same commands cannot help.
            log.exception("writer: Redis refused part of a round of %d answers", len(answers))
        self.held.discard(a.entry_id for a in answers)
        return True


def passing(error: redis.RedisError) -> bool:
    """Whether Redis refused for now (unreachable, loading, out of memory, a replica during
    a failover, a failing snapshot) rather than for good."""
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
        return True  # BusyLoadingError (LOADING) is a ConnectionError
    refused_for_now = (
        redis.exceptions.OutOfMemoryError,  # a command of the round, refused as it was queued
        redis.exceptions.ExecAbortError,  # ... and so the whole round
        redis.exceptions.ReadOnlyError,
    )
    if isinstance(error, refused_for_now):
        return True
    return redis_state.out_of_memory(error) or str(error).startswith("MISCONF")
