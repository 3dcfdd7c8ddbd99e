"""Who holds which request: taking over the pending entries of dead workers, keeping our
own from being taken while we are alive, and counting deliveries.

A request read with XREADGROUP stays in the group's pending entries list (PEL) under the
reading worker's consumer name until it is acked. If that worker dies, nobody acks it:

* its successor on the same slot takes the dead consumer's entries over at start
  (:meth:`Claims.inherit`), which is fast;
* every worker also takes over any entry idle for longer than ``claim_idle_ms``
  (:meth:`Claims.autoclaim`), which covers a whole host dying. One sweep takes every such
  entry (up to ``SWEEP_MAX``), not one batch of them: a dead pool's requests come back at
  once rather than a few per ``claim_idle_ms / 2``.

Taking over counts as a delivery (XCLAIM and XAUTOCLAIM increment the counter). An entry
delivered more than ``max_deliveries`` times has killed every worker that took it: it goes
to the dead-letter stream. A live worker renews the entries it holds with ``XCLAIM ...
JUSTID`` (which resets their idle time without counting a delivery), so a long batch is
never taken from it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, cast

import redis

from queueing import keys
from workers import shards
from workers.config import PoolConfig

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]

#: Consumers with nothing pending and idle this long are removed from the group (a live
#: worker's next read recreates its consumer, so removing an idle one is always safe).
PRUNE_IDLE_MS = 10 * 60 * 1000

#: Most entries one sweep takes over (it may hold them a while: they are renewed).
SWEEP_MAX = 1000

#: Entries asked for per XAUTOCLAIM of a sweep (Redis scans ten times that many at most).
SWEEP_STEP = 100


class Claims:
    """The claim operations of one worker (consumer ``consumer``) on one stream: shard
    ``shard`` of the model's queue, whose attempt counts are in hash ``attempts``. Entry
    ids in and out are the worker's (naming the shard, see :mod:`workers.shards`)."""

    def __init__(
        self,
        *,
        stream: str,
        consumer: str,
        claim_idle_ms: int,
        max_deliveries: int,
        batch: int,
        shard: int = 0,
        attempts: str = "",
    ) -> None:
        self.stream = stream
        self.shard = shard
        self.attempts = attempts
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.batch = batch
        self._autoclaim_cursor = "0-0"

    def inherit(self, conn: redis.Redis, predecessors: Iterable[str]) -> list[Entry]:
        """Take over every entry pending under ``predecessors`` (dead consumers of this
        slot), then remove them from the group."""
        taken: list[Entry] = []
        for dead in predecessors:
            while True:
                rows = cast(
                    list[dict[str, Any]],
                    conn.xpending_range(
                        self.stream, keys.GROUP, min="-", max="+", count=self.batch,
                        consumername=dead,
                    ),
                )  # fmt: skip
                if not rows:
                    break
                ids = [row["message_id"] for row in rows]
                claimed: list[Any] = conn.xclaim(self.stream, keys.GROUP, self.consumer, 0, ids)
                taken += _live(claimed)
                self._drop_deleted(conn, ids, claimed)
            conn.xgroup_delconsumer(self.stream, keys.GROUP, dead)
        if taken:
            log.warning("took over %d requests from %s", len(taken), ", ".join(predecessors))
        return shards.qualify(taken, self.shard)

    def dead_consumers(self, conn: redis.Redis, *, min_idle_ms: int) -> list[str]:
        """Consumers holding entries whose worker's heartbeat has expired, idle at least
        ``min_idle_ms``: workers that died with no successor to take over (a whole pool
        or host gone). Their entries can be taken now, not after ``claim_idle_ms``."""
        try:
            consumers: list[dict[str, Any]] = conn.xinfo_consumers(self.stream, keys.GROUP)
        except redis.ResponseError as e:
            if "no such key" in str(e) or "NOGROUP" in str(e):
                return []  # Redis lost the stream (the reader registers again): none held
            raise
        names = [_text(info["name"]) for info in consumers
                 if info["pending"] and info["idle"] >= min_idle_ms]  # fmt: skip
        names = [name for name in names if name != self.consumer]
        if not names:
            return []
        pipe = conn.pipeline(transaction=False)
        for name in names:
            pipe.exists(keys.worker_heartbeat(name))
        return [name for name, alive in zip(names, pipe.execute(), strict=True) if not alive]

    def take_from_dead(
        self, conn: redis.Redis, consumers: list[str], *, min_idle_ms: int
    ) -> list[Entry]:
        """Take over the entries pending under ``consumers`` (see :meth:`dead_consumers`)
        that are idle at least ``min_idle_ms``. Other workers may be taking the same ones:
        an entry one of them took is no longer idle, and stays theirs. The consumers are
        left for :meth:`prune_consumers` (removing one would drop what it still holds)."""
        taken: list[Entry] = []
        for dead in consumers:
            rows = cast(
                list[dict[str, Any]],
                conn.xpending_range(
                    self.stream, keys.GROUP, min="-", max="+", count=SWEEP_MAX - len(taken),
                    consumername=dead,
                ),
            )  # fmt: skip
            if rows:
                ids = [row["message_id"] for row in rows]
                claimed: list[Any] = conn.xclaim(
                    self.stream, keys.GROUP, self.consumer, min_idle_ms, ids
                )
                taken += _live(claimed)
            if len(taken) >= SWEEP_MAX:
                break
        if taken:
            log.warning("took over %d requests from dead workers %s", len(taken),
                        ", ".join(consumers))  # fmt: skip
        return shards.qualify(taken, self.shard)

    def autoclaim(self, conn: redis.Redis) -> list[Entry]:
        """Take over entries idle longer than ``claim_idle_ms``, whoever held them: one
        sweep of the pending entries, from where the last one stopped."""
        taken: list[Entry] = []
        while len(taken) < SWEEP_MAX:
            reply: list[Any] = conn.xautoclaim(
                self.stream, keys.GROUP, self.consumer, self.claim_idle_ms,
                start_id=self._autoclaim_cursor, count=min(SWEEP_STEP, SWEEP_MAX - len(taken)),
            )  # fmt: skip
            cursor, claimed = reply[0], reply[1]
            self._autoclaim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
            taken += _live(claimed)
            if self._autoclaim_cursor == "0-0":  # the end of the pending entries
                break
        if taken:
            log.warning("took over %d requests idle for over %d ms", len(taken),
                        self.claim_idle_ms)  # fmt: skip
        return shards.qualify(taken, self.shard)

    def delivery_counts(self, conn: redis.Redis, entries: list[Entry]) -> list[int]:
        """How many times each entry has been delivered, this delivery included."""
        if not entries:
            return []
        pipe = conn.pipeline(transaction=False)
        for entry_id, _ in entries:
            plain = shards.split(entry_id)[1]
            pipe.xpending_range(self.stream, keys.GROUP, min=plain, max=plain, count=1)
        return [int(rows[0]["times_delivered"]) if rows else 1 for rows in pipe.execute()]

    def recorded_runs(self, conn: redis.Redis, entries: list[Entry]) -> list[int]:
        """For entries just taken over: the runs of theirs recorded in the attempts hash
        (each run of a suspect, before it starts, and the batch run that may have killed a
        worker, once taken over; see :func:`workers.intake.plan_takeover`)."""
        if not entries:
            return []
        plain = [shards.split(entry_id)[1] for entry_id, _ in entries]
        return [int(value or 0) for value in conn.hmget(self.attempts, plain)]

    def record_runs(self, conn: redis.Redis, entry_ids: list[bytes]) -> None:
        """Count a run of each of these taken-over entries (those of this shard) in the
        attempts hash, before it starts: if it kills the worker, the count says so."""
        own = shards.by_shard(entry_ids).get(self.shard, [])
        if not own:
            return
        pipe = conn.pipeline(transaction=False)
        for entry_id in own:
            pipe.hincrby(self.attempts, entry_id, 1)
        pipe.execute()

    def renew(self, conn: redis.Redis, held: list[bytes]) -> None:
        """Reset the idle time of the entries we hold (those of this shard; no delivery is
        counted)."""
        entry_ids: list[Any] = shards.by_shard(held).get(self.shard, [])
        for start in range(0, len(entry_ids), 1000):
            conn.xclaim(
                self.stream, keys.GROUP, self.consumer, 0, entry_ids[start : start + 1000],
                justid=True,
            )  # fmt: skip

    def prune_consumers(self, conn: redis.Redis) -> int:
        """Remove consumers with nothing pending that have been idle a long time (workers
        that exited or died and whose entries were taken over). Returns how many."""
        removed = 0
        consumers: list[dict[str, Any]] = conn.xinfo_consumers(self.stream, keys.GROUP)
        for info in consumers:
            name = _text(info["name"])
            if name != self.consumer and info["pending"] == 0 and info["idle"] > PRUNE_IDLE_MS:
                conn.xgroup_delconsumer(self.stream, keys.GROUP, name)
                removed += 1
        return removed

    def release_if_idle(self, conn: redis.Redis) -> None:
        """At a clean exit: remove our consumer if nothing is pending under it."""
        rows = conn.xpending_range(
            self.stream, keys.GROUP, min="-", max="+", count=1, consumername=self.consumer
        )
        if not rows:
            conn.xgroup_delconsumer(self.stream, keys.GROUP, self.consumer)

    def _drop_deleted(self, conn: redis.Redis, ids: list[Any], claimed: list[Any]) -> None:
        # An entry deleted from the stream while pending comes back without fields (or not
        # at all): nothing to answer, so just clear it from the PEL.
        alive = {entry[0] for entry in claimed if entry and entry[1]}
        gone = [i for i in ids if (i.encode() if isinstance(i, str) else i) not in alive]
        if gone:
            conn.xack(self.stream, keys.GROUP, *gone)


def _text(name: str | bytes) -> str:
    return name.decode() if isinstance(name, bytes) else name


def _live(claimed: list[Any]) -> list[Entry]:
    return [(entry[0], entry[1]) for entry in claimed if entry and entry[1]]


class ShardClaims:
    """The claims of one worker on every shard of its model's queue, for what spans them:
    renewing what it holds, counting runs, releasing its consumers at exit."""

    def __init__(self, claims: list[Claims]) -> None:
        self.each = claims

    @classmethod
    def of_model(cls, config: PoolConfig, *, consumer: str) -> ShardClaims:
        """The claims of consumer ``consumer`` on each shard of ``config``'s model."""
        return cls([
            Claims(
                stream=keys.stream(name), consumer=consumer, shard=shard,
                attempts=keys.attempts(name), claim_idle_ms=config.claim_idle_ms,
                max_deliveries=config.max_deliveries, batch=config.max_batch_size,
            )
            for shard, name in enumerate(keys.shard_names(config.name, config.shards))
        ])  # fmt: skip

    def renew(self, conn: redis.Redis, held: list[bytes]) -> None:
        for claims in self.each:
            claims.renew(conn, held)

    def record_runs(self, conn: redis.Redis, entry_ids: list[bytes]) -> None:
        for claims in self.each:
            claims.record_runs(conn, entry_ids)

    def release_if_idle(self, conn: redis.Redis) -> None:
        for claims in self.each:
            claims.release_if_idle(conn)
