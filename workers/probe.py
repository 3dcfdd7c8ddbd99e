"""The bare model, measured in fresh processes placed as workers are: what ``workers =
"auto"`` chooses a layout by at start, and what ``tfpool bench`` compares the pool with.

Each process sets its device, memory and thread settings as a worker does, loads the
model as a worker does (preload modules, signature, checkpoint...), warms every bucket,
then runs tight ``model(batch)`` loops. The processes of one layout run at once (each
bucket started together, behind a barrier), since that is how its workers would share
the cores; one layout at a time, so that layouts do not share them, in turns (1x2, 2x1,
1x2, 2x1): each layout's best turn counts, so that a moment of other work on the machine
slows one turn of one layout, not the choice.

Loading (mostly importing TensorFlow) costs more than measuring, so the processes of
several layouts load together, as many as the machine has cores (at least 3: both
layouts of 2 cores), then wait, idle, for their layout's turn. Never imports TensorFlow
itself: the supervisor calls it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.batcher import default_buckets
from workers.config import AUTO, PoolConfig
from workers.errors import WorkerError, first_line
from workers.layouts import (
    LayoutFigures,
    WorkerLayout,
    candidate_layouts,
    choose_layout,
)
from workers.placement import Slot, cpu_count

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")

#: Seconds of measuring per layout at start, shared by its batch sizes and turns (each
#: gets at least ``MIN_CALLS`` calls, so a slow model takes longer).
PROBE_SECONDS = 1.0
#: Turns each layout takes, alternating with the other layouts; its figure at a batch size
#: is its best turn's. Something else running on the machine (or waking from the wait)
#: only ever slows a turn down, so that a brief disturbance does not decide the choice.
TURNS = 2
#: Timed calls per batch size and turn, at least (a call that long is a fair sample).
MIN_CALLS = 1
#: One-row calls timed for the one-row figure (when asked for).
ONE_ROW_CALLS = 200
#: Longest the whole measurement may take before it is given up.
TIMEOUT_S = 600.0


class ProbeError(WorkerError):
    """The layouts could not be measured (the model did not load, a process died...)."""


@dataclass(frozen=True)
class Choice:
    """What ``workers = "auto"`` decided, and the figures it decided by."""

    layout: WorkerLayout
    figures: list[LayoutFigures]


def why_not_measure(config: PoolConfig, slots: Sequence[Slot], cores: int) -> str | None:
    """Why the layout of ``config``'s pool, placed in ``slots`` by default, is not measured
    at start: None when it is; "" when the question does not arise (a number of workers
    given, or GPUs), since only ``workers = "auto"`` on the CPU measures."""
    if config.workers != AUTO or any(s.device is not None for s in slots):
        return ""
    if config.model_repo:
        return "a model repository's models differ: the CPU default is kept, not measured"
    if config.intra_op_threads:
        return (
            f"intra_op_threads is set: {len(slots)} worker(s) of {config.intra_op_threads}"
            " thread(s), not measured"
        )
    if cores < 2:
        return "one core: one worker, nothing to compare"
    return None


def choose(
    config: PoolConfig, *, cores: int | None = None, stop: threading.Event | None = None
) -> Choice:
    """Measure the candidate layouts of this machine on ``config``'s model, at its
    buckets, and keep the fastest. Logs a line per layout and one saying what was chosen
    and why. Raises ProbeError (also when ``stop`` is set meanwhile)."""
    cores = cores or cpu_count()
    layouts = candidate_layouts(cores)
    buckets = config.buckets or default_buckets(config.max_batch_size)
    started = time.monotonic()
    log.info(
        "workers = auto: measuring layouts %s of %d cores on batch sizes %s",
        ", ".join(str(layout) for layout in layouts), cores, buckets,
    )  # fmt: skip
    figures = measure_layouts(
        config, layouts, buckets, seconds=PROBE_SECONDS / len(buckets), cores=cores, stop=stop
    )
    for f in figures:
        log.info("%s", f.describe())
    best, why = choose_layout(figures)
    log.info("workers = auto: chose %s in %.1fs: %s", best.layout, time.monotonic() - started, why)
    return Choice(best.layout, figures)


def measure_layouts(
    config: PoolConfig,
    layouts: Sequence[WorkerLayout],
    buckets: Sequence[int],
    *,
    seconds: float,
    one_row: bool = False,
    cores: int | None = None,
    timeout: float = TIMEOUT_S,
    stop: threading.Event | None = None,
) -> list[LayoutFigures]:
    """Each layout's bare rows/s at every bucket (``seconds`` of calls each, spread over
    ``TURNS`` turns, at least ``MIN_CALLS`` a turn; the best turn counts), and with
    ``one_row`` the median one-row call (in the last turn). The buckets are those
    the model allows: its signature's fixed batch, or 1 with batching off. Raises
    ProbeError naming what failed (the model's own load error, first line), or when
    ``stop`` is set."""
    cores = cores or cpu_count()
    inter = config.inter_op_threads or 1
    give_up = time.monotonic() + timeout
    figures: list[LayoutFigures] = []
    for group in _groups(layouts, max(3, cores)):
        with _Group(config, group, list(buckets), inter, seconds / TURNS, one_row, stop) as running:
            started = time.monotonic()
            running.wait_loaded(give_up)
            log.debug("layouts %s loaded the model in %.1fs",
                      ", ".join(map(str, group)), time.monotonic() - started)  # fmt: skip
            best: list[dict[int, float]] = [{} for _ in group]
            one_row_ms = [0.0 for _ in group]
            for turn in range(TURNS):
                for index in range(len(group)):
                    rows_per_s, one_row_ms[index] = running.measure(index, turn, give_up)
                    for rows, rate in rows_per_s.items():
                        best[index][rows] = max(rate, best[index].get(rows, 0.0))
            figures += [LayoutFigures(layout, best[i], one_row_ms[i])
                        for i, layout in enumerate(group)]  # fmt: skip
    return figures


def _groups(layouts: Sequence[WorkerLayout], budget: int) -> Iterator[list[WorkerLayout]]:
    """``layouts`` in order, in groups loaded together: at most ``budget`` processes a
    group (a larger layout alone)."""
    group: list[WorkerLayout] = []
    for layout in layouts:
        if group and sum(g.processes for g in group) + layout.processes > budget:
            yield group
            group = []
        group.append(layout)
    if group:
        yield group


class _Group:
    """The processes of some layouts: started together, measured one layout at a time.
    Leaving the block stops any still running."""

    def __init__(
        self,
        config: PoolConfig,
        layouts: list[WorkerLayout],
        buckets: list[int],
        inter_op_threads: int,
        seconds: float,
        one_row: bool,
        stop: threading.Event | None,
    ) -> None:
        self.layouts = layouts
        self.stop = stop
        self.out: Any = _SPAWN.Queue()
        #: Each layout's start signal for each turn.
        self.go = [[_SPAWN.Event() for _ in range(TURNS)] for _ in layouts]
        # Held here until the processes are done: a child rebuilds each from its name when
        # it starts, and Process.start() drops its own reference to its arguments.
        self.barriers = [_SPAWN.Barrier(layout.processes) for layout in layouts]
        self.children: list[tuple[int, multiprocessing.process.BaseProcess]] = []
        me = os.getpid()
        for index, layout in enumerate(layouts):
            for slot in layout.slots(inter_op_threads):
                args = (config, slot, buckets, seconds, one_row, self.go[index],
                        self.barriers[index], self.out, len(self.children), me)  # fmt: skip
                child = _SPAWN.Process(target=_measure, args=args, name="tfpool-probe", daemon=True)
                self.children.append((index, child))
        #: Each process's last report: its stage ("loaded", "turn N") and figures.
        self.reports: dict[int, tuple[str, Any]] = {}

    def __enter__(self) -> _Group:
        for _, child in self.children:
            child.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for _, child in self.children:
            if child.is_alive():
                child.kill()
            child.join()
        self.out.close()

    def wait_loaded(self, give_up: float) -> None:
        """Until every process has loaded and warmed the model."""
        self._wait(range(len(self.children)), "loaded", give_up)

    def measure(self, index: int, turn: int, give_up: float) -> tuple[dict[int, float], float]:
        """Layout ``index``'s ``turn``: its processes run at once. Their rows/s by batch
        size, summed, and their median one-row call time (0 if not measured)."""
        mine = [n for n, (i, _) in enumerate(self.children) if i == index]
        self.go[index][turn].set()
        self._wait(mine, f"turn {turn}", give_up)
        results = [self.reports[n][1] for n in mine]
        rows_per_s = {rows: sum(r["rows_per_s"][rows] for r in results)
                      for rows in results[0]["rows_per_s"]}  # fmt: skip
        return rows_per_s, statistics.median(r["one_row_ms"] for r in results)

    def _wait(self, children: Sequence[int], stage: str, give_up: float) -> None:
        """Collect reports until each of ``children`` has reached ``stage``; a failure
        report, a process that exits without one, or the deadline raise ProbeError."""
        dead: set[int] = set()  # found exited without a report, after a wait for one
        while not all(self.reports.get(n, ("",))[0] == stage for n in children):
            try:
                number, kind, payload = self.out.get(timeout=0.2)
            except queue.Empty:
                for n in children:
                    process = self.children[n][1]
                    if self.reports.get(n, ("",))[0] == stage or process.exitcode is None:
                        continue
                    if n in dead:  # a second empty wait: its report is not on its way
                        raise ProbeError(
                            f"a measuring process exited with code {process.exitcode}"
                        ) from None
                    dead.add(n)
                if time.monotonic() > give_up:
                    raise ProbeError("measuring the layouts took too long") from None
                if self.stop is not None and self.stop.is_set():
                    raise ProbeError("stopped") from None
                continue
            if kind == "failed":
                raise ProbeError(payload)
            self.reports[number] = (kind, payload)


def _measure(
    config: PoolConfig,
    slot: Slot,
    buckets: list[int],
    seconds: float,
    one_row: bool,
    turns: list[Any],
    barrier: Any,
    out: Any,
    number: int,
    parent: int,
) -> None:
    """One measuring process: placed and loaded as a worker, then the bare loop at each of
    its ``turns`` (an event each). It leaves on its own if its parent dies meanwhile."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a worker: the supervisor decides
    # As in workers.process.worker_main: before TensorFlow is imported.
    os.environ["CUDA_VISIBLE_DEVICES"] = slot.device if slot.device is not None else ""
    from workers.memory import keep_large_buffers
    from workers.quiet import native_stderr_silenced, quiet_tensorflow_logging

    debug = config.log_level.upper() == "DEBUG"
    quiet_tensorflow_logging(debug=debug)
    keep_large_buffers()
    try:
        with native_stderr_silenced(enabled=not debug):
            from workers.process import preload

            preload(config.preload)
            from workers.model import configure_tensorflow

            configure_tensorflow(
                intra_op_threads=slot.intra_op_threads or None,
                inter_op_threads=slot.inter_op_threads or None,
            )
        from workers.model import load_configured

        model = load_configured(config)
        if model.batch_limit is not None:  # as workers.runner.batcher_for
            buckets = [model.batch_limit]
        elif config.batching == "off":
            buckets = [1]
        model.warm_up(buckets, check_rows=False)
        rng = np.random.default_rng(number)
        batches = {rows: _batch(model, rows, rng) for rows in buckets}
    except Exception as e:
        out.put((number, "failed", f"{type(e).__name__}: {first_line(e)}"))
        return
    out.put((number, "loaded", None))
    for turn, go in enumerate(turns):
        while not go.wait(1.0):
            if os.getppid() != parent:
                return
        per_bucket = {}
        for rows in buckets:
            barrier.wait(TIMEOUT_S)  # the layout's processes measure the same size together
            calls, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds or calls < MIN_CALLS:
                model(batches[rows])
                calls += 1
            per_bucket[rows] = calls * rows / elapsed
        one_row_ms = 0.0
        if one_row and turn == len(turns) - 1:
            barrier.wait(TIMEOUT_S)
            one = _batch(model, 1, rng)
            times = []
            for _ in range(ONE_ROW_CALLS):
                started = time.perf_counter()
                model(one)
                times.append(time.perf_counter() - started)
            one_row_ms = statistics.median(times) * 1000
        figures = {"rows_per_s": per_bucket, "one_row_ms": one_row_ms}
        out.put((number, f"turn {turn}", figures))


def _batch(model: Any, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``rows`` rows for every input: random numbers for a float input (as data is),
    the model's own example (zeros, empty strings) for others."""
    arrays: dict[str, np.ndarray] = model.example(rows)
    for spec in model.inputs:
        if np.dtype(arrays[spec.name].dtype).kind == "f":
            shape = spec.example_shape(rows)
            arrays[spec.name] = rng.standard_normal(shape).astype(arrays[spec.name].dtype)
    return arrays
