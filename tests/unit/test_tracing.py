"""The trace context in a request: sent from the producer's current span, decoded by the
worker, ignored when malformed (no Redis, no TF)."""

from __future__ import annotations

import numpy as np
from opentelemetry.sdk.trace import TracerProvider

from queueing import wire
from queueing.tracing import current_traceparent


def test_the_current_span_travels_in_the_body_as_a_w3c_traceparent() -> None:
    assert current_traceparent() is None  # no span: nothing sent
    with TracerProvider().get_tracer("test").start_as_current_span("produce") as span:
        traceparent = current_traceparent()
    context = span.get_span_context()
    flags = int(context.trace_flags)
    assert traceparent == f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"
    body = wire.encode_request_body("m", np.ones(2, np.float32), traceparent=traceparent)
    assert wire.decode_request_body(body).traceparent == traceparent


def test_without_a_trace_the_body_is_unchanged_and_a_bad_one_is_ignored() -> None:
    x = np.ones(2, np.float32)
    plain = wire.encode_request_body("m", x)
    assert b"traceparent" not in plain
    assert wire.decode_request_body(plain).traceparent is None
    for bad in ("00-xyz", "00-" + "0" * 32 + "-" + "0" * 16, 7):
        body = wire.encode_request_body("m", x, traceparent=bad)  # type: ignore[arg-type]
        decoded = wire.decode_request_body(body)
        assert decoded.traceparent is None  # the request itself is served
        assert decoded.model == "m"
