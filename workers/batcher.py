"""Dynamic batching: which waiting requests run together, and when. No I/O, no TensorFlow.

A batch of one group (requests of one shape) closes when

* it is full (``max_rows`` rows), or
* its oldest request has waited ``max_latency_s`` since it *arrived* (its stream entry id,
  not the moment this worker read it), or
* the reader found the queue empty on its last read and the model is free: nobody else
  is coming soon, so a lone request runs now instead of sitting out the budget, or
* the worker is closing: nothing more is coming at all.

Requests are counted in rows. A request that does not fit in what is left of a batch is
split: its first rows fill this batch, the rest open the next one. Batches are padded up
to the smallest bucket that holds them, so the model only ever sees a few batch sizes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class Batchable(Protocol):
    """What the batcher needs to know of a request."""

    @property
    def rows(self) -> int: ...
    @property
    def group(self) -> Hashable: ...
    @property
    def arrival(self) -> float: ...
    @property
    def deadline(self) -> float | None: ...


T = TypeVar("T", bound=Batchable)


@dataclass(frozen=True, slots=True)
class Part(Generic[T]):
    """Rows ``start:stop`` of ``item``."""

    item: T
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True, slots=True)
class Batch(Generic[T]):
    """What runs through the model at once: parts of requests of one group, in order."""

    parts: list[Part[T]]
    rows: int
    padded_rows: int


@dataclass(slots=True)
class _Queue(Generic[T]):
    group: Hashable
    items: deque[T] = field(default_factory=deque)
    rows: int = 0
    head_taken: int = 0  # rows of items[0] already handed out in earlier batches


def default_buckets(max_rows: int) -> list[int]:
    """Powers of two below ``max_rows``, then ``max_rows``."""
    buckets, size = [], 1
    while size < max_rows:
        buckets.append(size)
        size *= 2
    buckets.append(max_rows)
    return buckets


class Batcher(Generic[T]):
    """Groups waiting requests into batches. Not thread-safe: its owner holds a lock."""

    def __init__(
        self,
        *,
        max_rows: int,
        max_latency_s: float,
        buckets: Sequence[int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if max_latency_s < 0:
            raise ValueError(f"max_latency_s must be >= 0, got {max_latency_s}")
        self.max_rows = max_rows
        self.max_latency_s = max_latency_s
        self.buckets = sorted(set(buckets)) if buckets else default_buckets(max_rows)
        if self.buckets[-1] < max_rows or self.buckets[0] < 1:
            raise ValueError(f"buckets {self.buckets} must be >= 1 and reach {max_rows}")
        self.clock = clock
        #: The reader's last read found the queue empty (set by the reader).
        self.queue_empty = False
        #: The reader has stopped for good: run what is here (set when draining).
        self.closing = False
        self._queues: dict[Hashable, _Queue[T]] = {}
        # No request can have expired before this time: pop_expired scans only after it.
        # (It may be stale-early once its request has been taken; a scan then corrects it.)
        self._earliest_deadline = float("inf")

    @property
    def rows_waiting(self) -> int:
        """Rows held, over every group (the remainders of split requests included)."""
        return sum(q.rows - q.head_taken for q in self._queues.values())

    def __len__(self) -> int:
        return sum(len(q.items) for q in self._queues.values())

    def add(self, item: T) -> None:
        """Take a request. Its ``rows`` must be >= 1."""
        queue = self._queues.get(item.group)
        if queue is None:
            queue = self._queues[item.group] = _Queue(item.group)
        queue.items.append(item)
        if item.deadline is not None and item.deadline < self._earliest_deadline:
            self._earliest_deadline = item.deadline
        queue.rows += item.rows

    def pop_expired(self) -> list[T]:
        """Remove and return requests whose deadline has passed and of which nothing ran."""
        now = self.clock()
        if now < self._earliest_deadline:
            return []  # the common case, on every turn of the worker's loop: nothing to scan
        self._earliest_deadline = float("inf")
        expired: list[T] = []
        for group, queue in list(self._queues.items()):
            keep: deque[T] = deque()
            for index, item in enumerate(queue.items):
                started = index == 0 and queue.head_taken > 0
                if item.deadline is not None and item.deadline <= now and not started:
                    expired.append(item)
                    queue.rows -= item.rows
                else:
                    keep.append(item)
                    if item.deadline is not None:
                        self._earliest_deadline = min(self._earliest_deadline, item.deadline)
            queue.items = keep
            if not keep:
                del self._queues[group]
        return expired

    def next_due(self) -> float | None:
        """Clock time at which the oldest group's budget runs out (None when empty)."""
        oldest = self._oldest_queue()
        return None if oldest is None else oldest.items[0].arrival + self.max_latency_s

    def next_batch(self) -> Batch[T] | None:
        """The batch to run now, or None if no group is due yet."""
        now = self.clock()
        due = [q for q in self._queues.values() if self._is_due(q, now)]
        if not due:
            return None
        queue = min(due, key=lambda q: q.items[0].arrival)
        return self._take(queue)

    def _is_due(self, queue: _Queue[T], now: float) -> bool:
        return (
            self.queue_empty
            or self.closing
            or queue.rows - queue.head_taken >= self.max_rows
            or now >= queue.items[0].arrival + self.max_latency_s
        )

    def _oldest_queue(self) -> _Queue[T] | None:
        if not self._queues:
            return None
        return min(self._queues.values(), key=lambda q: q.items[0].arrival)

    def _take(self, queue: _Queue[T]) -> Batch[T]:
        parts: list[Part[T]] = []
        room = self.max_rows
        while queue.items and room > 0:
            item = queue.items[0]
            start = queue.head_taken
            stop = min(item.rows, start + room)
            parts.append(Part(item, start, stop))
            room -= stop - start
            if stop == item.rows:
                queue.items.popleft()
                queue.rows -= item.rows
                queue.head_taken = 0
            else:
                queue.head_taken = stop
        if not queue.items:
            del self._queues[queue.group]
        rows = self.max_rows - room
        return Batch(parts=parts, rows=rows, padded_rows=self.bucket_for(rows))

    def bucket_for(self, rows: int) -> int:
        """The smallest bucket that holds ``rows``."""
        for bucket in self.buckets:
            if bucket >= rows:
                return bucket
        raise ValueError(f"{rows} rows is over the largest bucket {self.buckets[-1]}")
