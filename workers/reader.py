"""The reader thread: ``XREADGROUP`` new entries, take over those of dead workers, and hand
them to the intake; requests go to the batcher, answers to the writer. One reader per
shard of the model's queue (see :mod:`workers.shards`): on a Redis Cluster the shards live
on other nodes, and one blocking read cannot wait on them all."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import redis

from queueing import connection, keys
from workers import shards
from workers.claims import Claims
from workers.config import PoolConfig
from workers.intake import plan_takeover, triage
from workers.messages import Answer, Entry, InHand
from workers.shared import BatchDesk, HeldEntries
from workers.writer import Writer

log = logging.getLogger(__name__)

#: XREADGROUP's BLOCK: how long the reader waits for work before it looks at its flags.
READ_BLOCK_MS = 100

#: recv() size of the reader's connection (redis-py's default is 64 KiB).
READ_BUFFER_BYTES = 1 << 20

#: Most of its own pending entries the reader reads again after a lost connection.
RECOVER_MAX = 100_000


class Admission(Protocol):
    """What the reader hands entries to: an :class:`workers.intake.Intake`, or a
    :class:`workers.versions.VersionRouter` in front of several versions' intakes."""

    def admit(
        self, entries: list[Entry], *, suspect: bool
    ) -> tuple[list[InHand], list[Answer]]: ...

    def dead_letter(self, entry_id: bytes, fields: dict[bytes, bytes], reason: str) -> Answer: ...


class Reader:
    """Reads one shard (``claims.stream``) while the worker is not stopping; what it does
    not read stays in the stream for other workers. ``run`` is the thread's body. The
    readers of one worker hand over under ``accept_lock``, one at a time, as one reader
    would."""

    def __init__(
        self,
        config: PoolConfig,
        *,
        consumer: str,
        inherit_from: Sequence[str],
        suspects: set[bytes] | None = None,
        claims: Claims,
        intake: Admission,
        desk: BatchDesk,
        writer: Writer,
        held: HeldEntries,
        stopping: threading.Event,
        register: Callable[[], None],
        accept_lock: threading.Lock | None = None,
    ) -> None:
        self.config = config
        self.consumer = consumer
        self.stream = claims.stream
        self.inherit_from = list(inherit_from)
        self.suspects = suspects  # what the predecessors were running (see workers.running)
        self.claims = claims
        self.intake = intake
        self.desk = desk
        self.writer = writer
        self.held = held
        self.stopping = stopping
        self.register = register  # after Redis lost our stream and group
        self.accept_lock = accept_lock or threading.Lock()
        self.done = threading.Event()

    def run(self) -> None:
        """Take over the dead predecessors' entries, then read until stopping."""
        # Its own connection (it blocks), held rather than checked out of a pool per call.
        conn = connection.connect(
            self.config.redis_url,
            socket_timeout=READ_BLOCK_MS / 1000 + 10,
            single_connection_client=True,
            # A read of many image requests is megabytes: take it in large gulps.
            socket_read_size=READ_BUFFER_BYTES,
        )
        count = self.config.max_batch_size
        backoff = 0.05
        # Take over entries of dead workers this often (and the idle consumers now and then).
        claim_every = max(0.1, self.config.claim_idle_ms / 2000)
        next_claim = time.monotonic() + claim_every
        next_dead_check = time.monotonic()  # at once: a pool may have died holding requests
        next_prune = time.monotonic() + 60
        reconnected = False
        try:
            self._take_over(conn, self.claims.inherit(conn, self.inherit_from), self.suspects)
            while not self.stopping.is_set():
                if not self.desk.wait_for_room(0.1):
                    continue
                try:
                    now = time.monotonic()
                    if now >= next_dead_check:
                        next_dead_check = now + self.config.heartbeat_s
                        self._take_from_dead(conn)
                    if now >= next_claim:
                        next_claim = now + claim_every
                        self._take_over(conn, self.claims.autoclaim(conn))
                    if now >= next_prune:
                        next_prune = now + 60
                        self.claims.prune_consumers(conn)
                    if reconnected:
                        self._recover_own(conn)
                        reconnected = False
                    reply = conn.xreadgroup(
                        keys.GROUP,
                        self.consumer,
                        {self.stream: ">"},
                        count=count,
                        block=READ_BLOCK_MS,
                    )
                    backoff = 0.05
                except connection.REDIS_ERRORS as e:  # a cluster's own errors included
                    if isinstance(e, redis.ResponseError) and "NOGROUP" in str(e):
                        # Redis lost our stream and group (restarted without persistence,
                        # or flushed): register again and go on reading.
                        log.warning("reader: %s; registering the model again", e)
                        self.register()
                        continue
                    transient = connection.moving(e) or connection.unblocked(e)
                    if isinstance(e, redis.ResponseError) and not transient:
                        raise
                    # Unreachable, or a cluster moving (a failover: our master turned
                    # replica under a blocked read): wait, learn the topology, read again.
                    log.warning("reader: %s; retrying in %.2fs", e, backoff)
                    reconnected = True
                    self.stopping.wait(backoff)
                    connection.refresh(conn)
                    backoff = min(backoff * 2, 1.0)
                    continue
                entries = cast(list[Entry], cast(Any, reply)[0][1]) if reply else []
                self._accept(shards.qualify(entries, self.claims.shard),
                             queue_empty=len(entries) < count)  # fmt: skip
        finally:
            conn.close()
            self.done.set()
            self.desk.wake()

    def _take_from_dead(self, conn: redis.Redis) -> None:
        """Take over the entries of workers whose heartbeat expired and that nobody took
        over (a pool or host gone): at once, rather than after ``claim_idle_ms``. A
        worker that has not beaten for three heartbeats is dead; idle that long too."""
        dead_after_ms = int(self.config.heartbeat_s * 3000)
        dead = self.claims.dead_consumers(conn, min_idle_ms=dead_after_ms)
        if dead:
            taken = self.claims.take_from_dead(conn, dead, min_idle_ms=dead_after_ms)
            self._take_over(conn, taken)

    def _recover_own(self, conn: redis.Redis) -> None:
        """After a lost connection: entries Redis handed us whose reply never arrived (it
        went down, or the connection dropped, as it answered) are pending under our name
        but not held. Read them again from our own pending list, now, rather than leave
        them to be taken over after ``claim_idle_ms``."""
        reply = conn.xreadgroup(keys.GROUP, self.consumer, {self.stream: "0"}, count=RECOVER_MAX)
        entries = shards.qualify(
            cast(list[Entry], cast(Any, reply)[0][1]) if reply else [], self.claims.shard
        )
        held = set(self.held.snapshot())
        lost = [
            (entry_id, fields) for entry_id, fields in entries if fields and entry_id not in held
        ]
        if lost:
            log.warning("reader: %d requests read before the connection dropped; taking them"
                        " again", len(lost))  # fmt: skip
            self._accept(lost, queue_empty=None)

    def _take_over(
        self, conn: redis.Redis, entries: list[Entry], known_fatal: set[bytes] | None = None
    ) -> None:
        """Entries taken from dead workers: dead-letter those whose runs kept killing their
        worker; of the rest, those that may have killed one run alone, the others batch
        like new ones (see :func:`plan_takeover`; ``known_fatal`` likewise)."""
        if not entries:
            return
        deliveries = self.claims.delivery_counts(conn, entries)
        recorded = self.claims.recorded_runs(conn, entries)
        fatal, alone, record = plan_takeover(
            [entry_id for entry_id, _ in entries], recorded, known_fatal
        )
        if record:
            self.claims.record_runs(conn, record)
        fresh, dead = triage(entries, deliveries, fatal, max_deliveries=self.config.max_deliveries)
        if dead:
            log.error("dead-lettering %d requests: their workers kept dying", len(dead))
            self.held.add(entry_id for (entry_id, _), _ in dead)
            self.writer.submit(
                [
                    self.intake.dead_letter(entry_id, fields, reason)
                    for (entry_id, fields), reason in dead
                ]
            )
        by_alone = dict(zip((entry_id for entry_id, _ in entries), alone, strict=True))
        self._accept([e for e in fresh if by_alone[e[0]]], queue_empty=None, suspect=True)
        self._accept([e for e in fresh if not by_alone[e[0]]], queue_empty=None)

    def _accept(
        self, entries: list[Entry], *, queue_empty: bool | None, suspect: bool = False
    ) -> None:
        """Entries to the intake; its requests to the batcher, its answers to the writer."""
        self.held.add(entry_id for entry_id, _ in entries)
        with self.accept_lock:
            accepted, refused = self.intake.admit(entries, suspect=suspect)
            self.writer.submit(refused)
            self.desk.add(accepted, queue_empty=queue_empty)
