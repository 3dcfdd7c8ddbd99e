"""The worker's side of tracing (OpenTelemetry, optional).

For each request that arrived with its producer's trace context (W3C ``traceparent``, see
``queueing.tracing``), the worker records, under the producer's span:

* ``tfpool.queue``: arrival in the stream (Redis's clock) -> start of its batch;
* ``tfpool.batch``: the batch it ran in, linked to the batch's other traced requests;
* ``tfpool.compute``: the model's run of that batch, inside the batch span.

Spans are made after the batch ran, with explicit times, so the model's path is never
slowed by them. Off unless ``trace_exporter`` is set: then the worker never imports
OpenTelemetry and pays one ``is None`` check per batch.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from workers.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter


@dataclass(frozen=True, slots=True)
class Traced:
    """One traced request's part of a batch."""

    traceparent: str
    arrival: float  # time.monotonic() of its arrival in the stream
    rows: int  # its rows in this batch
    first: bool  # its first rows: the batch ends its wait in the queue


class BatchTracer:
    """Records the spans of traced requests, one batch at a time (main thread only)."""

    def __init__(self, exporter: str, *, model: str, worker_id: str) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create(
            {"service.name": "tfpool", "tfpool.model": model, "tfpool.worker": worker_id}
        )
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(BatchSpanProcessor(load_exporter(exporter)))
        self._tracer = self._provider.get_tracer("tfpool.worker")
        self._propagator = TraceContextTextMapPropagator()
        # Monotonic times -> the wall clock in ns, as spans want them.
        self._wall_ns = time.time_ns() - time.monotonic_ns()

    def batch(
        self,
        traced: Sequence[Traced],
        *,
        rows: int,
        padded_rows: int,
        started: float,
        computed: float,
        finished: float,
    ) -> None:
        """Spans for the traced requests of one batch that ran from ``started`` to
        ``finished`` (monotonic), its model from ``started`` to ``computed``."""
        from opentelemetry import trace

        contexts = [self._propagator.extract({"traceparent": t.traceparent}) for t in traced]
        parents = [trace.get_current_span(c).get_span_context() for c in contexts]
        for i, (t, context) in enumerate(zip(traced, contexts, strict=True)):
            if t.first:
                queued = self._tracer.start_span(
                    "tfpool.queue", context=context, start_time=self._ns(t.arrival)
                )
                queued.end(end_time=self._ns(started))
            links = [trace.Link(p) for j, p in enumerate(parents) if j != i]
            batch = self._tracer.start_span(
                "tfpool.batch",
                context=context,
                start_time=self._ns(started),
                links=links,
                attributes={
                    "tfpool.batch.rows": rows,
                    "tfpool.batch.padded_rows": padded_rows,
                    "tfpool.request.rows": t.rows,
                },
            )
            compute = self._tracer.start_span(
                "tfpool.compute",
                context=trace.set_span_in_context(batch),
                start_time=self._ns(started),
            )
            compute.end(end_time=self._ns(computed))
            batch.end(end_time=self._ns(finished))

    def close(self) -> None:
        """Send what is buffered."""
        self._provider.shutdown()

    def _ns(self, monotonic: float) -> int:
        return int(monotonic * 1e9) + self._wall_ns


def load_exporter(spec: str) -> SpanExporter:
    """``console``, ``otlp`` (needs opentelemetry-exporter-otlp), or ``module:callable``
    returning a SpanExporter."""
    if spec == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if spec == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )
        except ImportError as e:
            raise ConfigError(
                "trace_exporter = otlp needs `pip install opentelemetry-exporter-otlp`"
            ) from e
        return OTLPSpanExporter()  # type: ignore[no-any-return]
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"trace_exporter must be console, otlp or module:callable, got {spec!r}")
    exporter: SpanExporter = getattr(importlib.import_module(module), name)()
    return exporter
