"""How tfpool's errors read in the APIs the gateway speaks: a gRPC status code and an
HTTP status each, as TF Serving and Triton answer them. The message is tfpool's own."""

from __future__ import annotations

import grpc

from queueing.errors import (
    DeadlineExceeded,
    InvalidInput,
    QueueFull,
    RequestError,
    RequestLost,
    RequestTimeout,
    Unavailable,
    UnknownModel,
)

#: Seconds a client told "queue full" (HTTP 429) is asked to wait before trying again.
RETRY_AFTER_S = 1

# First match wins: RequestTimeout is a RequestError too.
_MAPPING: list[tuple[type[RequestError], grpc.StatusCode, int]] = [
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (UnknownModel, grpc.StatusCode.NOT_FOUND, 404),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (RequestTimeout, grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (Unavailable, grpc.StatusCode.UNAVAILABLE, 503),
    (RequestLost, grpc.StatusCode.UNAVAILABLE, 503),
]


def grpc_code(error: RequestError) -> grpc.StatusCode:
    """The gRPC status for ``error``; INTERNAL for a model's own failure and the rest."""
    for kind, code, _ in _MAPPING:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def http_status(error: RequestError) -> int:
    """The HTTP status for ``error``; 500 for a model's own failure and the rest."""
    for kind, _, status in _MAPPING:
        if isinstance(error, kind):
            return status
    return 500
