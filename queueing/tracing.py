"""The producer's side of tracing: the current OpenTelemetry span's context, as a W3C
``traceparent`` for the requests it sends.

Nothing here needs OpenTelemetry: without it installed, or without a span being recorded
when a request is sent, requests carry no trace context and this costs one check per
``submit`` call.
"""

from __future__ import annotations

try:
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - OpenTelemetry is optional
    _trace = None  # type: ignore[assignment]


def current_traceparent() -> str | None:
    """``00-<trace id>-<span id>-<flags>`` of the current span, or None without one."""
    if _trace is None:
        return None
    context = _trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
