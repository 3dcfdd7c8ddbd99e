"""The scenarios, and one scenario's measurement: producers against a running pool, and
the figures of its window."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import psutil
import redis

from queueing import connection
from workers.bench.gateway import GatewayProcess
from workers.bench.models import MODELS
from workers.bench.producers import ProducerJob, run_producer
from workers.layouts import LayoutFigures
from workers.supervisor import Supervisor

_SPAWN = multiprocessing.get_context("spawn")


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One measurement: a model, a load shape, and the pool's batching settings."""

    name: str
    model: str
    load: str = "closed"  # "closed" or "open"
    producers: int = 1
    #: closed loop, how the producer calls: "many" (``submit_many`` of every free slot,
    #: coalescing by hand), "submit" (one ``submit()`` per request from one thread),
    #: "threads" (``concurrency`` threads calling ``predict()``), "tasks" (``concurrency``
    #: asyncio tasks awaiting ``AsyncClient.predict()``).
    call: str = "many"
    concurrency: int = 64  # closed loop: in flight per producer
    rate: float = 0.0  # open loop: requests/s over all producers (0: 50% of saturation)
    rows: int = 1  # rows per request
    max_batch_size: int = 32
    max_latency_ms: float = 5.0
    warmup_s: float = 2.0
    duration_s: float = 5.0
    #: "client": ``queueing.Client`` calls; "gateway": TF Serving gRPC ``Predict`` calls
    #: through a ``tfpool gateway`` process (closed loop only).
    via: str = "client"
    #: The direct-client scenario this one is compared with; run in the same bench.
    baseline: str = ""

    def __post_init__(self) -> None:
        if self.via not in ("client", "gateway"):
            raise ValueError(f"{self.name}: via must be 'client' or 'gateway', got {self.via!r}")
        if self.via == "gateway" and self.load != "closed":
            raise ValueError(f"{self.name}: a gateway scenario is a closed loop")


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
    #: The pool's layout (processes x intra-op threads).
    layout: str = ""
    #: The bare model's best layout among the machine's candidates, measured in this run,
    #: its rows/s at its best batch size, and its one-row call time.
    bare_layout: str = ""
    bare_rows_per_s: float = 0.0
    bare_best_batch: int = 0
    bare_one_row_ms: float = 0.0
    ratio: float = 0.0
    rate: float = 0.0
    baseline: str = ""
    #: rows/s over the baseline scenario's rows/s, in the same bench run.
    vs_baseline: float = 0.0
    #: Its calls alone (workers.bench.floor): requests/s and CPU us per request.
    floor_requests_per_s: float = 0.0
    floor_cpu_us: float = 0.0
    #: A natural call's rows/s over ``<model>-closed``'s (``submit_many``) in this run, and
    #: the most it can reach of that on these cores (workers.bench.floor.ceiling).
    of_many: float = 0.0
    ceiling_of_many: float = 0.0


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(name="identity-closed", model="identity", concurrency=512, max_batch_size=128),
        Scenario(name="mlp-closed", model="mlp", concurrency=512, max_batch_size=128),
        Scenario(
            name="mlp-submit", model="mlp", call="submit", concurrency=512, max_batch_size=128
        ),
        Scenario(
            name="mlp-threads-64", model="mlp", call="threads", concurrency=64, max_batch_size=128
        ),
        Scenario(
            name="mlp-tasks-1000", model="mlp", call="tasks", concurrency=1000, max_batch_size=128
        ),
        Scenario(name="mlp-lone", model="mlp", call="threads", concurrency=1, duration_s=4.0),
        Scenario(name="mlp-open-50", model="mlp", load="open", max_batch_size=128),
        Scenario(
            name="mobilenet-closed",
            model="mobilenet",
            concurrency=16,
            max_batch_size=8,
            warmup_s=4.0,
            duration_s=12.0,
        ),
        # The gateway's cost: the same load, as TF Serving gRPC calls through a gateway.
        Scenario(name="mlp-closed-64", model="mlp", concurrency=64, max_batch_size=64),
        Scenario(
            name="mlp-gateway",
            model="mlp",
            via="gateway",
            concurrency=64,
            max_batch_size=64,
            baseline="mlp-closed-64",
        ),
        Scenario(
            name="mobilenet-submit",
            model="mobilenet",
            call="submit",
            concurrency=16,
            max_batch_size=8,
            warmup_s=4.0,
            duration_s=12.0,
        ),
        # What a threaded service writes for images; scripts/peer_bench.py makes the same
        # calls to service-streamer.
        Scenario(
            name="mobilenet-threads-16",
            model="mobilenet",
            call="threads",
            concurrency=16,
            max_batch_size=8,
            warmup_s=4.0,
            duration_s=12.0,
        ),
    )
}


def run_scenario(
    scenario: Scenario,
    *,
    redis_url: str,
    supervisor: Supervisor,
    bare: LayoutFigures,
    saturated_rate: float = 0.0,
    gateway: GatewayProcess | None = None,
) -> Figures:
    """Measure ``scenario`` against a running pool (through ``gateway``, for a gateway
    scenario)."""
    shape = MODELS[scenario.model].shape
    rate = scenario.rate or saturated_rate / 2
    if scenario.load == "open" and rate <= 0:
        raise ValueError(
            f"{scenario.name}: run a closed-loop scenario of {scenario.model} first"
            " (the open loop offers half its rate)"
        )
    start_at = time.time() + scenario.warmup_s + 1.0  # one second for producers to start
    stop_at = start_at + scenario.duration_s
    jobs = [
        ProducerJob(
            redis_url,
            scenario.model,
            shape,
            scenario.rows,
            scenario.load,
            scenario.call,
            scenario.concurrency,
            rate / scenario.producers,
            start_at,
            stop_at,
            seed=i,
            gateway=gateway.address if gateway is not None else "",
            input_name=MODELS[scenario.model].input_name,
        )
        for i in range(scenario.producers)
    ]
    conn = connection.connect(redis_url)
    with ProcessPoolExecutor(scenario.producers, mp_context=_SPAWN) as pool:
        running = [pool.submit(run_producer, job) for job in jobs]
        time.sleep(max(0.0, start_at - time.time()))
        workers = supervisor.serving_pids()
        others = [gateway.pid] if gateway is not None else []
        before = (process_cpu(workers), redis_cpu(conn), _worker_counters(conn, scenario.model),
                  process_cpu(others))  # fmt: skip
        time.sleep(max(0.0, stop_at - time.time()))
        after = (process_cpu(workers), redis_cpu(conn), _worker_counters(conn, scenario.model),
                 process_cpu(others))  # fmt: skip
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
        baseline=scenario.baseline,
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
    if gateway is not None:
        figures.cpu_split_us["gateway"] = 1e6 * (after[3] - before[3]) / count
    figures.cpu_us_per_request = sum(figures.cpu_split_us.values())
    figures.bare_layout = str(bare.layout)
    figures.bare_rows_per_s = bare.best_rows_per_s
    figures.bare_best_batch = bare.best_batch
    figures.bare_one_row_ms = bare.one_row_ms
    figures.ratio = figures.rows_per_s / bare.best_rows_per_s
    return figures


def _worker_counters(conn: redis.Redis, model: str) -> tuple[int, int]:
    rows = batches = 0
    for key in conn.scan_iter("tfpool:worker:*"):
        beat = cast(dict[bytes, bytes], conn.hgetall(key))
        if beat.get(b"model") == model.encode():
            rows += int(beat.get(b"rows", 0))
            batches += int(beat.get(b"batches", 0))
    return rows, batches


def redis_cpu(conn: redis.Redis) -> float:
    """CPU seconds redis-server has used; on a cluster, summed over the nodes the cluster
    client asks (redis-py's cluster INFO answers per node)."""
    info: dict[str, Any] = (
        conn.info("cpu", target_nodes="all") if connection.clustered(conn) else conn.info("cpu")
    )
    nodes = [v for v in info.values() if isinstance(v, dict)] or [info]
    return sum(float(n["used_cpu_user"]) + float(n["used_cpu_sys"]) for n in nodes)


def process_cpu(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total
