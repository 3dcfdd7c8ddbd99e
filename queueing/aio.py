"""The asyncio producer: :class:`AsyncClient`, for services (redis.asyncio underneath).

Same requests, results and errors as :class:`queueing.Client`. One reply reader task per
client resolves futures by request id; one sender task sends what concurrent ``submit()``
calls have left waiting in one round trip (:mod:`queueing.outbox`). A caller cancelled
while it awaits a result takes its future out of the client's table with it: nothing is
left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from queueing import connection, keys, liveness, redis_state, wire
from queueing.base import READ_BLOCK_S, ClientBase, retry_log_level
from queueing.enqueuer import AsyncEnqueuer
from queueing.errors import RequestError
from queueing.frames import frames_in_order_async
from queueing.outbox import Outgoing
from queueing.senders import SenderTask
from queueing.wire import Outputs, Sendable

log = logging.getLogger(__name__)


class _WaitTimedOut(Exception):
    """What :meth:`AsyncClient.wait`'s timer fails a future with (never seen outside)."""


def _time_out(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(_WaitTimedOut())


class AsyncRequestFuture(asyncio.Future):  # type: ignore[type-arg]
    """An :class:`asyncio.Future` for one request; ``request_id`` names it."""

    request_id: str
    model: str = ""
    #: The version of the model that answered (set with the result).
    model_version: int | None = None
    #: The epoch of the Redis it was queued in (see queueing.redis_state.EpochWatch).
    queued_in: str | None = redis_state.SENDING


class AsyncClient(ClientBase[AsyncRequestFuture]):
    """A producer's asyncio connection to the pool, with the arguments of
    :class:`queueing.Client`. Create it inside the running loop; use
    ``async with AsyncClient(url) as client:`` or ``await client.close()``."""

    def _connect(self) -> None:
        self._redis = connection.connect_async(self.redis_url, socket_timeout=self.socket_timeout_s)
        self._reader_redis = connection.connect_async(
            self.redis_url, socket_timeout=READ_BLOCK_S + self.socket_timeout_s
        )
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        # submit()'s requests wait for the sender task (see queueing.outbox). It starts
        # the reader before its first send.
        self._sender = SenderTask(self._send, self._fail_items,
                                  name=f"tfpool-sender-{self._id_prefix}",
                                  before=self._start_reader)  # fmt: skip
        # On a cluster: plain clients to single nodes, for writes followed by a WAIT.
        self._nodes = connection.NodeClients(
            self.redis_url, {"socket_timeout": self.socket_timeout_s}
        )
        self._enqueuer = AsyncEnqueuer(self._redis, self._nodes, self.reply_key)

    async def predict(
        self, model: str, inputs: Sendable, *, timeout: float = 30.0, deadline: float | None = None
    ) -> Outputs:
        """As :meth:`queueing.Client.predict`."""
        future = await self.submit(model, inputs, deadline=deadline)
        return await self.wait(future, timeout=timeout)

    async def submit(
        self,
        model: str,
        inputs: Sendable,
        *,
        deadline: float | None = None,
        keep: bool = False,
        keep_ttl_s: int | None = None,
    ) -> AsyncRequestFuture:
        """Queue one request; raises QueueFull / UnknownModel / Unavailable at once.

        Requests submitted close together (many tasks) are coalesced: the client's sender
        task sends everything waiting in one round trip, and each ``submit()`` returns
        once its own round trip is done. A lone request is sent at once."""
        if self._closed:
            raise RuntimeError("client is closed")
        future = self._new_future(model)
        item = self._outgoing(
            model, inputs, future, deadline=deadline, keep=keep, keep_ttl_s=keep_ttl_s
        )
        self._track([future])
        sent = self._sender.put(item)
        try:
            await asyncio.shield(sent)
        except asyncio.CancelledError:
            future.cancel()  # it may have been sent: its result is then dropped
            raise
        if future.done() and not future.cancelled() and future.exception() is not None:
            raise cast(BaseException, future.exception())
        return future

    async def submit_many(
        self,
        model: str,
        inputs: Iterable[Sendable],
        *,
        deadline: float | None = None,
        keep: bool = False,
        keep_ttl_s: int | None = None,
    ) -> list[AsyncRequestFuture]:
        """Queue many requests in one round trip; QueueFull lands on the futures."""
        if self._closed:
            raise RuntimeError("client is closed")
        bodies = self._bodies(model, inputs, deadline=deadline, keep=keep, keep_ttl_s=keep_ttl_s)
        futures = [self._new_future(model) for _ in bodies]
        self._track(futures)
        await self._start_reader()
        try:
            with self._typed_errors(model):
                queued = await self._enqueuer.enqueue(
                    model, [f.request_id for f in futures], bodies
                )
        except BaseException:
            for future in futures:
                self._forget(future.request_id)
            raise
        self._settle(model, futures, queued)
        return futures

    async def wait(self, future: AsyncRequestFuture, *, timeout: float = 30.0) -> Outputs:
        """The outputs of ``future`` or its error; RequestTimeout after ``timeout``. If the
        caller is cancelled, so is the future, and it leaves the client's table."""
        # One timer that fails the future, rather than wait_for(shield(future)): those
        # make two more futures, a task's worth of callbacks and a timer per call, a
        # large part of what 1,000 tasks calling predict() cost the producer.
        timer = asyncio.get_running_loop().call_later(timeout, _time_out, future)
        try:
            outputs: Outputs = await future  # a cancelled caller cancels the future
            return outputs
        except _WaitTimedOut:
            self._forget(future.request_id)  # a late result is dropped
            raise await liveness.timeout_error_async(
                self._redis, future.model, future.request_id, timeout
            ) from None
        finally:
            timer.cancel()
            if future.done() and not future.cancelled():
                future.exception()  # retrieved (a timeout racing a cancelled caller)
            elif not future.done():
                # Cancelled: nobody will read it now. Out of the table at once (the
                # future's own callback would only run on the loop's next turn).
                self._forget(future.request_id)
                future.cancel()

    async def result(self, request_id: str, *, timeout: float = 30.0) -> Outputs:
        """As :meth:`queueing.Client.result`: a kept result, from any process."""
        key = keys.kept_result(request_id)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while True:
            wait_s: Any = min(max(give_up - loop.time(), 0.01), 5.0)
            try:
                data = await self._reader_redis.blmove(key, key, wait_s, "LEFT", "LEFT")
            except (redis.ConnectionError, redis.TimeoutError) as e:
                raise self._unavailable(e) from e
            if data is not None:
                return self._unwrap(wire.decode_result(cast(bytes, data)))
            if loop.time() >= give_up:
                raise self._timeout(request_id, timeout)

    async def result_version(self, request_id: str) -> int | None:
        """As :meth:`queueing.Client.result_version`."""
        try:
            data = await self._redis.lindex(keys.kept_result(request_id), 0)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise self._unavailable(e) from e
        return None if data is None else wire.decode_result(cast(bytes, data)).version

    async def stream(
        self,
        model: str,
        frames: Iterable[Sendable] | AsyncIterable[Sendable],
        *,
        window: int = 8,
        deadline_ms: float | None = None,
        timeout: float = 30.0,
    ) -> AsyncIterator[Outputs | RequestError]:
        """As :meth:`queueing.Client.stream`: results in order, failed frames as errors.
        ``frames`` may also be an async iterable (an async camera, say): a feeder task
        pulls and sends them, so a result is yielded as soon as it is in."""
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        deadline = None if deadline_ms is None else deadline_ms / 1000
        async for outcome in frames_in_order_async(
            self, model, frames, window=window, deadline=deadline, timeout=timeout
        ):
            yield outcome

    async def close(self) -> None:
        """Stop the reply reader, fail what is pending, close the connections."""
        if self._closed:
            return
        self._closed = True
        unsent = await self._sender.stop(timeout=self.socket_timeout_s + 1)
        if self._reader is not None:
            # The reader sees the flag within one XREAD timeout. It is also cancelled; but
            # redis-py may turn the cancellation of a blocking read into a connection
            # error, so the flag is what ends it, and the wait here is bounded either way.
            self._reader.cancel()
            await asyncio.wait({self._reader}, timeout=READ_BLOCK_S + 1)
        self._fail_all(lambda request_id: RequestError("client closed", request_id=request_id))
        if unsent is not None and not unsent.done():
            unsent.set_result(None)
        await self._redis.aclose()
        await self._reader_redis.aclose()
        await self._nodes.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- internals ----------------------------------------------------------------------

    async def _outcome(self, future: AsyncRequestFuture, timeout: float) -> Outputs | RequestError:
        try:
            return await self.wait(future, timeout=timeout)
        except RequestError as e:
            return e

    def _new_future(self, model: str) -> AsyncRequestFuture:
        future = AsyncRequestFuture(loop=asyncio.get_running_loop())
        future.request_id = self._new_id()
        future.model = model
        # A future cancelled by its owner leaves the table at once.
        future.add_done_callback(self._forget_if_cancelled)
        return future

    async def _start_reader(self) -> None:
        """The reply reader, started before the first request is queued."""
        if self._reader is None:
            # Learn which Redis this is before the first request is queued (see
            # Client._ensure_reader); should it not answer, the reader looks later.
            with contextlib.suppress(redis.RedisError):
                await self._look(self._redis)
        self._ensure_reader()

    async def _send(self, items: list[Outgoing[AsyncRequestFuture]]) -> None:
        """The sender task's work: one round trip per model for ``items``."""
        for model, futures, bodies in self._live_groups(items):
            try:
                with self._typed_errors(model):
                    ids = [future.request_id for future in futures]
                    queued = await self._enqueuer.enqueue(model, ids, bodies)
            except Exception as e:
                self._send_failed(model, futures, e)
                continue
            self._settle(model, futures, queued)

    def _forget_if_cancelled(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            self._forget(cast(AsyncRequestFuture, future).request_id)

    def _ensure_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(
                self._read_replies(), name=f"tfpool-replies-{self.client_id[:12]}"
            )

    async def _read_replies(self) -> None:
        backoff = 0.05
        reconnected = True  # look at Redis again before the first read
        while not self._closed:
            try:
                if reconnected:
                    await self._look(self._reader_redis)
                    reconnected = False
                pipe = self._cursor.next_read(self._reader_redis, self.reply_key)
                batch = self._cursor.take((await pipe.execute())[-1])
                backoff = 0.05
            except connection.REDIS_ERRORS as e:
                if self._closed:
                    return
                log.log(retry_log_level(backoff), "reply reader: %s; retrying in %.2fs", e, backoff)
                reconnected = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            self._resolve_all(batch)

    async def _look(self, conn: aioredis.Redis) -> None:
        """As :meth:`queueing.Client._look`."""
        epoch = await redis_state.read_epoch_async(conn)
        policy = None if self._policy_checked else await redis_state.read_policy_async(conn)
        self._after_reconnect(epoch, policy)
