"""Automatic coalescing, without I/O: the requests a client's callers have handed over and
its sender has not sent yet.

Callers (a ``submit()`` loop, ``predict()`` from many threads, many asyncio tasks) put
requests in; the client's one sender takes *everything* waiting at once and sends it in
one round trip per model, then comes back for whatever arrived meanwhile. A lone request
is taken the moment it arrives: nothing ever waits for company. Each request is still its
own stream entry, so everything past the client (claims, dead letters, poison isolation,
exactly-once results) sees what it saw before.

The sender marks a model *flowing* when a send of it was fully accepted, and not flowing
after any refusal or error: the sync client's ``submit()`` returns at once only for a
flowing model, and otherwise waits for its own send, so that ``QueueFull``,
``UnknownModel`` and ``Unavailable`` are raised at once exactly when they are likely.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from queueing import wire

F = TypeVar("F")
S = TypeVar("S")


@dataclass(slots=True)
class Outgoing(Generic[F]):
    """One request handed to the sender: its future, its encoded body, and when it was
    handed over (``time.monotonic()``: the sender shortens the deadline by the wait)."""

    model: str
    future: F
    body: bytes
    deadline_ms: int | None
    keep_s: int
    queued_at: float = field(default_factory=time.monotonic)

    def body_now(self, now: float) -> bytes:
        """The body to send at ``now``: its deadline less the time spent in the client."""
        if self.deadline_ms is None:
            return self.body
        waited_ms = round((now - self.queued_at) * 1000)
        if waited_ms <= 0:
            return self.body
        left = max(0, self.deadline_ms - waited_ms)
        return wire.with_deadline(self.body, self.deadline_ms, self.keep_s, left)


class Outbox(Generic[F, S]):
    """Requests waiting for the sender, in arrival order, and the signal (``S``: an
    ``Event`` or an asyncio ``Future``, made by ``new_signal``) that the batch they will
    leave in has been sent. Not thread-safe: the client guards it (the sync client with
    its condition's lock; the asyncio client runs on one loop)."""

    def __init__(self, new_signal: Any) -> None:
        self._new_signal = new_signal
        self._items: list[Outgoing[F]] = []
        self._signal: S | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Outgoing[F]) -> S:
        """Add ``item``; returns the signal of the batch it will leave in."""
        self._items.append(item)
        if self._signal is None:
            self._signal = self._new_signal()
        return self._signal

    def take(self) -> tuple[list[Outgoing[F]], S | None]:
        """Everything waiting, and its batch's signal; the outbox is empty after."""
        items, signal = self._items, self._signal
        self._items, self._signal = [], None
        return items, signal


def by_model(items: Sequence[Outgoing[F]]) -> dict[str, list[Outgoing[F]]]:
    """``items`` grouped by model, each group in arrival order: one round trip each."""
    groups: dict[str, list[Outgoing[F]]] = {}
    for item in items:
        groups.setdefault(item.model, []).append(item)
    return groups
