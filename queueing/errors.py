"""Errors a producer can see.

A failed request is data: the worker posts ``{"type": ..., "message": ...}`` under the
request's id, and the client turns it back into one of these classes by name.
"""

from __future__ import annotations


class TfpoolError(Exception):
    """Base class of every error tfpool raises."""


class RequestError(TfpoolError):
    """A request did not produce a result. ``request_id`` says which one."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class InvalidInput(RequestError):
    """The request could not be decoded, or does not fit the model's inputs."""


class DeadlineExceeded(RequestError):
    """The request's deadline passed before it was run; it was never run."""


class ModelError(RequestError):
    """The model raised while running this request."""


class UnknownModel(RequestError):
    """No pool on this Redis serves the named model."""


class QueueFull(RequestError):
    """The model's queue is at its configured cap; the request was not queued."""


class RedisOutOfMemory(QueueFull):
    """Redis is at its ``maxmemory`` and refuses new writes: the request was not queued.
    Like a full queue, it passes when the pool catches up (answered requests free memory);
    raise ``maxmemory`` if it does not."""


class DeadLettered(RequestError):
    """The request was delivered too many times (its workers kept dying) and was set aside."""


class Unavailable(RequestError):
    """Redis could not be reached; the request was not queued."""


class RequestLost(RequestError):
    """Redis restarted and lost its data while the request was waiting: it will not be
    answered. Submit it again."""


class RequestTimeout(RequestError, TimeoutError):
    """The client stopped waiting. The request may still run; its result is then dropped."""


class ProtocolError(TfpoolError):
    """A message on the wire is not one this version understands."""


#: Error classes a worker may name in a result, by name. The wire carries the name only.
REMOTE_ERRORS: dict[str, type[RequestError]] = {
    cls.__name__: cls
    for cls in (InvalidInput, DeadlineExceeded, ModelError, UnknownModel, QueueFull, DeadLettered)
}


def error_from_wire(kind: str, message: str, request_id: str | None) -> RequestError:
    """Rebuild the exception a worker reported; an unknown kind becomes a plain RequestError."""
    cls = REMOTE_ERRORS.get(kind, RequestError)
    return cls(message, request_id=request_id)
