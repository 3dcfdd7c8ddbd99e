"""A span exporter for the tracing test: workers (``trace_exporter =
"tests.integration.tracing:file_exporter"``) append their spans, one JSON object a line,
to the file named by TFPOOL_TEST_SPANS, where the test reads them."""

from __future__ import annotations

import os

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import ConsoleSpanExporter


def file_exporter() -> ConsoleSpanExporter:
    out = open(os.environ["TFPOOL_TEST_SPANS"], "a")  # noqa: SIM115 - the exporter owns it

    def one_line(span: ReadableSpan) -> str:
        return str(span.to_json(indent=None)) + "\n"

    return ConsoleSpanExporter(out=out, formatter=one_line)
