"""Pool metrics: what a worker counts, where it counts it, and the figures derived from it.

Where: each slot of the supervisor owns one block of shared memory (a ``RawArray`` of
doubles, made once per slot and handed to every process that fills the slot); in a pool
that serves a model repository, also one block per model of the repository. The worker
adds to it in place; the supervisor reads it when ``/metrics`` is scraped. Because the
block outlives the process, what a worker counted before it crashed stays counted, and
its successor goes on adding to the same cells: the pool's counters never go backwards,
without any handover. (prometheus_client's multiprocess mode would give the same with one
mmap file per process, but costs a file per restart, a lock per value written, and
prometheus_client in every worker.)

What: outcomes and latencies of answered requests (counted once the answer is stored in
Redis, so a request delivered twice after a crash is counted once), and rows, batch sizes,
queue waits and model time of the batches run. Counts are kept per bucket, not
cumulatively: one addition per observation.

Derived: each heartbeat carries the changes of the last minute (``Window``), from which
``tfpool status`` computes rates and quantiles the way PromQL's ``rate`` and
``histogram_quantile`` do on the scraped buckets, so that the CLI and the dashboard agree.

This module does no I/O and imports neither Redis nor TensorFlow.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from queueing.errors import (
    DeadLettered,
    DeadlineExceeded,
    InvalidInput,
    RequestError,
)
from workers.batcher import default_buckets
from workers.config import PoolConfig

#: What became of an answered request (the ``outcome`` label of ``tfpool_requests_total``).
OUTCOMES = ("ok", "invalid_input", "deadline_exceeded", "model_error", "dead_lettered")

#: Upper bounds (seconds) of the latency histograms: half a millisecond to a minute.
SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
)  # fmt: skip

#: The histograms, in the order of their cells. ``batch_rows`` takes the pool's batch
#: sizes as its bounds (the sizes batches are padded to), the others ``SECONDS_BUCKETS``.
HISTOGRAMS = ("batch_rows", "queue_wait_seconds", "compute_seconds", "request_seconds")

#: How far back the heartbeat's window reaches (PromQL's ``[1m]``).
WINDOW_S = 60.0


class Cells(Protocol):
    """Shared memory as the recorder sees it: a fixed-length array of floats."""

    def __getitem__(self, index: int) -> float: ...
    def __setitem__(self, index: int, value: float) -> None: ...
    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Layout:
    """Where each figure lives in a slot's cells: the request counters by outcome, rows,
    batches, GPU memory (a gauge), then each histogram's buckets (the last one +Inf) and
    its sum."""

    batch_buckets: tuple[float, ...]

    @classmethod
    def for_config(cls, config: PoolConfig) -> Layout:
        """The layout of a pool's slots: its batch sizes are the batch histogram's bounds.
        Supervisor and workers both build it from the config, so they agree."""
        sizes = sorted(set(config.buckets)) or default_buckets(config.max_batch_size)
        return cls(tuple(float(size) for size in sizes))

    def bounds(self, histogram: str) -> tuple[float, ...]:
        return self.batch_buckets if histogram == "batch_rows" else SECONDS_BUCKETS

    @property
    def rows(self) -> int:
        return len(OUTCOMES)

    @property
    def batches(self) -> int:
        return len(OUTCOMES) + 1

    @property
    def gpu_memory(self) -> int:
        return len(OUTCOMES) + 2

    def histogram(self, name: str) -> int:
        """Index of the first bucket of histogram ``name``; its sum follows its buckets."""
        start = len(OUTCOMES) + 3
        for other in HISTOGRAMS:
            if other == name:
                return start
            start += len(self.bounds(other)) + 2
        raise KeyError(name)

    @property
    def size(self) -> int:
        last = HISTOGRAMS[-1]
        return self.histogram(last) + len(self.bounds(last)) + 2


@dataclass(frozen=True)
class Histogram:
    """One histogram's figures: count per bucket (not cumulative; the last is +Inf)."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]
    sum: float

    @property
    def count(self) -> float:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as Prometheus exposes them, ``+Inf`` last."""
        pairs, total = [], 0.0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            pairs.append(("+Inf" if bound == float("inf") else _le(bound), total))
        return pairs

    def quantile(self, q: float) -> float | None:
        """The q-quantile, interpolated within its bucket as ``histogram_quantile`` does
        (None without observations; the highest finite bound if it falls past it)."""
        total = self.count
        if total <= 0:
            return None
        rank, seen, lower = q * total, 0.0, 0.0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            if count and seen + count >= rank:
                return lower + (bound - lower) * (rank - seen) / count
            seen += count
            lower = bound
        return self.bounds[-1]

    def minus(self, earlier: Histogram) -> Histogram:
        return Histogram(
            self.bounds,
            tuple(a - b for a, b in zip(self.counts, earlier.counts, strict=True)),
            self.sum - earlier.sum,
        )

    def plus(self, other: Histogram) -> Histogram:
        return Histogram(
            self.bounds,
            tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
            self.sum + other.sum,
        )


@dataclass(frozen=True)
class Snapshot:
    """A copy of one slot's cells (or the sum of several), read as named figures."""

    layout: Layout
    values: tuple[float, ...]

    @classmethod
    def read(cls, layout: Layout, cells: Cells) -> Snapshot:
        return cls(layout, tuple(cells[i] for i in range(layout.size)))

    @classmethod
    def total(cls, layout: Layout, snapshots: Iterable[Snapshot]) -> Snapshot:
        """The pool's figures: the sum of its slots'."""
        values = [0.0] * layout.size
        for s in snapshots:
            for i, v in enumerate(s.values):
                values[i] += v
        return cls(layout, tuple(values))

    def requests(self, outcome: str) -> float:
        return self.values[OUTCOMES.index(outcome)]

    @property
    def rows(self) -> float:
        return self.values[self.layout.rows]

    @property
    def batches(self) -> float:
        return self.values[self.layout.batches]

    @property
    def gpu_memory_bytes(self) -> float:
        return self.values[self.layout.gpu_memory]

    def histogram(self, name: str) -> Histogram:
        start, bounds = self.layout.histogram(name), self.layout.bounds(name)
        end = start + len(bounds) + 1
        return Histogram(bounds, self.values[start:end], self.values[end])


class Recorder:
    """A worker's side: adds its observations to its slot's cells.

    Threads: ``batch_done`` is called by the main thread (or, for the slot's recorder of a
    process serving several models, by each model's main thread: :class:`LaneRecorder`),
    ``answered`` by the writer and (for the rare answers it posts itself) the main thread.
    Both hold the lock, so no addition is lost between threads (once per batch and per
    round of answers: its cost is nothing beside theirs). ``gpu_memory`` is set by the
    heartbeat thread. A disabled recorder does nothing.
    """

    def __init__(self, layout: Layout, cells: Cells, *, enabled: bool = True) -> None:
        self.layout = layout
        self.cells = cells
        self.enabled = enabled
        self._lock = threading.Lock()
        self._rows, self._batches = layout.rows, layout.batches
        self._batch_rows = layout.histogram("batch_rows")
        self._queue_wait = layout.histogram("queue_wait_seconds")
        self._compute = layout.histogram("compute_seconds")
        self._request = layout.histogram("request_seconds")
        self._batch_bounds = layout.batch_buckets

    def batch_done(self, rows: int, compute_s: float, queue_waits: Sequence[float]) -> None:
        """A batch of ``rows`` rows ran in ``compute_s``; ``queue_waits``: how long each
        request that started in it had waited, from its arrival to the batch's start."""
        if not self.enabled:
            return
        cells = self.cells
        with self._lock:
            cells[self._rows] += rows
            cells[self._batches] += 1
            _observe(cells, self._batch_rows, self._batch_bounds, rows)
            _observe(cells, self._compute, SECONDS_BUCKETS, compute_s)
            for wait in queue_waits:
                _observe(cells, self._queue_wait, SECONDS_BUCKETS, wait)

    def answered(self, outcomes: Iterable[tuple[str, float]]) -> None:
        """Answers stored in Redis: ``(outcome, seconds from arrival to now)`` each."""
        if not self.enabled:
            return
        cells = self.cells
        with self._lock:
            for outcome, seconds in outcomes:
                cells[_OUTCOME_INDEX[outcome]] += 1
                _observe(cells, self._request, SECONDS_BUCKETS, seconds)

    def gpu_memory(self, used_bytes: float) -> None:
        self.cells[self.layout.gpu_memory] = used_bytes


class LaneRecorder(Recorder):
    """The recorder of one model of several served by one process (``model_repo``: one
    lane per model, see :func:`workers.process.run_models`). It counts in its model's own
    ``cells``: the block of shared memory the supervisor made for this model in this slot,
    which ``/metrics`` reads under the model's name (a private array when there is none:
    a model folder that appeared after the supervisor started). Its heartbeat's window
    reads them too, so that ``tfpool status`` shows each model's own figures. It also adds
    everything to ``slot``, the recorder of the slot's shared memory that every lane of the
    process shares (and whose GPU memory gauge the endpoint reports per slot). The layouts
    may differ (a model's table may set its own batch sizes)."""

    def __init__(self, layout: Layout, *, slot: Recorder, cells: Cells | None = None) -> None:
        super().__init__(layout, [0.0] * layout.size if cells is None else cells,
                         enabled=slot.enabled)  # fmt: skip
        self.slot = slot

    def batch_done(self, rows: int, compute_s: float, queue_waits: Sequence[float]) -> None:
        super().batch_done(rows, compute_s, queue_waits)
        self.slot.batch_done(rows, compute_s, queue_waits)

    def answered(self, outcomes: Iterable[tuple[str, float]]) -> None:
        outcomes = list(outcomes)  # read twice
        super().answered(outcomes)
        self.slot.answered(outcomes)

    def gpu_memory(self, used_bytes: float) -> None:
        super().gpu_memory(used_bytes)
        self.slot.gpu_memory(used_bytes)


def _observe(cells: Cells, start: int, bounds: Sequence[float], value: float) -> None:
    # bisect_left: a value equal to a bound belongs to that bound's bucket (le is <=).
    cells[start + bisect.bisect_left(bounds, value)] += 1
    cells[start + len(bounds) + 1] += value


_OUTCOME_INDEX = {outcome: i for i, outcome in enumerate(OUTCOMES)}


def outcome(error: RequestError | None, *, dead: bool = False) -> str:
    """The outcome label of an answer carrying ``error`` (None: a result); ``dead``: it
    goes to the dead-letter stream (even one with no readable id, hence no error sent)."""
    if dead or isinstance(error, DeadLettered):
        return "dead_lettered"
    if error is None:
        return "ok"
    if isinstance(error, DeadlineExceeded):
        return "deadline_exceeded"
    if isinstance(error, InvalidInput):
        return "invalid_input"
    return "model_error"


def _le(bound: float) -> str:
    return repr(float(bound))


# --- the last minute, for heartbeats and `tfpool status` --------------------------------


class Window:
    """Snapshots of one slot over the last ``WINDOW_S`` seconds; ``figures`` gives the
    change across them, as a JSON-able dict for the worker's heartbeat (sent by the
    heartbeat thread, and by the main thread at start and stop: hence the lock)."""

    def __init__(self, span_s: float = WINDOW_S) -> None:
        self.span_s = span_s
        self._taken: deque[tuple[float, Snapshot]] = deque()
        self._lock = threading.Lock()

    def figures(self, snapshot: Snapshot, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._taken.append((now, snapshot))
            # Keep the newest snapshot at least span_s old as the window's start.
            while len(self._taken) > 2 and now - self._taken[1][0] >= self.span_s:
                self._taken.popleft()
            started, first = self._taken[0]
        return window_figures(first, snapshot, now - started)


def window_figures(first: Snapshot, last: Snapshot, seconds: float) -> dict[str, Any]:
    """What changed from ``first`` to ``last``, ``seconds`` apart."""
    return {
        "seconds": round(seconds, 3),
        "requests": {o: last.requests(o) - first.requests(o) for o in OUTCOMES},
        "rows": last.rows - first.rows,
        "batches": last.batches - first.batches,
        **{
            name: list(last.histogram(name).minus(first.histogram(name)).counts)
            for name in ("queue_wait_seconds", "request_seconds", "compute_seconds")
        },
    }


@dataclass(frozen=True)
class Rates:
    """Figures over the last minute, summed over workers, as the CLI shows them."""

    requests_per_s: float
    by_outcome: Mapping[str, float]
    rows_per_s: float
    mean_batch: float | None
    queue_wait: Histogram
    request: Histogram
    compute: Histogram

    @classmethod
    def of(cls, windows: Iterable[Mapping[str, Any]]) -> Rates:
        """The sum of several workers' ``window_figures``: rates add up, buckets too."""
        empty = Histogram(SECONDS_BUCKETS, (0.0,) * (len(SECONDS_BUCKETS) + 1), 0.0)
        by_outcome = dict.fromkeys(OUTCOMES, 0.0)
        rows_per_s = rows = batches = 0.0
        hists = {name: empty for name in ("queue_wait_seconds", "request_seconds",
                                          "compute_seconds")}  # fmt: skip
        for w in windows:
            seconds = float(w.get("seconds", 0))
            if seconds <= 0:
                continue
            for o in OUTCOMES:
                by_outcome[o] += float(w["requests"].get(o, 0)) / seconds
            rows_per_s += float(w["rows"]) / seconds
            rows, batches = rows + float(w["rows"]), batches + float(w["batches"])
            for name in hists:
                counts = tuple(float(c) for c in w[name])
                hists[name] = hists[name].plus(Histogram(SECONDS_BUCKETS, counts, 0.0))
        return cls(
            requests_per_s=sum(by_outcome.values()),
            by_outcome=by_outcome,
            rows_per_s=rows_per_s,
            mean_batch=rows / batches if batches else None,
            queue_wait=hists["queue_wait_seconds"],
            request=hists["request_seconds"],
            compute=hists["compute_seconds"],
        )


def drain_seconds(backlog: int, requests_per_s: float) -> float:
    """How long the backlog takes at the measured rate: the autoscaling signal. Infinite
    when there is a backlog and nothing is being answered (no worker serves: scale up)."""
    if backlog <= 0:
        return 0.0
    if requests_per_s <= 0:
        return float("inf")
    return backlog / requests_per_s
