"""Tracing: a producer's trace context travels in its requests, and the worker's spans
(queue, batch, compute) land in the producer's trace."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from queueing import Client
from tests.integration.conftest import PoolFactory
from tests.waiting import wait_until


def test_a_requests_spans_share_its_producers_trace(
    start_pool: PoolFactory,
    mlp_path: str,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spans_file = tmp_path / "spans.jsonl"
    monkeypatch.setenv("TFPOOL_TEST_SPANS", str(spans_file))  # read by the spawned worker
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export within 0.1 s
    start_pool(mlp_path, name="traced", max_batch_size=8,
               trace_exporter="tests.integration.tracing:file_exporter")  # fmt: skip
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    x = np.random.default_rng(9).standard_normal((3, 8)).astype(np.float32)
    with Client(redis_url) as c:
        with provider.get_tracer("test").start_as_current_span("produce"):
            # One enqueue call (atomic in Redis): read, and so batched, together.
            futures = c.submit_many("traced", list(x))
        for f in futures:
            c.wait(f, timeout=60)
        c.predict("traced", x[0], timeout=60)  # sent outside any span: no spans
    (produced,) = exporter.get_finished_spans()
    assert produced.context is not None
    trace_id = f"0x{produced.context.trace_id:032x}"
    producer_span = f"0x{produced.context.span_id:016x}"

    def nine_spans() -> list[dict[str, Any]] | None:
        if not spans_file.exists():
            return None
        spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
        return spans if len(spans) >= 9 else None

    spans = wait_until(nine_spans, timeout=60, what="the worker's spans")
    assert len(spans) == 9
    assert Counter(s["name"] for s in spans) == {
        "tfpool.queue": 3, "tfpool.batch": 3, "tfpool.compute": 3,
    }  # fmt: skip
    assert {s["context"]["trace_id"] for s in spans} == {trace_id}
    batches = {s["context"]["span_id"] for s in spans if s["name"] == "tfpool.batch"}
    for s in spans:
        if s["name"] == "tfpool.compute":
            assert s["parent_id"] in batches
        else:
            assert s["parent_id"] == producer_span
        if s["name"] == "tfpool.batch":
            # Linked to the batch's two other traced requests.
            assert len(s["links"]) == 2
            assert s["attributes"]["tfpool.batch.rows"] == 3
