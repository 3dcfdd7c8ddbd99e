"""The producer side: submit requests, get results back by request id.

One :class:`Client` per producer process (it is thread-safe). It owns one reply stream in
Redis and one background thread that reads it and resolves futures by request id, and a
sender thread that sends whatever ``submit()`` calls have left waiting in one round trip
(:mod:`queueing.outbox`). A result
leaves Redis only after the client holds it, and one that arrives twice (a worker died
between posting it and acking its request; a read repeated after a dropped connection)
finds no future the second time and is dropped: at-least-once delivery, exactly-once
results.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, cast

import redis

from queueing import connection, keys, liveness, redis_state, wire
from queueing.base import (
    DEFAULT_REDIS_URL,
    DEFAULT_RESULT_TTL_S,
    READ_BLOCK_S,
    ClientBase,
    resolve_redis_url,
    retry_log_level,
)
from queueing.enqueuer import Enqueuer
from queueing.errors import RequestError
from queueing.frames import frames_in_order
from queueing.outbox import Outgoing
from queueing.senders import SenderThread
from queueing.waiter import CallWaiter
from queueing.wire import Outputs, Sendable

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_REDIS_URL", "DEFAULT_RESULT_TTL_S", "Client", "RequestFuture",
           "resolve_redis_url"]  # fmt: skip


#: How many times this process's ancestry forked since the module was imported: a client
#: made before a fork sees a different count in the child. (Cheaper per submit() than
#: os.getpid(), a system call.)
_forks_seen = 0


def _count_fork() -> None:
    global _forks_seen
    _forks_seen += 1


os.register_at_fork(after_in_child=_count_fork)


class RequestFuture(Future):  # type: ignore[type-arg]
    """A :class:`concurrent.futures.Future` for one request; ``request_id`` names it."""

    def __init__(self, request_id: str, model: str = "") -> None:
        super().__init__()
        self.request_id = request_id
        self.model = model
        #: The version of the model that answered (set with the result; None before, or
        #: from a pool that does not say).
        self.model_version: int | None = None
        #: The epoch of the Redis it was queued in (see queueing.redis_state.EpochWatch).
        self.queued_in: str | None = redis_state.SENDING


#: The signal of a send already done (a request its caller sent itself).
_SENT = threading.Event()
_SENT.set()

#: What the client waits on: a ``submit()``'s future, or a ``predict()`` call's waiter.
Waitable = RequestFuture | CallWaiter


class Client(ClientBase[Waitable]):
    """A producer's connection to the pool.

    ``Client(redis_url, *, result_ttl_s=3600, socket_timeout_s=10.0, cluster=None)``
    connects lazily (``cluster=True``: ``redis_url`` names a node of a Redis Cluster);
    create it in the process that uses it (after any fork). Use it as a context manager, or
    call :meth:`close`.
    """

    def _connect(self) -> None:
        self._redis = connection.connect(self.redis_url, socket_timeout=self.socket_timeout_s)
        # The reader blocks; it gets its own connection, with a timeout beyond its BLOCK.
        # (Pooled, so it connects lazily and reconnects after an outage.)
        self._reader_redis = connection.connect(
            self.redis_url, socket_timeout=READ_BLOCK_S + self.socket_timeout_s
        )
        self._enqueuer = Enqueuer(self._redis, self.reply_key)
        self._forks = _forks_seen
        self._reader: threading.Thread | None = None
        self._reader_starting = threading.Lock()  # not self._lock: _look() takes that
        self._closed = threading.Event()
        # submit()'s requests wait for the sender thread (see queueing.outbox).
        self._sender = SenderThread(
            self._send, self._fail_items, name=f"tfpool-sender-{self._id_prefix}"
        )

    # --- public API ---------------------------------------------------------------------

    def predict(
        self,
        model: str,
        inputs: Sendable,
        *,
        timeout: float = 30.0,
        deadline: float | None = None,
    ) -> Outputs:
        """Run ``inputs`` through ``model`` and return its output (a dict for several).

        ``inputs`` is an array or a dict of named arrays, with or without a leading batch
        dimension. ``deadline`` (seconds from now): if the request has not started by then,
        it fails with :class:`DeadlineExceeded` and is never run. ``timeout``: how long to
        wait here before :class:`RequestTimeout`.
        """
        waiter = CallWaiter(self._new_id(), model)
        self._hand_over(model, inputs, waiter, deadline=deadline, keep=False, keep_ttl_s=None,
                        inline=True)  # fmt: skip
        return self.wait(waiter, timeout=timeout)

    def submit(
        self,
        model: str,
        inputs: Sendable,
        *,
        deadline: float | None = None,
        keep: bool = False,
        keep_ttl_s: int | None = None,
    ) -> RequestFuture:
        """Queue one request; return its future.

        Requests submitted close together (a loop, many threads) are coalesced: the
        client's sender thread sends everything waiting in one round trip, and a lone
        request is sent at once. ``inputs`` is encoded before this returns.

        ``keep=True`` also keeps the result in Redis under ``future.request_id`` for
        ``keep_ttl_s`` (default: the client's ``result_ttl_s``), so that any process can
        fetch it with :meth:`result`.

        Errors of enqueueing (:class:`QueueFull`, :class:`UnknownModel`,
        :class:`Unavailable`) are raised here for the first request to a model and for
        every request after a refusal: those wait for their own round trip. While a
        model's requests are accepted, ``submit()`` returns without waiting, and a later
        refusal fails the future instead (``future.result()`` raises it).
        """
        future = RequestFuture(self._new_id(), model)
        self._hand_over(model, inputs, future, deadline=deadline, keep=keep,
                        keep_ttl_s=keep_ttl_s)  # fmt: skip
        return future

    def _hand_over(
        self,
        model: str,
        inputs: Sendable,
        future: Waitable,
        *,
        deadline: float | None,
        keep: bool,
        keep_ttl_s: int | None,
        inline: bool = False,
    ) -> None:
        """``submit()``'s work, for a future or a ``predict()`` call's waiter: encode, hand
        to the sender, and wait for the send when the model is not flowing (raising its
        refusal here). ``inline``: the caller waits for its answer anyway, so it sends the
        request itself when the sender has nothing else to send (see
        ``SenderThread.send_inline``)."""
        self._check_usable()
        item = self._outgoing(
            model, inputs, future, deadline=deadline, keep=keep, keep_ttl_s=keep_ttl_s
        )
        self._track([future])
        self._ensure_reader()
        flowing = model in self._flowing
        if inline and self._sender.send_inline(item):
            sent: threading.Event | None = _SENT
        else:
            sent = self._sender.put(item)
        if sent is None:  # closed since _check_usable: nobody would send it
            self._forget(future.request_id)
            raise RuntimeError("client is closed")
        if not flowing:
            sent.wait()  # the sender always sets it, or close() does
            error = future.exception() if future.done() and not future.cancelled() else None
            if error is not None:
                self._forget(future.request_id)
                raise error

    def submit_many(
        self,
        model: str,
        inputs: Iterable[Sendable],
        *,
        deadline: float | None = None,
        keep: bool = False,
        keep_ttl_s: int | None = None,
    ) -> list[RequestFuture]:
        """Queue many requests in one round trip; return their futures in order.

        A request the queue had no room for gets a future that fails with
        :class:`QueueFull`; the others are queued.
        """
        self._check_usable()
        bodies = self._bodies(model, inputs, deadline=deadline, keep=keep, keep_ttl_s=keep_ttl_s)
        futures = [RequestFuture(self._new_id(), model) for _ in bodies]
        self._track(futures)
        self._ensure_reader()
        try:
            self._enqueue_all(model, futures, bodies)
        except BaseException:
            for future in futures:
                self._forget(future.request_id)
            raise
        return futures

    def stream(
        self,
        model: str,
        frames: Iterable[Sendable],
        *,
        window: int = 8,
        deadline_ms: float | None = None,
        timeout: float = 30.0,
    ) -> Iterator[Outputs | RequestError]:
        """Run every frame of ``frames`` (any iterable: a generator over a camera is fine)
        through ``model``; yield the results in input order, with at most ``window``
        frames in flight.

        A frame that fails yields its error *in its place* instead of raising, so a stream
        never stalls on one frame: :class:`DeadlineExceeded` for a frame not started
        within ``deadline_ms`` of being sent (it is never run), :class:`QueueFull` when
        the queue had no room, :class:`RequestTimeout` after ``timeout`` seconds.
        """
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        deadline = None if deadline_ms is None else deadline_ms / 1000
        return frames_in_order(self, model, frames, window=window, deadline=deadline,
                               timeout=timeout)  # fmt: skip

    def result(self, request_id: str, *, timeout: float = 30.0) -> Outputs:
        """The kept result of ``request_id`` (see ``submit(..., keep=True)``), waiting up
        to ``timeout`` seconds for it. Any process may call this, any number of times."""
        key = keys.kept_result(request_id)
        give_up = time.monotonic() + timeout
        while True:
            left = give_up - time.monotonic()
            # BLMOVE from a list to itself waits for the element without removing it.
            # Redis takes fractional seconds; redis-py's stubs say int.
            wait_s: Any = min(max(left, 0.01), 5.0)
            try:
                data = self._redis.blmove(key, key, wait_s, "LEFT", "LEFT")
            except (redis.ConnectionError, redis.TimeoutError) as e:
                raise self._unavailable(e) from e
            if data is not None:
                return self._unwrap(wire.decode_result(cast(bytes, data)))
            if time.monotonic() >= give_up:
                raise self._timeout(request_id, timeout)

    def result_version(self, request_id: str) -> int | None:
        """The model version that made the kept result of ``request_id`` (None: no kept
        result there now, an error, or a pool that does not say). Does not wait."""
        try:
            data = self._redis.lindex(keys.kept_result(request_id), 0)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise self._unavailable(e) from e
        return None if data is None else wire.decode_result(cast(bytes, data)).version

    def wait(self, future: Waitable, *, timeout: float = 30.0) -> Outputs:
        """The outputs of ``future``, or its error; :class:`RequestTimeout` after ``timeout``
        seconds (the request is then forgotten: a late result is dropped)."""
        try:
            outputs: Outputs = future.result(timeout=timeout)
        except FutureTimeout:
            self._forget(future.request_id)
            raise liveness.timeout_error(
                self._redis, future.model, future.request_id, timeout
            ) from None
        return outputs

    def close(self) -> None:
        """Stop the reply reader and close connections. Pending futures fail."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
        # After this, submit() puts nothing more in the outbox.
        unsent = self._sender.stop(timeout=self.socket_timeout_s + 5)
        if self._reader is not None:
            try:  # wake the reader from its XREAD now rather than at its timeout
                self._redis.xadd(self.reply_key, {b"0": b""})
                self._redis.expire(self.reply_key, 60)
            except redis.RedisError:
                pass
            self._reader.join(timeout=READ_BLOCK_S + 5)
        self._fail_all(lambda request_id: RequestError("client closed", request_id=request_id))
        if unsent is not None:
            unsent.set()
        self._redis.close()
        self._reader_redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed.is_set():
            raise RuntimeError("client is closed")
        if _forks_seen != self._forks:
            # A forked child would share the parent's reply stream and steal its results.
            raise RuntimeError("a Client cannot be used across fork; create one per process")

    def _enqueue_all(
        self, model: str, futures: Sequence[Waitable], bodies: Sequence[bytes]
    ) -> None:
        with self._typed_errors(model):
            queued = self._enqueuer.enqueue(model, [f.request_id for f in futures], bodies)
        self._settle(model, futures, queued)

    def _send(self, items: list[Outgoing[Waitable]]) -> None:
        """The sender thread's work: one round trip per model for ``items``."""
        for model, futures, bodies in self._live_groups(items):
            try:
                self._enqueue_all(model, futures, bodies)
            except Exception as e:
                self._send_failed(model, futures, e)

    def _ensure_reader(self) -> None:
        if self._reader is not None:
            return
        with self._reader_starting:
            if self._reader is None:
                # Learn which Redis this is before the first request is queued, so that a
                # restart that loses it, however soon, is told from one that keeps it.
                # (Should Redis not answer, the reader looks when it has connected.)
                with contextlib.suppress(redis.RedisError):
                    self._look(self._redis)
                self._reader = threading.Thread(
                    target=self._read_replies, name=f"tfpool-replies-{self._id_prefix}", daemon=True
                )
                self._reader.start()
                self._sender.start()

    def _read_replies(self) -> None:
        backoff = 0.05
        reconnected = True  # look at Redis again before the first read
        while not self._closed.is_set():
            try:
                if reconnected:
                    self._look(self._reader_redis)
                    reconnected = False
                pipe = self._cursor.next_read(self._reader_redis, self.reply_key)
                batch = self._cursor.take(pipe.execute()[-1])
                backoff = 0.05
            except connection.REDIS_ERRORS as e:
                log.log(retry_log_level(backoff), "reply reader: %s; retrying in %.2fs", e, backoff)
                reconnected = True
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            self._resolve_all(batch)

    def _look(self, conn: redis.Redis) -> None:
        """See :meth:`ClientBase._after_reconnect`. Raises BusyLoadingError while Redis
        loads its data: what it holds is only known after that."""
        epoch = redis_state.read_epoch(conn)
        policy = None if self._policy_checked else redis_state.read_policy(conn)
        self._after_reconnect(epoch, policy)
