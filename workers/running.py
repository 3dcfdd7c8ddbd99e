"""Which requests a worker is running, kept where its supervisor can read them after the
worker died.

When a worker dies, its successor takes over every request it held. Only those of the
batch that was running can have killed it (a segfault in a kernel, an allocation that the
kernel's OOM killer answered); the others were waiting. The worker writes the entry ids of
each batch here before it runs it and clears them after: memory shared with the
supervisor, so it costs no Redis round trip on the model's path, and it survives the
worker's SIGKILL. The supervisor reads it once the worker is gone and hands the ids to the
successor, which runs only those alone (see :mod:`workers.claims`).

Nothing reads while the worker writes: the supervisor reads only after the process has
exited. The length is stored last, so a worker killed mid-write leaves "nothing running"
(the batch had not started).

A process serving several models (``model_repo``) runs one batch per model at once, on
each model's thread: :class:`RunningLanes` keeps the slot's record the union of them, so a
crash during two models' batches makes both batches suspect, and only them.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from collections.abc import Iterable
from multiprocessing.context import BaseContext
from typing import Any

#: Bytes per entry id allowed for (an id is at most 41 characters: two 64-bit numbers and
#: a dash; ids of today's clock are 15-20). More ids than fit: the batch is "unknown".
BYTES_PER_ID = 24

#: The length value that says "more than fit": every request taken over is a suspect.
UNKNOWN = 0xFFFFFFFF


class RunningBatch:
    """The entry ids of the batch one worker slot is running. Created by the supervisor
    (one per slot, kept across the slot's processes) and passed to each worker."""

    def __init__(self, context: BaseContext, *, max_requests: int) -> None:
        self.size = max(1024, max_requests * BYTES_PER_ID)
        self._data: Any = context.RawArray(ctypes.c_char, self.size)
        self._length: Any = context.RawValue(ctypes.c_uint32, 0)

    def start(self, entry_ids: Iterable[bytes], *, busy: bool = False) -> None:
        """The worker is about to run a batch of these entries. ``busy``: another batch
        already runs (see :class:`RunningLanes`), so a death mid-write must leave
        "unknown", not "nothing running"."""
        joined = b" ".join(entry_ids)
        self._length.value = UNKNOWN if busy else 0
        if len(joined) > self.size:
            self._length.value = UNKNOWN
            return
        self._data[: len(joined)] = joined
        self._length.value = len(joined)

    def clear(self) -> None:
        """The batch is done (or none is running)."""
        self._length.value = 0

    def read(self) -> set[bytes] | None:
        """The entries of the batch that was running (empty: none was), or None when they
        did not fit and are unknown."""
        length = int(self._length.value)
        if length == UNKNOWN:
            return None
        return set(bytes(self._data[:length]).split()) if length else set()


class RunningLanes:
    """One :class:`RunningBatch` shared by the lanes (one per model) of a process that
    serves several models: each lane's :meth:`lane` records its own batch, and the slot's
    record holds the union of the batches running. Lanes run their batches on their own
    threads (TensorFlow releases the GIL), so the union is rewritten under a lock at each
    start and end; entry ids of different models' streams may be equal, which at worst
    runs a request alone that did not need to."""

    def __init__(self, running: RunningBatch) -> None:
        self._running = running
        self._lock = threading.Lock()
        self._by_lane: dict[str, tuple[bytes, ...]] = {}

    def lane(self, name: str) -> LaneRunning:
        """The record that model ``name``'s worker writes, as it would a RunningBatch."""
        return LaneRunning(self, name)

    def _set(self, name: str, entry_ids: tuple[bytes, ...]) -> None:
        with self._lock:
            others = any(ids for lane, ids in self._by_lane.items() if lane != name)
            self._by_lane[name] = entry_ids
            running = list(itertools.chain.from_iterable(self._by_lane.values()))
            if running:
                self._running.start(running, busy=others)
            else:
                self._running.clear()


class LaneRunning:
    """One lane's view of :class:`RunningLanes`: ``start`` and ``clear`` as on a
    :class:`RunningBatch`."""

    def __init__(self, lanes: RunningLanes, name: str) -> None:
        self._lanes = lanes
        self._name = name

    def start(self, entry_ids: Iterable[bytes]) -> None:
        """This lane is about to run a batch of these entries."""
        self._lanes._set(self._name, tuple(entry_ids))

    def clear(self) -> None:
        """This lane's batch is done."""
        self._lanes._set(self._name, ())
