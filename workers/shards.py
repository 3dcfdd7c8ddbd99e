"""The shards of a model's queue, as a worker holds their entries.

A model's queue may be split into shards (option ``shards``; see ``queueing.keys``), each a
stream of its own, and stream entry ids are unique only within their stream. The worker
reads every shard and handles their entries together (one batcher, one writer), so inside
the worker an entry id names its shard too: shard 0's ids are Redis's own, shard ``i``'s
carry ``#i`` after them (``b"1700000000000-5#2"``). Only the edges that speak to Redis (the
readers, :class:`workers.claims.Claims`, the writer's acks) add or strip it. The time part
stays in front, where ``StreamClock.arrival`` reads it.
"""

from __future__ import annotations

from collections.abc import Iterable

from workers.messages import Entry

SEP = b"#"


def qualify(entries: list[Entry], shard: int) -> list[Entry]:
    """Entries read from shard ``shard``, their ids naming it."""
    if shard == 0:
        return entries
    tail = SEP + b"%d" % shard
    return [(entry_id + tail, fields) for entry_id, fields in entries]


def qualify_id(entry_id: bytes, shard: int) -> bytes:
    """One entry id of shard ``shard``, naming it."""
    return entry_id if shard == 0 else entry_id + SEP + b"%d" % shard


def split(entry_id: bytes) -> tuple[int, bytes]:
    """``(shard, the id in its stream)`` of a worker's entry id."""
    plain, sep, shard = entry_id.partition(SEP)
    return (int(shard), plain) if sep else (0, entry_id)


def by_shard(entry_ids: Iterable[bytes]) -> dict[int, list[bytes]]:
    """Entry ids grouped by shard, as their streams know them."""
    groups: dict[int, list[bytes]] = {}
    for entry_id in entry_ids:
        shard, plain = split(entry_id)
        groups.setdefault(shard, []).append(plain)
    return groups
