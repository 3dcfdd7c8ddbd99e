"""``tfpool bench``: drive a pool the way perf_analyzer drives Triton, and print one table.

Each scenario starts producers in their own processes against a pool serving a model
built on the spot (random weights, real shapes), warms up, then measures a fixed window:

* closed loop: each producer keeps ``concurrency`` requests in flight;
* open loop: Poisson arrivals at a fixed rate; latency counts from the *scheduled* send
  time, so a producer that falls behind shows up as latency, not as a lower rate.

Figures: requests/s and rows/s, latency percentiles, mean batch size (from the workers'
counters), CPU time per request summed over every process involved (producers, workers,
redis-server), and the bare model's best rows/s (a tight ``model(batch)`` loop in a
process with the worker's thread settings, on an otherwise idle machine) with the ratio.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import psutil
import redis

from queueing import Client
from workers.batcher import default_buckets
from workers.config import PoolConfig
from workers.memory import keep_large_buffers
from workers.placement import Slot, cpu_count
from workers.supervisor import Supervisor

_SPAWN = multiprocessing.get_context("spawn")

#: name -> (input shape without batch axis, builder).
MODELS: dict[str, tuple[tuple[int, ...], str]] = {
    "identity": ((16,), "_build_identity"),
    "mlp": ((64,), "_build_mlp"),
    "mobilenet": ((224, 224, 3), "_build_mobilenet"),
    "framenet": ((112, 112, 3), "_build_framenet"),
}


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One measurement: a model, a load shape, and the pool's batching settings."""

    name: str
    model: str
    load: str = "closed"  # "closed" or "open"
    producers: int = 1
    concurrency: int = 64  # closed loop: in flight per producer
    rate: float = 0.0  # open loop: requests/s over all producers (0: 50% of saturation)
    rows: int = 1  # rows per request
    max_batch_size: int = 32
    max_latency_ms: float = 5.0
    warmup_s: float = 2.0
    duration_s: float = 5.0


@dataclass
class Figures:
    """What one run of a scenario measured."""

    scenario: str
    model: str
    load: str
    requests: int = 0
    errors: int = 0
    requests_per_s: float = 0.0
    rows_per_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    mean_batch: float = 0.0
    cpu_us_per_request: float = 0.0
    cpu_split_us: dict[str, float] = field(default_factory=dict)
    bare_rows_per_s: float = 0.0
    bare_best_batch: int = 0
    bare_one_row_ms: float = 0.0
    ratio: float = 0.0
    rate: float = 0.0


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(name="identity-closed", model="identity", concurrency=512, max_batch_size=128),
        Scenario(name="mlp-closed", model="mlp", concurrency=512, max_batch_size=128),
        Scenario(name="mlp-lone", model="mlp", concurrency=1, duration_s=4.0),
        Scenario(name="mlp-open-50", model="mlp", load="open", max_batch_size=128),
        Scenario(
            name="mobilenet-closed",
            model="mobilenet",
            concurrency=16,
            max_batch_size=8,
            warmup_s=4.0,
            duration_s=12.0,
        ),
    )
}


# --- models (built and measured in spawned children: this process stays TF-free) -------


def _build_identity(path: str) -> None:
    import keras

    x = keras.Input((16,), name="x")
    keras.Model(x, keras.layers.Identity(name="y")(x)).save(path)


def _build_mlp(path: str) -> None:
    import keras

    x = keras.Input((64,), name="x")
    h = keras.layers.Dense(256, activation="relu")(x)
    h = keras.layers.Dense(256, activation="relu")(h)
    keras.Model(x, keras.layers.Dense(10, name="y")(h)).save(path)


def _build_mobilenet(path: str) -> None:
    import keras

    keras.applications.MobileNetV2(input_shape=(224, 224, 3), weights=None).save(path)


def _build_framenet(path: str) -> None:
    """A small convolutional classifier of 112x112 frames (scripts/video_frames.py)."""
    import keras

    x = keras.Input((112, 112, 3), name="frame")
    h = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    h = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    keras.Model(x, keras.layers.Dense(10, activation="softmax", name="classes")(h)).save(path)


def _build(name: str, path: str) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    globals()[MODELS[name][1]](path)


def build_model(name: str, directory: str) -> str:
    """Save benchmark model ``name`` under ``directory``; returns its path."""
    path = str(Path(directory) / f"{name}.keras")
    if not os.path.exists(path):
        child = _SPAWN.Process(target=_build, args=(name, path))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"building {name} failed")
    return path


def _bare(
    path: str, slot: Slot, buckets: list[int], seconds: float, barrier: Any, out: Any
) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from workers.model import configure_tensorflow, load_model

    configure_tensorflow(
        intra_op_threads=slot.intra_op_threads, inter_op_threads=slot.inter_op_threads
    )
    model = load_model(path)
    model.warm_up(buckets)
    spec = model.inputs[0]
    rng = np.random.default_rng(0)
    per_bucket = {}
    for rows in buckets:
        batch = {spec.name: rng.standard_normal(spec.example_shape(rows)).astype(spec.dtype)}
        barrier.wait()  # every process measures the same batch size at the same time
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds or calls < 3:
            model(batch)
            calls += 1
        per_bucket[rows] = calls * rows / elapsed
    barrier.wait()
    one = {spec.name: np.zeros(spec.example_shape(1), spec.dtype)}
    times = []
    for _ in range(200):
        started = time.perf_counter()
        model(one)
        times.append(time.perf_counter() - started)
    out.put({"rows_per_s": per_bucket, "one_row_ms": statistics.median(times) * 1000})


def measure_bare(
    path: str, slots: Sequence[Slot], buckets: list[int], seconds: float
) -> dict[str, float]:
    """The bare model placed as the pool's workers are: one fresh process per slot, with
    its thread settings, all running tight ``model(batch)`` loops at once. Returns the best
    total rows/s over the buckets, its batch size, and the median one-row call time."""
    out = _SPAWN.Queue()
    barrier = _SPAWN.Barrier(len(slots))
    children = [
        _SPAWN.Process(target=_bare, args=(path, slot, buckets, seconds, barrier, out))
        for slot in slots
    ]
    for child in children:
        child.start()
    results = [out.get(timeout=900) for _ in children]
    for child in children:
        child.join()
    totals = {rows: sum(r["rows_per_s"][rows] for r in results) for rows in buckets}
    best = max(totals, key=lambda rows: totals[rows])
    return {
        "rows_per_s": totals[best],
        "best_batch": best,
        "one_row_ms": statistics.median(r["one_row_ms"] for r in results),
    }


# --- producers ----------------------------------------------------------------------


@dataclass(frozen=True)
class _ProducerJob:
    redis_url: str
    model: str
    shape: tuple[int, ...]
    rows: int
    load: str
    concurrency: int
    rate: float
    start_at: float  # time.time() at which measuring starts
    stop_at: float
    seed: int


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_producer(job: _ProducerJob) -> dict[str, Any]:
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
    with Client(job.redis_url) as client:
        if job.load == "closed":
            _closed_loop(client, job, x, record, window[1])
        else:
            _open_loop(client, job, x, record, window[1])
        sampler.join()
    return {
        "latencies": latencies,
        "errors": errors[0],
        "cpu": cpu.get("stop", 0.0) - cpu.get("start", 0.0),
    }


def _closed_loop(
    client: Client,
    job: _ProducerJob,
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


def _open_loop(
    client: Client,
    job: _ProducerJob,
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


# --- one scenario -------------------------------------------------------------------


def _worker_counters(conn: redis.Redis, model: str) -> tuple[int, int]:
    rows = batches = 0
    for key in conn.scan_iter("tfpool:worker:*"):
        beat = cast(dict[bytes, bytes], conn.hgetall(key))
        if beat.get(b"model") == model.encode():
            rows += int(beat.get(b"rows", 0))
            batches += int(beat.get(b"batches", 0))
    return rows, batches


def redis_cpu(conn: redis.Redis) -> float:
    info: dict[str, Any] = conn.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def process_cpu(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def run_scenario(
    scenario: Scenario,
    *,
    redis_url: str,
    supervisor: Supervisor,
    bare: dict[str, float],
    saturated_rate: float = 0.0,
) -> Figures:
    """Measure ``scenario`` against a running pool."""
    shape = MODELS[scenario.model][0]
    rate = scenario.rate or saturated_rate / 2
    if scenario.load == "open" and rate <= 0:
        raise ValueError(
            f"{scenario.name}: run a closed-loop scenario of {scenario.model} first"
            " (the open loop offers half its rate)"
        )
    start_at = time.time() + scenario.warmup_s + 1.0  # one second for producers to start
    stop_at = start_at + scenario.duration_s
    jobs = [
        _ProducerJob(
            redis_url,
            scenario.model,
            shape,
            scenario.rows,
            scenario.load,
            scenario.concurrency,
            rate / scenario.producers,
            start_at,
            stop_at,
            seed=i,
        )
        for i in range(scenario.producers)
    ]
    conn = redis.Redis.from_url(redis_url)
    with ProcessPoolExecutor(scenario.producers, mp_context=_SPAWN) as pool:
        running = [pool.submit(run_producer, job) for job in jobs]
        time.sleep(max(0.0, start_at - time.time()))
        workers = supervisor.serving_pids()
        before = (process_cpu(workers), redis_cpu(conn), _worker_counters(conn, scenario.model))
        time.sleep(max(0.0, stop_at - time.time()))
        after = (process_cpu(workers), redis_cpu(conn), _worker_counters(conn, scenario.model))
        results = [r.result() for r in running]
    conn.close()

    latencies = sorted(t for r in results for t in r["latencies"])
    count = len(latencies)
    window = stop_at - start_at
    figures = Figures(
        scenario=scenario.name,
        model=scenario.model,
        load=scenario.load,
        requests=count,
        errors=sum(r["errors"] for r in results),
        rate=rate,
    )
    if not count:
        return figures
    producer_cpu = sum(r["cpu"] for r in results)
    worker_cpu, server_cpu = after[0] - before[0], after[1] - before[1]
    rows, batches = (after[2][0] - before[2][0]), (after[2][1] - before[2][1])
    figures.requests_per_s = count / window
    figures.rows_per_s = count * scenario.rows / window
    figures.p50_ms, figures.p90_ms, figures.p99_ms = (
        1000 * latencies[min(count - 1, int(q * count))] for q in (0.5, 0.9, 0.99)
    )
    figures.max_ms = 1000 * latencies[-1]
    figures.mean_batch = rows / batches if batches else 0.0
    # Requests handled in the window, for CPU per request (completions, all producers).
    figures.cpu_split_us = {
        "producers": 1e6 * producer_cpu / count,
        "workers": 1e6 * worker_cpu / count,
        "redis": 1e6 * server_cpu / count,
    }
    figures.cpu_us_per_request = sum(figures.cpu_split_us.values())
    figures.bare_rows_per_s = bare["rows_per_s"]
    figures.bare_best_batch = int(bare["best_batch"])
    figures.bare_one_row_ms = bare["one_row_ms"]
    figures.ratio = figures.rows_per_s / bare["rows_per_s"]
    return figures


# --- the whole run ------------------------------------------------------------------


def run(
    names: Sequence[str],
    *,
    redis_url: str,
    runs: int = 1,
    workers: int = 1,
    intra_op_threads: int = 0,
    model_dir: str | None = None,
    metrics: bool = True,
    log: Callable[[str], None] = print,
) -> list[Figures]:
    """Run the named scenarios ``runs`` times each; return the median run of each (by
    rows/s, and by p50 for the lone-request scenario). ``metrics``: the workers record
    metrics (the default, as in production); off measures what recording costs."""
    scenarios = [SCENARIOS[n] for n in names]
    cores = cpu_count()
    threads = intra_op_threads or max(1, cores // workers)
    slots = [Slot(i, None, threads, 1) for i in range(workers)]
    medians: list[Figures] = []
    with tempfile.TemporaryDirectory(prefix="tfpool-bench-") as tmp:
        directory = model_dir or tmp
        by_model: dict[str, list[Scenario]] = {}
        for s in scenarios:
            by_model.setdefault(s.model, []).append(s)
        for model, group in by_model.items():
            path = build_model(model, directory)
            max_batch = max(s.max_batch_size for s in group)
            log(
                f"[{model}] measuring the bare model ({len(slots)} process(es),"
                f" {slots[0].intra_op_threads} intra-op threads each)"
            )
            bare = measure_bare(path, slots, default_buckets(max_batch), seconds=1.5)
            log(
                f"[{model}] bare: {bare['rows_per_s']:,.0f} rows/s at batch {bare['best_batch']},"
                f" one row {bare['one_row_ms']:.3f} ms"
            )
            for s in group:
                config = PoolConfig(
                    model=path,
                    name=model,
                    redis_url=redis_url,
                    max_batch_size=s.max_batch_size,
                    max_latency_ms=s.max_latency_ms,
                    heartbeat_s=0.25,
                    max_queue=0,
                    metrics=metrics,
                    log_level="WARNING",
                )
                supervisor = Supervisor(config, slots=slots)
                supervisor.start()
                try:
                    if not supervisor.wait_ready(timeout=600):
                        raise RuntimeError("the pool did not start")
                    saturated = max(
                        (
                            f.requests_per_s
                            for f in medians
                            if f.model == model
                            and f.load == "closed"
                            and f.scenario.endswith("closed")
                        ),
                        default=0.0,
                    )
                    results = []
                    for i in range(runs):
                        f = run_scenario(
                            s,
                            redis_url=redis_url,
                            supervisor=supervisor,
                            bare=bare,
                            saturated_rate=saturated,
                        )
                        log(
                            f"[{s.name}] run {i + 1}: {f.requests_per_s:,.0f} req/s,"
                            f" p50 {f.p50_ms:.2f} ms, p99 {f.p99_ms:.2f} ms,"
                            f" batch {f.mean_batch:.1f}, {f.cpu_us_per_request:.0f} us CPU/req,"
                            f" ratio {f.ratio:.3f}"
                        )
                        results.append(f)
                    medians.append(sorted(results, key=_median_key(s))[len(results) // 2])
                finally:
                    supervisor.drain()
    return medians


def _median_key(scenario: Scenario) -> Callable[[Figures], float]:
    """What "the median run" is ranked by: latency where latency is the point (a lone
    request, an open loop at a fixed rate), throughput elsewhere."""
    if scenario.load == "open":
        return lambda f: f.p99_ms
    if scenario.concurrency == 1:
        return lambda f: f.p50_ms
    return lambda f: f.rows_per_s


def render(figures: Sequence[Figures]) -> str:
    """The table ``tfpool bench`` prints."""
    header = (
        "scenario",
        "req/s",
        "rows/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "batch",
        "CPU us/req",
        "bare rows/s",
        "pool/bare",
    )
    rows = [
        (
            f.scenario,
            f"{f.requests_per_s:,.0f}",
            f"{f.rows_per_s:,.0f}",
            f"{f.p50_ms:.2f}",
            f"{f.p90_ms:.2f}",
            f"{f.p99_ms:.2f}",
            f"{f.max_ms:.2f}",
            f"{f.mean_batch:.1f}",
            f"{f.cpu_us_per_request:.0f}",
            f"{f.bare_rows_per_s:,.0f}",
            f"{f.ratio:.3f}",
        )
        for f in figures
    ]
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in (header, *rows)
    ]
    notes = [
        f"{f.scenario}: bare one-row call {f.bare_one_row_ms:.3f} ms; CPU us/req split "
        + ", ".join(f"{k} {v:.0f}" for k, v in f.cpu_split_us.items())
        + (f"; offered {f.rate:,.0f} req/s" if f.load == "open" else "")
        + (f"; {f.errors} errors" if f.errors else "")
        for f in figures
    ]
    return "\n".join([*lines, "", *notes])


def to_json(figures: Sequence[Figures]) -> str:
    return json.dumps([asdict(f) for f in figures], indent=2)
