"""tfpool's producer side: the wire format, the Redis protocol and the clients.

Never imports TensorFlow: a producer installs ``tfpool`` without the ``worker`` extra.
"""

from queueing.aio import AsyncClient, AsyncRequestFuture
from queueing.client import Client, RequestFuture
from queueing.errors import (
    DeadLettered,
    DeadlineExceeded,
    InvalidInput,
    ModelError,
    ProtocolError,
    QueueFull,
    RedisOutOfMemory,
    RequestError,
    RequestLost,
    RequestTimeout,
    TfpoolError,
    Unavailable,
    UnknownModel,
)

__all__ = [
    "AsyncClient",
    "AsyncRequestFuture",
    "Client",
    "DeadLettered",
    "DeadlineExceeded",
    "InvalidInput",
    "ModelError",
    "ProtocolError",
    "QueueFull",
    "RedisOutOfMemory",
    "RequestError",
    "RequestFuture",
    "RequestLost",
    "RequestTimeout",
    "TfpoolError",
    "Unavailable",
    "UnknownModel",
]
