"""The floor of each way of calling: the scenario's own calls (a ``submit()`` loop,
``predict()`` from threads, ``await predict()`` from tasks, ``submit_many``) against a
stand-in served in the same process, with no Redis, no encoding and no model. One thread
(or task) takes everything waiting and answers it as a batch would (stack the rows, hand
each caller its own), with the same waiting primitives as the clients: a
``concurrent.futures.Future`` per ``submit()``, a :class:`queueing.waiter.CallWaiter` per
blocking ``predict()``, an asyncio future per task.

What it shows: how many requests per second the calls alone allow in one producer process,
and the CPU each costs. No pool can beat that from one process; and where the pool is
bound by the machine's cores, the CPU a way of calling adds over ``submit_many`` bounds
its rate against ``submit_many``'s (see :func:`ceiling`).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from queueing.waiter import CallWaiter

_SPAWN = multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class Floor:
    """What one way of calling reached against the in-process stand-in."""

    call: str
    concurrency: int
    requests_per_s: float
    cpu_us_per_request: float


class _Desk:
    """The stand-in: callers put (row, settle) pairs; one server thread answers them."""

    def __init__(self) -> None:
        self._waiting: list[tuple[np.ndarray, Callable[[Any], None]]] = []
        self._wake = threading.Condition()
        self.stopped = False

    def put(self, row: np.ndarray, settle: Callable[[Any], None]) -> None:
        with self._wake:
            self._waiting.append((row, settle))
            self._wake.notify()

    def serve(self) -> None:
        while not self.stopped:
            with self._wake:
                while not self._waiting and not self.stopped:
                    self._wake.wait(0.1)
                taken, self._waiting = self._waiting, []
            _answer(taken)


def _answer(taken: list[tuple[np.ndarray, Callable[[Any], None]]]) -> None:
    """Each caller gets its own row of one stacked batch."""
    if taken:
        batch = np.stack([row for row, _ in taken])
        for i, (_, settle) in enumerate(taken):
            settle(batch[i])


def measure(call: str, concurrency: int, seconds: float, row: np.ndarray) -> Floor:
    """The floor of ``call`` ("many", "submit", "threads" or "tasks"; see
    ``workers.bench.scenarios.Scenario.call``) at ``concurrency`` in flight, measured in
    this process for ``seconds``."""
    if call == "tasks":
        count, elapsed, cpu = asyncio.run(_tasks(concurrency, seconds, row))
    else:
        desk = _Desk()
        server = threading.Thread(target=desk.serve, daemon=True)
        server.start()
        loop = {"many": _many, "submit": _submit, "threads": _threads}[call]
        started, cpu_started = time.perf_counter(), time.process_time()
        count = loop(desk, concurrency, started + seconds, row)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        desk.stopped = True
        server.join()
    return Floor(call, concurrency, count / elapsed, cpu / max(count, 1) * 1e6)


def measure_in_process(call: str, concurrency: int, seconds: float, row: np.ndarray) -> Floor:
    """:func:`measure` in a fresh process, as a producer of the benchmark runs."""
    with _SPAWN.Pool(1) as pool:
        floor: Floor = pool.apply(measure, (call, concurrency, seconds, row))
    return floor


def ceiling(many_cpu_us: float, many_floor: Floor, floor: Floor) -> float:
    """The most a way of calling can reach of ``submit_many``'s rate when both are bound by
    the same cores: ``submit_many`` spends ``many_cpu_us`` per request over every process;
    the other way spends that plus what its calls cost over ``submit_many``'s calls."""
    extra = max(0.0, floor.cpu_us_per_request - many_floor.cpu_us_per_request)
    return many_cpu_us / (many_cpu_us + extra)


def _many(desk: _Desk, concurrency: int, end: float, row: np.ndarray) -> int:
    """``submit_many`` of every free slot (one future per request, put as one group)."""
    slots = threading.Semaphore(concurrency)
    count = 0
    while time.perf_counter() < end:
        slots.acquire()
        free = 1
        while free < concurrency and slots.acquire(blocking=False):
            free += 1
        futures: list[Future[Any]] = [Future() for _ in range(free)]
        for future in futures:
            future.add_done_callback(lambda _: slots.release())
            desk.put(row, future.set_result)
        count += free
    return count


def _submit(desk: _Desk, concurrency: int, end: float, row: np.ndarray) -> int:
    """A ``submit()`` per request, ``concurrency`` in flight."""
    slots = threading.Semaphore(concurrency)
    count = 0
    while time.perf_counter() < end:
        slots.acquire()
        future: Future[Any] = Future()
        future.add_done_callback(lambda _: slots.release())
        desk.put(row, future.set_result)
        count += 1
    return count


def _threads(desk: _Desk, concurrency: int, end: float, row: np.ndarray) -> int:
    """``concurrency`` threads, each calling a blocking ``predict()``."""
    counts = [0] * concurrency

    def loop(k: int) -> None:
        while time.perf_counter() < end:
            waiter = CallWaiter("r", "m")
            desk.put(row, waiter.set_result)
            waiter.result(timeout=60)
            counts[k] += 1

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


async def _tasks(concurrency: int, seconds: float, row: np.ndarray) -> tuple[int, float, float]:
    """``concurrency`` asyncio tasks, each awaiting ``predict()``; served by one task."""
    loop = asyncio.get_running_loop()
    waiting: list[tuple[np.ndarray, Callable[[Any], None]]] = []
    wake = asyncio.Event()
    started, cpu_started = time.perf_counter(), time.process_time()
    end = started + seconds
    counts = [0]

    async def serve() -> None:
        while True:
            await wake.wait()
            wake.clear()
            taken = waiting[:]
            waiting.clear()
            _answer(taken)

    async def call() -> None:
        while time.perf_counter() < end:
            future = loop.create_future()
            waiting.append((row, future.set_result))
            wake.set()
            await future
            counts[0] += 1

    server = asyncio.create_task(serve())
    await asyncio.gather(*(call() for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    server.cancel()
    return counts[0], elapsed, cpu
