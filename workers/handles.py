"""A worker slot as the supervisor sees it: the slot, the process filling it now, and what
a successor inherits (the consumers to take over, the batch that was running when one
died, the slot's metrics and its models'); what the restart backoff has reached."""

from __future__ import annotations

import multiprocessing
import signal
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from multiprocessing.sharedctypes import Synchronized

import psutil

from workers.metrics import Cells
from workers.placement import Slot
from workers.running import RunningBatch

SPAWN = multiprocessing.get_context("spawn")

#: Restart backoff: first delay, cap, and the uptime after which a worker counts as healthy.
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0


@dataclass
class WorkerHandle:
    """A slot and the process currently filling it."""

    slot: Slot
    #: The slot's counters in shared memory (workers.metrics): made once, kept by every
    #: process that fills the slot, so that a crash loses none of them.
    metrics: Cells
    #: A repository pool's: each model's counters in this slot, made and kept the same way
    #: (the models found at start; empty for a pool of one model).
    model_metrics: dict[str, Cells] = field(default_factory=dict)
    process: SpawnProcess | None = None
    worker_id: str = ""  # the live process's consumer name
    predecessors: list[str] = field(default_factory=list)  # dead consumers to take over
    # The entries of the batches that were running when they died (None: not known): the
    # only requests their successor runs alone (see workers.running).
    suspects: set[bytes] | None = field(default_factory=set)
    running: RunningBatch | None = None  # where the current process writes its batch
    # Set to 1 by the worker once it serves. A flag in shared memory, polled: a
    # multiprocessing.Event would hang its setter if a waiter were killed, and workers
    # are killed here on purpose.
    ready: Synchronized[int] = field(default_factory=lambda: new_flag())
    started_at: float = 0.0
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None
    ever_ready: bool = False
    recycling: bool = False
    restarts: int = 0  # processes started after the first

    @property
    def is_ready(self) -> bool:
        """The current process has loaded, warmed up and started serving."""
        return bool(self.ready.value)

    @property
    def is_up(self) -> bool:
        """The current process is alive."""
        return self.process is not None and self.process.is_alive()

    def terminate(self) -> None:
        """Ask the worker to drain: SIGTERM (its handler finishes what it holds, then
        exits)."""
        if self.process is not None and self.process.is_alive():
            self.process.terminate()

    def reap(self) -> tuple[int | None, int]:
        """The process has exited: join it, leave what it held and what it was running to
        its successor. Returns its exit code and pid."""
        assert self.process is not None
        code, pid = self.process.exitcode, self.process.pid or 0
        self.process.join()
        self.process = None
        # Whatever it held and did not ack, its successor takes over at start.
        self.predecessors.append(self.worker_id)
        if self.running is not None:
            ran = self.running.read()
            self.running.clear()
            self.suspects = None if ran is None or self.suspects is None else (self.suspects | ran)
        return code, pid

    def rss(self) -> int | None:
        """The resident memory of a worker that has loaded (None: not up, still loading,
        or gone): one still loading is small and growing."""
        if self.process is None or self.process.pid is None or not self.is_ready:
            return None
        try:
            return int(psutil.Process(self.process.pid).memory_info().rss)
        except psutil.Error:
            return None


def new_flag() -> Synchronized[int]:
    flag: Synchronized[int] = SPAWN.Value("b", 0, lock=False)
    return flag


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"
