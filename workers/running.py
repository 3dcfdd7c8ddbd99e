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
"""

from __future__ import annotations

import ctypes
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

    def start(self, entry_ids: Iterable[bytes]) -> None:
        """The worker is about to run a batch of these entries."""
        joined = b" ".join(entry_ids)
        self._length.value = 0
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
