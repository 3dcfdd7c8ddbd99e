"""The objects the worker's threads share, each with its guard. Who writes and who reads
each of them is set out in :mod:`workers.worker`'s docstring."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from workers.batcher import Batch, Batcher
from workers.messages import InHand


class StreamClock:
    """Redis's clock (the clock of stream entry ids) as seen from ``time.monotonic()``.

    ``offset`` is written by one thread (the heartbeat's clock sync) and read by the
    reader; a float attribute is replaced whole, so no lock is needed."""

    def __init__(self) -> None:
        self.offset = 0.0  # Redis time minus time.monotonic(), in seconds

    def set_redis_time(self, redis_s: float, before: float, after: float) -> None:
        """Redis said ``redis_s`` between our ``before`` and ``after`` (monotonic)."""
        self.offset = redis_s - (before + after) / 2

    def arrival(self, entry_id: bytes) -> float:
        """When the entry was added, on our monotonic clock (its id is Redis's ms time)."""
        return int(entry_id.split(b"-", 1)[0]) / 1000 - self.offset


class HeldEntries:
    """Stream entries read and not yet acked: the heartbeat renews our claim on them, so
    that no other worker takes them over while we are alive. Thread-safe."""

    def __init__(self) -> None:
        self._ids: set[bytes] = set()
        self._lock = threading.Lock()

    def add(self, entry_ids: Iterable[bytes]) -> None:
        with self._lock:
            self._ids.update(entry_ids)

    def discard(self, entry_ids: Iterable[bytes]) -> None:
        with self._lock:
            self._ids.difference_update(entry_ids)

    def snapshot(self) -> list[bytes]:
        with self._lock:
            return list(self._ids)


class BatchDesk:
    """The batcher, shared by the reader (which adds requests) and the main thread (which
    takes batches), under one condition that wakes either side when the other moved."""

    def __init__(self, batcher: Batcher[InHand], *, max_rows_held: int) -> None:
        self.batcher = batcher
        self._max_rows_held = max_rows_held
        self._cond = threading.Condition()

    def wait_for_room(self, timeout: float) -> bool:
        """True if the reader may read more now; else waits up to ``timeout``, False."""
        with self._cond:
            if self.batcher.rows_waiting < self._max_rows_held:
                return True
            self._cond.wait(timeout)
            return False

    def add(self, requests: list[InHand], *, queue_empty: bool | None) -> None:
        """Requests for the batcher. ``queue_empty``: what the read that brought them says
        of the queue (None: it says nothing, as for entries taken over)."""
        with self._cond:
            for request in requests:
                self.batcher.add(request)
            if queue_empty is not None:
                self.batcher.queue_empty = queue_empty
            self._cond.notify_all()

    def next_batch(
        self, *, closing: bool, max_wait: float
    ) -> tuple[Batch[InHand] | None, list[InHand]]:
        """The batch due now (or None after waiting up to ``max_wait`` for one) and the
        requests whose deadline passed. ``closing``: nothing more will be added."""
        with self._cond:
            expired = self.batcher.pop_expired()
            self.batcher.closing = closing
            batch = self.batcher.next_batch()
            if batch is None and not expired:
                due = self.batcher.next_due()
                timeout = (
                    max_wait if due is None else min(max_wait, max(0.0, due - time.monotonic()))
                )
                self._cond.wait(timeout)
            else:
                self._cond.notify_all()  # room for the reader
            return batch, expired

    def quiet(self) -> bool:
        """Nothing held, and the reader's last read found the queue empty: no batch will
        be due before the reader brings more."""
        with self._cond:
            return not self.batcher and self.batcher.queue_empty

    def is_empty(self) -> bool:
        with self._cond:
            return not self.batcher

    def wake(self) -> None:
        """Wake whoever waits (to see a stop)."""
        with self._cond:
            self._cond.notify_all()
