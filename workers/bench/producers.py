"""A producer process of the benchmark: a closed or open loop of client calls, the calls
users write (a ``submit()`` loop, ``predict()`` from threads, ``await predict()`` from
asyncio tasks, TF Serving gRPC calls to a gateway, :mod:`.gateway`) and the bench's own
``submit_many`` of every free slot, with latencies and CPU time counted inside the
measured window only."""

from __future__ import annotations

import asyncio
import gc
import resource
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from queueing import AsyncClient, Client, RequestError
from workers.bench.gateway import grpc_closed_loop
from workers.memory import keep_large_buffers


@dataclass(frozen=True)
class ProducerJob:
    """What one producer process does, and when its window opens and closes."""

    redis_url: str
    model: str
    shape: tuple[int, ...]
    rows: int
    load: str
    call: str  # closed loop: "many", "submit", "threads" or "tasks" (see Scenario.call)
    concurrency: int
    rate: float
    start_at: float  # time.time() at which measuring starts
    stop_at: float
    seed: int
    #: A gateway's gRPC address: send TF Serving ``Predict`` calls there, not Client calls.
    gateway: str = ""
    input_name: str = "x"  # the model input the gRPC calls name


def run_producer(job: ProducerJob) -> dict[str, Any]:
    """One producer process: returns its latencies (s) inside the window, its request
    count and errors there, and its CPU seconds over the window."""
    shape = (job.rows, *job.shape) if job.rows > 1 else job.shape
    x = np.random.default_rng(job.seed).standard_normal(shape).astype(np.float32)
    latencies: list[float] = []
    errors = [0]
    cpu: dict[str, float] = {}

    def sample_cpu() -> None:
        time.sleep(max(0.0, job.start_at - time.time()))
        cpu["start"] = _cpu_seconds()
        time.sleep(max(0.0, job.stop_at - time.time()))
        cpu["stop"] = _cpu_seconds()

    sampler = threading.Thread(target=sample_cpu, daemon=True)
    sampler.start()
    # Window bounds on the perf_counter clock (what latencies are measured on).
    offset = time.perf_counter() - time.time()
    window = (job.start_at + offset, job.stop_at + offset)

    def record(sent_at: float) -> Callable[[Future[Any]], None]:
        def done(future: Future[Any]) -> None:
            now = time.perf_counter()
            if future.exception() is not None:
                errors[0] += sent_at >= window[0] and now <= window[1]
            elif sent_at >= window[0] and now <= window[1]:
                latencies.append(now - sent_at)

        return done

    keep_large_buffers()  # as the workers do: large requests are allocated per send
    gc.freeze()  # what exists now lives to the end: keep it out of every collection
    if job.gateway:
        grpc_closed_loop(job.gateway, job.model, job.input_name, x,
                         concurrency=job.concurrency, record=record, end=window[1])  # fmt: skip
        sampler.join()
    elif job.load == "closed" and job.call == "tasks":
        asyncio.run(_tasks(job, x, latencies, errors, window))
        sampler.join()
    else:
        with Client(job.redis_url) as client:
            if job.load == "open":
                _open_loop(client, job, x, record, window[1])
            elif job.call == "many":
                _closed_loop(client, job, x, record, window[1])
            elif job.call == "submit":
                _submit_loop(client, job, x, record, window[1])
            else:
                _threads(client, job, x, latencies, errors, window)
            sampler.join()
    return {
        "latencies": latencies,
        "errors": errors[0],
        "cpu": cpu.get("stop", 0.0) - cpu.get("start", 0.0),
    }


def _closed_loop(
    client: Client,
    job: ProducerJob,
    x: np.ndarray,
    record: Callable[[float], Callable[[Future[Any]], None]],
    end: float,
) -> None:
    slots = threading.Semaphore(job.concurrency)
    while time.perf_counter() < end:
        slots.acquire()
        free = 1
        while free < job.concurrency and slots.acquire(blocking=False):
            free += 1
        sent_at = time.perf_counter()
        for future in client.submit_many(job.model, [x] * free):
            future.add_done_callback(record(sent_at))
            future.add_done_callback(lambda _: slots.release())
    for _ in range(job.concurrency):  # let what is in flight come back
        slots.acquire(timeout=60)


def _submit_loop(
    client: Client,
    job: ProducerJob,
    x: np.ndarray,
    record: Callable[[float], Callable[[Future[Any]], None]],
    end: float,
) -> None:
    """What a job loop writes: one ``submit()`` per request, ``concurrency`` in flight."""
    slots = threading.Semaphore(job.concurrency)
    while time.perf_counter() < end:
        slots.acquire()
        sent_at = time.perf_counter()
        future = client.submit(job.model, x)
        future.add_done_callback(record(sent_at))
        future.add_done_callback(lambda _: slots.release())
    for _ in range(job.concurrency):  # let what is in flight come back
        slots.acquire(timeout=60)


def _threads(
    client: Client,
    job: ProducerJob,
    x: np.ndarray,
    latencies: list[float],
    errors: list[int],
    window: tuple[float, float],
) -> None:
    """What a threaded service writes: ``concurrency`` threads, each calling ``predict()``."""

    def loop() -> None:
        while (sent_at := time.perf_counter()) < window[1]:
            try:
                client.predict(job.model, x, timeout=60)
                ok = True
            except RequestError:
                ok = False
            now = time.perf_counter()
            if sent_at >= window[0] and now <= window[1]:
                if ok:
                    latencies.append(now - sent_at)  # list.append is atomic under the GIL
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=loop) for _ in range(job.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


async def _tasks(
    job: ProducerJob,
    x: np.ndarray,
    latencies: list[float],
    errors: list[int],
    window: tuple[float, float],
) -> None:
    """What an asyncio service writes: ``concurrency`` tasks, each awaiting ``predict()``."""
    async with AsyncClient(job.redis_url) as client:

        async def loop() -> None:
            while (sent_at := time.perf_counter()) < window[1]:
                try:
                    await client.predict(job.model, x, timeout=60)
                    ok = True
                except RequestError:
                    ok = False
                now = time.perf_counter()
                if sent_at >= window[0] and now <= window[1]:
                    if ok:
                        latencies.append(now - sent_at)
                    else:
                        errors[0] += 1

        await asyncio.gather(*(loop() for _ in range(job.concurrency)))


def _open_loop(
    client: Client,
    job: ProducerJob,
    x: np.ndarray,
    record: Callable[[float], Callable[[Future[Any]], None]],
    end: float,
) -> None:
    rng = np.random.default_rng(job.seed)
    next_at = time.perf_counter()
    # Count what is outstanding rather than keep every future: a list of a million futures
    # makes the garbage collector's pauses part of the latencies measured.
    outstanding = threading.Semaphore(0)
    sent = 0
    while next_at < end:
        now = time.perf_counter()
        if next_at > now:
            time.sleep(next_at - now)
        due = []
        now = time.perf_counter()
        while next_at <= now:  # everything due goes in one round trip
            due.append(next_at)
            next_at += rng.exponential(1 / job.rate)
        for sent_at, future in zip(due, client.submit_many(job.model, [x] * len(due)), strict=True):
            future.add_done_callback(record(sent_at))
            future.add_done_callback(lambda _: outstanding.release())
        sent += len(due)
    for _ in range(sent):
        outstanding.acquire(timeout=60)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
