"""What the sync and asyncio clients share, without I/O: who a client is (its id and
reply stream), how requests are encoded, how results are read."""

from __future__ import annotations

import itertools
import logging
import os
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from queueing import keys, wire
from queueing.errors import QueueFull, RequestLost, RequestTimeout, Unavailable
from queueing.redis_state import EpochWatch, eviction_problem
from queueing.wire import Outputs, Sendable

log = logging.getLogger(__name__)

#: Where to find Redis when no URL is given and ``TFPOOL_REDIS_URL`` is not set.
DEFAULT_REDIS_URL = "redis://localhost:6379/0"

#: How long a reply stream (and a kept result, unless told otherwise) outlives its last write.
DEFAULT_RESULT_TTL_S = 3600

#: The reply reader's XREAD BLOCK; its socket timeout is longer, as every blocking call's is.
READ_BLOCK_S = 1.0

#: Most results the reply reader takes in one read.
READ_COUNT = 1024


def resolve_redis_url(redis_url: str | None) -> str:
    """The URL given, else ``TFPOOL_REDIS_URL``, else :data:`DEFAULT_REDIS_URL`."""
    return redis_url or os.environ.get("TFPOOL_REDIS_URL") or DEFAULT_REDIS_URL


def without_password(url: str) -> str:
    """The URL as it may appear in a message: no password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" if parts.username else f":***@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class ClientBase:
    """A producer's identity and its encoding and decoding of requests and results."""

    def __init__(self, redis_url: str | None, *, result_ttl_s: int) -> None:
        if result_ttl_s < 1:
            raise ValueError(f"result_ttl_s must be >= 1, got {result_ttl_s}")
        self.redis_url = resolve_redis_url(redis_url)
        self.result_ttl_s = result_ttl_s
        self.client_id = uuid.uuid4().hex
        self.reply_key = keys.reply_stream(self.client_id)
        #: Results that found no waiting future: repeats after a worker crash, or results
        #: of requests whose caller stopped waiting.
        self.duplicates_ignored = 0
        self._safe_url = without_password(self.redis_url)
        self._ids = itertools.count()
        self._id_prefix = self.client_id[:12]
        # Read and written by the reply reader only (its thread, or its task).
        self._cursor = ReplyCursor()
        self._epochs = EpochWatch()
        self._policy_checked = False

    def _new_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    def _bodies(
        self,
        model: str,
        inputs: Iterable[Sendable],
        *,
        deadline: float | None,
        keep: bool,
        keep_ttl_s: int | None,
    ) -> list[bytes]:
        deadline_ms = None if deadline is None else max(0, int(deadline * 1000))
        keep_s = (keep_ttl_s or self.result_ttl_s) if keep else 0
        return [
            wire.encode_request_body(model, item, deadline_ms=deadline_ms, keep_s=keep_s)
            for item in inputs
        ]

    def _after_reconnect(self, epoch: str | None, policy: str | None) -> bool:
        """What the reply reader learnt on (re)connecting: True if Redis lost its data
        since the last time (its waiting requests will never be answered). Warns, once,
        of an evicting Redis."""
        if not self._policy_checked and policy is not None:
            self._policy_checked = True
            problem = eviction_problem(policy)
            if problem:
                log.warning("%s; requests may vanish", problem)
        if not self._epochs.lost(epoch):
            return False
        self._cursor = ReplyCursor()  # a new reply stream, whose ids start anywhere
        return True

    @staticmethod
    def _lost(request_id: str) -> RequestLost:
        return RequestLost(
            "Redis lost its data (restarted without persistence, or flushed) while the"
            " request waited; submit it again",
            request_id=request_id,
        )

    def _queue_full(self, model: str, request_id: str) -> QueueFull:
        return QueueFull(f"queue of model {model!r} is full", request_id=request_id)

    def _unavailable(self, error: redis.RedisError) -> Unavailable:
        return Unavailable(f"cannot reach Redis at {self._safe_url}: {error}")

    @staticmethod
    def _timeout(request_id: str, timeout: float) -> RequestTimeout:
        return RequestTimeout(
            f"no result for request {request_id} within {timeout:g}s", request_id=request_id
        )

    @staticmethod
    def _decode(data: bytes) -> wire.Result | None:
        """A result from the reply list; None (logged) for one that cannot be read."""
        try:
            return wire.decode_result(data)
        except Exception:
            log.exception("dropping a result that cannot be decoded")
            return None

    @staticmethod
    def _unwrap(result: wire.Result) -> Outputs:
        if result.error is not None:
            raise result.error
        assert result.outputs is not None
        return result.outputs


class ReplyCursor:
    """Where a client's reader is in its reply stream. A result stays in the stream until
    the read after the one that brought it, which first trims everything up to the last
    id the client holds: a reply lost on the way (a dropped connection) is read again.
    No I/O; the reader sends ``trim_below`` and ``last`` with its next XREAD."""

    def __init__(self) -> None:
        #: The id of the last entry read: the next read starts after it.
        self.last = b"0-0"
        #: Entries below this id are resolved and may go (None: nothing to trim).
        self.trim_below: bytes | None = None

    def take(self, reply: Any) -> list[bytes]:
        """The results in an XREAD reply (``[[key, [(id, fields), ...]]]`` or None)."""
        if not reply:
            return []
        entries = reply[0][1]
        if not entries:
            return []
        last = entries[-1][0]
        self.last = last if isinstance(last, bytes) else str(last).encode()
        ms, _, seq = self.last.partition(b"-")
        self.trim_below = b"%s-%d" % (ms, int(seq or 0) + 1)
        found = (fields.get(keys.FIELD_RESULT) for _, fields in entries)
        return [data for data in found if data]  # b"": close()'s wake-up call
