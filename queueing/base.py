"""What the sync and asyncio clients share, without I/O: who a client is (its id, reply
stream and settings), the table of requests it waits for, how requests are encoded and
enqueued (the commands, the typed errors), where its reader is in its reply stream, and
how a Redis that lost the queue is told apart (:class:`RequestLost`, from the epoch of
:mod:`queueing.redis_state`). The clients add the I/O only."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis

from queueing import connection, enqueue, keys, wire
from queueing.errors import QueueFull, RequestError, RequestLost, RequestTimeout, Unavailable
from queueing.outbox import Outgoing, by_model
from queueing.redis_state import EpochWatch, eviction_problem
from queueing.tracing import current_traceparent
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


#: The reply reader's retries are logged as warnings from this backoff on: a blip (a
#: failover, a dropped connection) heals within the first tries and says nothing, and a
#: one-shot command whose Redis is down fails with its own one-line error first.
WARN_FROM_BACKOFF_S = 0.4


def retry_log_level(backoff_s: float) -> int:
    """The level to log a reply reader's retry at, after ``backoff_s`` of backoff."""
    return logging.WARNING if backoff_s >= WARN_FROM_BACKOFF_S else logging.DEBUG


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


class RequestFutureLike(Protocol):
    """What the clients' futures (concurrent or asyncio) have in common."""

    request_id: str
    model_version: int | None
    #: The epoch of the Redis the request was queued in (see queueing.redis_state).
    queued_in: str | None

    def done(self) -> bool: ...
    def set_result(self, result: Any) -> None: ...
    def set_exception(self, exception: BaseException) -> None: ...


F = TypeVar("F", bound=RequestFutureLike)


class ClientBase(Generic[F]):
    """A producer's identity and settings, its table of waiting futures (``F``), and what
    the sync and asyncio clients do alike. Subclasses open their connections in
    :meth:`_connect` and do the I/O.

    ``redis_url``: default ``TFPOOL_REDIS_URL``, else :data:`DEFAULT_REDIS_URL`.
    ``cluster``: the URL names a node of a Redis Cluster (default: ``TFPOOL_CLUSTER``, or a
    ``redis+cluster://`` URL); see :mod:`queueing.connection`.
    ``result_ttl_s``: how long the reply stream (and a kept result, by default) outlives its
    last write. ``socket_timeout_s``: how long any one Redis call may take.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        result_ttl_s: int = DEFAULT_RESULT_TTL_S,
        socket_timeout_s: float = 10.0,
        cluster: bool | None = None,
    ) -> None:
        if result_ttl_s < 1:
            raise ValueError(f"result_ttl_s must be >= 1, got {result_ttl_s}")
        self.redis_url = connection.as_cluster_url(resolve_redis_url(redis_url), cluster)
        self.result_ttl_s = result_ttl_s
        self.socket_timeout_s = socket_timeout_s
        self.client_id = uuid.uuid4().hex
        self.reply_key = keys.reply_stream(self.client_id)
        #: Results that found no waiting future: repeats after a worker crash, or results
        #: of requests whose caller stopped waiting.
        self.duplicates_ignored = 0
        self._safe_url = without_password(self.redis_url)
        self._ids = itertools.count()
        self._id_prefix = self.client_id[:12]
        # Futures by request id. The sync client's reply thread and its callers share the
        # table; the asyncio client never holds the lock across an await.
        self._pending: dict[str, F] = {}
        self._lock = threading.Lock()
        # Written by the reply reader only (its thread or task), or before it starts.
        self._cursor = ReplyCursor()
        self._epochs = EpochWatch()  # which dataset of Redis our requests were queued in
        self._policy_checked = False
        # Models whose last send was fully accepted (see queueing.outbox). Written by
        # whoever sends, read by submit(); a set's add/discard/in are atomic under the GIL.
        self._flowing: set[str] = set()
        self._connect()

    def _connect(self) -> None:
        """Open the connections (a subclass's): called last by ``__init__``."""
        raise NotImplementedError

    @property
    def pending(self) -> int:
        """How many requests this client is still waiting for."""
        with self._lock:
            return len(self._pending)

    # --- the table of waiting futures ---------------------------------------------------

    def _track(self, futures: Iterable[F]) -> None:
        with self._lock:
            for future in futures:
                self._pending[future.request_id] = future

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._pending.pop(request_id, None)

    def _fail_all(self, error: Callable[[str], RequestError]) -> int:
        """Fail every waiting future with ``error(request_id)``; returns how many."""
        with self._lock:
            waiting, self._pending = self._pending, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(error(future.request_id))
        return len(waiting)

    # --- requests -----------------------------------------------------------------------

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
        trace = current_traceparent()  # the producer's span, if it records one
        return [
            wire.encode_request_body(
                model, item, deadline_ms=deadline_ms, keep_s=keep_s, traceparent=trace
            )
            for item in inputs
        ]

    def _outgoing(
        self,
        model: str,
        inputs: Sendable,
        future: F,
        *,
        deadline: float | None,
        keep: bool,
        keep_ttl_s: int | None,
    ) -> Outgoing[F]:
        """One request for the sender, encoded now: the caller may reuse its arrays as soon
        as ``submit()`` returns."""
        deadline_ms = None if deadline is None else max(0, int(deadline * 1000))
        keep_s = (keep_ttl_s or self.result_ttl_s) if keep else 0
        body = wire.encode_request_body(model, inputs, deadline_ms=deadline_ms, keep_s=keep_s)
        return Outgoing(model, future, body, deadline_ms, keep_s)

    def _live_groups(
        self, items: Sequence[Outgoing[F]]
    ) -> Iterator[tuple[str, list[F], list[bytes]]]:
        """What a sender sends of ``items``: per model (one round trip each), the futures
        not done (cancelled) meanwhile, and their bodies as of now."""
        now = time.monotonic()
        for model, group in by_model(items).items():
            live = [item for item in group if not item.future.done()]
            if live:
                yield model, [item.future for item in live], [item.body_now(now) for item in live]

    def _send_failed(self, model: str, futures: list[F], error: Exception) -> None:
        """A send of ``futures`` raised: the error goes to the futures, the sender lives on."""
        if not isinstance(error, RequestError):
            log.exception("sending %d requests of model %r failed", len(futures), model)
        self._fail_unsent(model, futures, error)

    def _fail_items(self, items: list[Outgoing[F]], error: Exception) -> None:
        """A sender's bug: every item it took fails with ``error``."""
        for model, group in by_model(items).items():
            self._fail_unsent(model, [item.future for item in group], error)

    def _fail_unsent(self, model: str, futures: Iterable[F], error: BaseException) -> None:
        """The sender could not queue ``futures``: each fails with its own copy of the
        typed error (``error`` itself when it is not a RequestError)."""
        self._flowing.discard(model)
        for future in futures:
            self._forget(future.request_id)
            if isinstance(error, RequestError):
                mine: BaseException = type(error)(str(error), request_id=future.request_id)
                mine.__cause__ = error.__cause__
            else:
                mine = error
            _fail(future, mine)

    @contextlib.contextmanager
    def _typed_errors(self, model: str) -> Iterator[None]:
        """Redis errors while enqueueing, as the typed errors a producer expects."""
        try:
            yield
        except connection.REDIS_ERRORS as e:
            typed = enqueue.as_request_error(e, model, self._safe_url)
            if typed is None:
                raise
            raise typed from e

    def _settle(self, model: str, futures: Sequence[F], queued: enqueue.Queued) -> None:
        """After a round trip: fail with QueueFull the futures of requests the queue had no
        room for (entry 0), tag the others with the epoch they were queued in, and fail
        with RequestLost those queued in a Redis the reply reader already saw replaced."""
        refused = False
        with self._lock:
            for future in futures:
                future.queued_in = queued.epoch
            gone = queued.epoch in self._epochs.retired
        for future, entry_id in zip(futures, queued.entries, strict=True):
            if entry_id == 0:
                refused = True
                self._forget(future.request_id)
                _fail(
                    future,
                    QueueFull(f"queue of model {model!r} is full", request_id=future.request_id),
                )
            elif gone:
                self._forget(future.request_id)
                _fail(future, _lost(future.request_id))
        if refused:
            self._flowing.discard(model)
        else:
            self._flowing.add(model)

    # --- results ------------------------------------------------------------------------

    def _unavailable(self, error: redis.RedisError) -> Unavailable:
        return Unavailable(f"cannot reach Redis at {self._safe_url}: {error}")

    @staticmethod
    def _timeout(request_id: str, timeout: float) -> RequestTimeout:
        return RequestTimeout(
            f"no result for request {request_id} within {timeout:g}s", request_id=request_id
        )

    def _resolve_all(self, replies: Iterable[bytes]) -> None:
        """Results from the reply stream, to their futures."""
        for data in replies:
            self._resolve(data)

    def _resolve(self, data: bytes) -> None:
        result = self._decode(data)
        if result is None:
            return
        with self._lock:
            future = self._pending.pop(result.request_id, None)
        if future is None or future.done():
            self.duplicates_ignored += 1  # a repeat after a worker crash, or a timed-out one
            return
        if result.error is not None:
            future.set_exception(result.error)
        else:
            # Before set_result: whoever the result wakes sees the version that made it.
            future.model_version = result.version
            future.set_result(result.outputs)

    def _after_reconnect(self, epoch: str | None, policy: str | None) -> None:
        """After (re)connecting, with what Redis said of its epoch and eviction policy (None:
        not readable). If Redis lost its data since we last looked (restarted without
        persistence, flushed), the requests it held will never be answered: fail them with
        RequestLost rather than let them wait for their timeouts. Only those: requests
        already queued in the Redis that replaced it wait on (see ``EpochWatch.gone``).
        Warns, once, of an evicting Redis."""
        if not self._policy_checked and policy is not None:
            self._policy_checked = True
            problem = eviction_problem(policy)
            if problem:
                log.warning("%s; requests may vanish", problem)
        with self._lock:
            changed = self._epochs.lost(epoch)
            if epoch is None:
                return
            gone = [f for f in self._pending.values() if self._epochs.gone(f.queued_in, changed)]
            for future in gone:
                del self._pending[future.request_id]
        if changed:
            self._cursor = ReplyCursor()  # a new reply stream, whose ids start anywhere
        for future in gone:
            _fail(future, _lost(future.request_id))
        if gone:
            log.warning("Redis lost its data: %d waiting requests were lost", len(gone))

    @staticmethod
    def _decode(data: bytes) -> wire.Result | None:
        """A result from the reply stream; None (logged) for one that cannot be read."""
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


def _lost(request_id: str) -> RequestLost:
    return RequestLost(
        "Redis lost its data (restarted without persistence, or flushed) while the"
        " request waited; submit it again",
        request_id=request_id,
    )


def _fail(future: RequestFutureLike, error: BaseException) -> None:
    """Fail ``future`` unless its owner cancelled it (setting a cancelled future raises)."""
    if not future.done():
        future.set_exception(error)


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

    def next_read(self, conn: Any, reply_key: str) -> Any:
        """The reader's next round trip on ``conn`` (sync or asyncio), not yet executed:
        drop what the client holds, then wait for more. Its last reply is the XREAD's,
        for :meth:`take`."""
        pipe = conn.pipeline(transaction=False)
        if self.trim_below is not None:
            pipe.xtrim(reply_key, minid=self.trim_below, approximate=False)
        pipe.xread({reply_key: self.last}, count=READ_COUNT, block=int(READ_BLOCK_S * 1000))
        return pipe

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
        # Every field of an entry is a result (see keys.result_fields).
        found = (data for _, fields in entries for data in fields.values())
        return [data for data in found if data]  # b"": close()'s wake-up call
