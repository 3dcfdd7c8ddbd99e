"""The supervisor's HTTP endpoint: ``/metrics`` for Prometheus, ``/healthz`` and
``/readyz`` for Kubernetes probes.

``/metrics`` is built at scrape time by one prometheus_client collector: the counters and
histograms from the shared memory of this supervisor's slots (``workers.metrics``), the
per-worker gauges from the supervisor's own handles, and the queue gauges read from Redis
(the same reading as ``tfpool status``). Queue gauges describe the whole pool, so every
host's supervisor reports the same values: aggregate them with ``max``, not ``sum``.

Every metric has the label ``model``. A pool of one model is its name. A repository
pool's counters, histograms and queue gauges come per model of the repository (each
model's own shared memory, summed over slots; each model's queue), while the per-worker
gauges, of processes that serve every model, carry the pool's name.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import psutil
import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from queueing import connection
from workers.metrics import HISTOGRAMS, OUTCOMES, Snapshot
from workers.status import ModelStatus, heartbeats, model_status

if TYPE_CHECKING:
    from workers.supervisor import Supervisor

log = logging.getLogger(__name__)

#: What each histogram measures, as its HELP text says.
_HISTOGRAM_HELP = {
    "batch_rows": "Rows in a batch run (before padding).",
    "queue_wait_seconds": "Arrival in the stream (Redis's clock) to the start of the"
    " request's batch.",
    "compute_seconds": "Time in the model (and post-processing) per batch.",
    "request_seconds": "Arrival in the stream (Redis's clock) to the answer stored in Redis.",
}


class PoolCollector(Collector):
    """Every ``tfpool_`` metric of one supervisor's pool, read when scraped."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        #: The pool's name: the label of the per-worker gauges.
        self.pool = supervisor.config.name
        #: The models counted, and the layout of each one's cells: a repository pool's
        #: models found at start, or the pool's one model.
        self.layouts = supervisor.model_layouts or {self.pool: supervisor.layout}
        self._redis = connection.connect(supervisor.config.redis_url, socket_timeout=5)

    def collect(self) -> Iterator[Metric]:
        yield from self._counters()
        yield from self._workers()
        try:
            yield from self._queue()
        except redis.RedisError as e:  # the other figures are still worth a scrape
            log.warning("metrics: cannot read the queue from Redis: %s", e)

    def close(self) -> None:
        self._redis.close()

    def _counters(self) -> Iterator[Metric]:
        totals = {name: self._total(name) for name in self.layouts}
        requests = CounterMetricFamily(
            "tfpool_requests", "Requests answered, by outcome.", labels=["model", "outcome"]
        )
        rows = CounterMetricFamily("tfpool_rows", "Rows run through the model.", labels=["model"])
        batches = CounterMetricFamily("tfpool_batches", "Batches run.", labels=["model"])
        for model, total in totals.items():
            for outcome in OUTCOMES:
                requests.add_metric([model, outcome], total.requests(outcome))
            rows.add_metric([model], total.rows)
            batches.add_metric([model], total.batches)
        yield from (requests, rows, batches)
        for name in HISTOGRAMS:
            family = HistogramMetricFamily(
                f"tfpool_{name}", _HISTOGRAM_HELP[name], labels=["model"]
            )
            for model, total in totals.items():
                histogram = total.histogram(name)
                family.add_metric([model], histogram.cumulative(), sum_value=histogram.sum)
            yield family

    def _total(self, model: str) -> Snapshot:
        """One model's figures, summed over this supervisor's slots: a repository model's
        own cells in each slot, or (a pool of one model) the slots' cells."""
        layout = self.layouts[model]
        return Snapshot.total(layout, (Snapshot.read(layout, h.model_metrics.get(model, h.metrics))
                                       for h in self.supervisor.handles))  # fmt: skip

    def _workers(self) -> Iterator[Metric]:
        labels = ["model", "slot", "device"]
        ready = GaugeMetricFamily(
            "tfpool_worker_ready",
            "1 when the slot's worker has warmed up and serves.",
            labels=labels,
        )
        restarts = CounterMetricFamily(
            "tfpool_worker_restarts", "Times the slot's worker was started again.", labels=labels
        )
        rss = GaugeMetricFamily(
            "tfpool_worker_rss_bytes", "Resident memory of the slot's worker.", labels=labels
        )
        gpu = GaugeMetricFamily(
            "tfpool_worker_gpu_memory_bytes",
            "GPU memory TensorFlow holds in the slot's worker (GPU workers only).",
            labels=labels,
        )
        for handle in self.supervisor.handles:
            values = [self.pool, str(handle.slot.index), handle.slot.device or "cpu"]
            process = handle.process
            alive = process is not None and process.is_alive()
            ready.add_metric(values, 1.0 if alive and handle.is_ready else 0.0)
            restarts.add_metric(values, handle.restarts)
            if alive and process is not None and process.pid is not None:
                with contextlib.suppress(psutil.Error):  # it just exited
                    rss.add_metric(values, psutil.Process(process.pid).memory_info().rss)
            if handle.slot.device is not None:
                gpu.add_metric(values, Snapshot.read(self.supervisor.layout,
                                                     handle.metrics).gpu_memory_bytes)  # fmt: skip
        yield from (ready, restarts, rss, gpu)

    def _queue(self) -> Iterator[Metric]:
        workers = heartbeats(self._redis)
        # Every model read before any family is yielded: a Redis error leaves out the
        # queue gauges whole, not the models after the one it hit.
        statuses = [model_status(self._redis, model, workers) for model in self.layouts]
        gauges: tuple[tuple[str, str, Callable[[ModelStatus], float]], ...] = (
            ("queue_waiting", "Requests in the stream not yet read by a worker.",
             lambda s: s.waiting),
            ("queue_pending", "Requests read by a worker and not yet answered.",
             lambda s: s.pending),
            ("dead_letters", "Requests in the dead-letter stream.", lambda s: s.dead_letters),
            (
                "oldest_waiting_seconds",
                "Age of the oldest request not yet read (0 when none waits).",
                lambda s: s.oldest_waiting_s,
            ),
            (
                "estimated_drain_seconds",
                "(waiting + pending) / requests answered per second over the last minute by"
                " every host's workers; +Inf with a backlog and no answers. Scale on this.",
                lambda s: s.estimated_drain_s,
            ),
        )  # fmt: skip
        for name, help_text, read in gauges:
            family = GaugeMetricFamily(f"tfpool_{name}", help_text, labels=["model"])
            for status in statuses:
                family.add_metric([status.name], read(status))
            yield family


class MetricsServer:
    """The HTTP server, on its own thread. ``port`` is the port bound (useful with 0)."""

    def __init__(self, supervisor: Supervisor, *, host: str, port: int) -> None:
        self.supervisor = supervisor
        self.collector = PoolCollector(supervisor)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="tfpool-metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics (also /healthz, /readyz)", self.host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self.collector.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._reply(200, b"ok\n")
                elif path == "/readyz":
                    ready = server.supervisor.ready
                    self._reply(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, code: int, body: bytes, kind: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics: " + format, *args)

        return Handler
