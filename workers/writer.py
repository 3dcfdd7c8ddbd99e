"""Posting answers: turn them into Redis commands (a pure step, :func:`redis_commands`),
then send those in one pipeline per round, with retries (:class:`Writer`).

Replies go first, then ``XACK`` + ``XDEL``: a crash between the two means a second
delivery and a duplicate result, which the client drops by id, never a lost one.
"""

from __future__ import annotations

import logging
import queue
import time
from typing import Any, cast

import redis
from redis.typing import EncodableT

from queueing import keys, wire
from queueing.errors import ModelError
from workers.messages import Answer
from workers.metrics import Recorder, outcome
from workers.shared import HeldEntries, StreamClock

log = logging.getLogger(__name__)

#: One Redis command, as ``execute_command`` takes it.
Command = tuple[EncodableT, ...]

#: How many times a round is sent before its entries are left pending (to be taken over).
SEND_ATTEMPTS = 6


def encode(answer: Answer) -> bytes | None:
    """The result or error to send the producer (None when its id could not be read)."""
    if answer.request_id is None:
        return None
    if answer.error is not None:
        return wire.encode_error(answer.request_id, answer.error)
    try:
        return wire.encode_result(answer.request_id, cast(wire.Outputs, answer.outputs))
    except Exception as e:  # e.g. an output dtype the wire does not carry
        error = ModelError(f"cannot send the result: {e}", request_id=answer.request_id)
        return wire.encode_error(answer.request_id, error)


def redis_commands(
    answers: list[Answer], payloads: list[bytes | None], *, model: str, result_ttl_s: int
) -> list[Command]:
    """The commands that post ``answers`` (``payloads``: theirs, from :func:`encode`), in
    order: dead letters and kept results, replies (one RPUSH per reply list), attempt
    counts cleared, and last the acks, so that nothing is acked before it is answered."""
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
        commands += [("RPUSH", key, *results), ("EXPIRE", key, result_ttl_s)]
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
        metrics: Recorder,
        clock: StreamClock,
    ) -> None:
        self.redis_url = redis_url
        self.model = model
        self.result_ttl_s = result_ttl_s
        self.held = held
        self._shared = shared  # the worker's pooled client, for post_now on other threads
        self.metrics = metrics
        self.clock = clock
        self._queue: queue.Queue[list[Answer] | None] = queue.Queue()

    def submit(self, answers: list[Answer]) -> None:
        """Post ``answers`` in the writer's next round."""
        if answers:
            self._queue.put(answers)

    def post_now(self, answers: list[Answer]) -> None:
        """Post ``answers`` before returning, on the caller's thread: for answers that must
        not wait for the next batch (which may kill the worker, and them with it)."""
        self._send(answers, self._shared)

    def close(self) -> None:
        """The writer posts what it has, then :meth:`run` returns."""
        self._queue.put(None)

    def run(self) -> None:
        """The writer thread: take every ready list of answers, post them in one round."""
        conn = redis.Redis.from_url(
            self.redis_url, socket_timeout=10, single_connection_client=True
        )
        done = False
        while not done:
            answers = self._queue.get()
            if answers is None:
                break
            while True:  # take whatever else is ready: one round trip for all of it
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    done = True
                    break
                answers.extend(more)
            self._send(answers, conn)
        conn.close()

    def _send(self, answers: list[Answer], conn: redis.Redis) -> None:
        if not answers:  # a batch that only started a split request completes nothing
            return
        payloads = [encode(a) for a in answers]
        commands = redis_commands(answers, payloads, model=self.model,
                                  result_ttl_s=self.result_ttl_s)  # fmt: skip
        for attempt in range(SEND_ATTEMPTS):
            # A pipeline is emptied by execute(), even a failed one: fill a new one each time.
            pipe: Any = conn.pipeline(transaction=False)  # redis-py leaves this call untyped
            for command in commands:
                pipe.execute_command(*command)
            try:
                pipe.execute()
                self._count(answers)
                break
            except (redis.ConnectionError, redis.TimeoutError) as e:
                # Unposted entries stay pending, are taken over later: nothing is lost.
                log.warning("writer: %s (attempt %d)", e, attempt + 1)
                time.sleep(0.1 * 2**attempt)
            except redis.RedisError:
                # Not a passing fault: retrying the same commands cannot help.
                log.exception("writer: Redis refused a round of %d answers", len(answers))
                break
        self.held.discard(a.entry_id for a in answers)

    def _count(self, answers: list[Answer]) -> None:
        """Outcomes and latencies (arrival -> now) of answers just stored. Counted here,
        not when made: a request delivered again after a crash is counted once."""
        now = time.monotonic()
        self.metrics.answered(
            (outcome(a.error, dead=a.dead_reason is not None), now - self.clock.arrival(a.entry_id))
            for a in answers
        )
