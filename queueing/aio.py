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
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from queueing import connection, enqueue, keys, liveness, redis_state, wire
from queueing.base import READ_BLOCK_S, READ_COUNT, ClientBase
from queueing.errors import RequestError
from queueing.outbox import Outbox, Outgoing, by_model
from queueing.scripts import ENQUEUE, ROOM
from queueing.wire import Outputs, Sendable

log = logging.getLogger(__name__)


class AsyncRequestFuture(asyncio.Future):  # type: ignore[type-arg]
    """An :class:`asyncio.Future` for one request; ``request_id`` names it."""

    request_id: str
    model: str = ""
    #: The version of the model that answered (set with the result).
    model_version: int | None = None


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
        # submit()'s requests wait here for the sender task (see queueing.outbox); one
        # loop runs both, so no lock. Each batch's future is done once it has been sent.
        self._outbox: Outbox[AsyncRequestFuture, asyncio.Future[None]] = Outbox(
            lambda: asyncio.get_running_loop().create_future()
        )
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        # On a cluster: plain clients to single nodes, for writes followed by a WAIT.
        self._nodes = connection.NodeClients(
            self.redis_url, {"socket_timeout": self.socket_timeout_s}
        )

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
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(
                self._send_loop(), name=f"tfpool-sender-{self.client_id[:12]}"
            )
        sent = self._outbox.put(item)
        self._wake.set()
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
                entry_ids = await self._enqueue(model, [f.request_id for f in futures], bodies)
        except BaseException:
            for future in futures:
                self._forget(future.request_id)
            raise
        self._settle(model, futures, entry_ids)
        return futures

    async def wait(self, future: AsyncRequestFuture, *, timeout: float = 30.0) -> Outputs:
        """The outputs of ``future`` or its error; RequestTimeout after ``timeout``. If the
        caller is cancelled, so is the future, and it leaves the client's table."""
        try:
            outputs: Outputs = await asyncio.wait_for(asyncio.shield(future), timeout)
            return outputs
        except asyncio.TimeoutError:
            raise await liveness.timeout_error_async(
                self._redis, future.model, future.request_id, timeout
            ) from None
        finally:
            if not future.done():
                # Timed out or cancelled: nobody will read it now. Out of the table at once
                # (the future's own callback would only run on the loop's next turn).
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
        slots = asyncio.Semaphore(window)
        sent: asyncio.Queue[AsyncRequestFuture | BaseException | None] = asyncio.Queue()

        async def feed() -> None:
            try:
                source = _aiter(frames)
                while True:
                    await slots.acquire()  # a free place in the window, then a frame
                    try:
                        frame = await anext(source)
                    except StopAsyncIteration:
                        break
                    (future,) = await self.submit_many(model, [frame], deadline=deadline)
                    sent.put_nowait(future)
                sent.put_nowait(None)
            except Exception as e:  # the source's own error, raised to the consumer
                sent.put_nowait(e)

        feeder = asyncio.create_task(feed())
        try:
            while (item := await sent.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield await self._outcome(item, timeout)
                slots.release()  # the consumer is done with that frame
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
            while not sent.empty():  # sent, never to be read: no future left behind
                item = sent.get_nowait()
                if isinstance(item, AsyncRequestFuture):
                    self._forget(item.request_id)

    async def close(self) -> None:
        """Stop the reply reader, fail what is pending, close the connections."""
        if self._closed:
            return
        self._closed = True
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.wait({self._sender}, timeout=self.socket_timeout_s + 1)
        _, unsent = self._outbox.take()
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

    async def _send_loop(self) -> None:
        """The sender task: take everything waiting, send it, repeat. Started by the first
        submit(), it starts the reader before its first send (one look at Redis, however
        many tasks submitted at once)."""
        await self._start_reader()
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            items, sent = self._outbox.take()
            try:
                await self._send(items)
            except Exception as e:  # a bug here must not strand every later request
                log.exception("sender: sending %d requests failed", len(items))
                for model, group in by_model(items).items():
                    self._fail_unsent(model, [item.future for item in group], e)
            finally:
                if sent is not None and not sent.done():
                    sent.set_result(None)

    async def _send(self, items: list[Outgoing[AsyncRequestFuture]]) -> None:
        """One round trip per model for ``items``; failures land on their futures."""
        now = time.monotonic()
        for model, group in by_model(items).items():
            live = [item for item in group if not item.future.done()]  # not cancelled
            if not live:
                continue
            futures = [item.future for item in live]
            ids = [future.request_id for future in futures]
            try:
                with self._typed_errors(model):
                    entry_ids = await self._enqueue(
                        model, ids, [item.body_now(now) for item in live]
                    )
            except Exception as e:  # the sender must live on: the error goes to the futures
                if not isinstance(e, RequestError):
                    log.exception("sending %d requests of model %r failed", len(futures), model)
                self._fail_unsent(model, futures, e)
                continue
            self._settle(model, futures, entry_ids)

    def _forget_if_cancelled(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            self._forget(cast(AsyncRequestFuture, future).request_id)

    async def _enqueue(self, model: str, ids: list[str], bodies: list[bytes]) -> list[Any]:
        """As :meth:`queueing.Client._enqueue_all`: the entry ids (0: no room)."""
        try:
            return await self._enqueue_once(model, ids, bodies)
        except connection.REDIS_ERRORS:
            # As Client: a cluster's topology may have changed; look again.
            await connection.refresh_async(self._redis)
            raise

    async def _enqueue_once(self, model: str, ids: list[str], bodies: list[bytes]) -> list[Any]:
        if not enqueue.is_large(bodies):
            calls = enqueue.script_calls(model, ids, self.reply_key, bodies)
            replies = await self._run_scripts(self._enqueue_sha, ENQUEUE, calls)
            return [entry for chunk in replies for entry in chunk]
        room_calls = [enqueue.room_call(model, len(bodies))]
        (room,) = await self._run_scripts(self._room_sha, ROOM, room_calls)
        if not room:
            return [0] * len(bodies)
        pipe, replicas = self._nodes.pipeline(self._redis, keys.stream(model))
        self._fill_xadds(pipe, model, ids[:room], bodies[:room], replicas)
        added = self._replies(await pipe.execute(), replicas)
        return added + [0] * (len(bodies) - room)

    async def _run_scripts(self, sha: str, script: str, calls: list[list[Any]]) -> list[Any]:
        """As :meth:`queueing.Client._run_scripts`."""
        for attempt in (1, 2, 3):
            pipe, replicas = self._nodes.pipeline(self._redis, calls[0][0])
            self._fill_scripts(pipe, sha, calls, replicas)
            try:
                return self._replies(await pipe.execute(), replicas)
            except redis.exceptions.NoScriptError:
                if attempt == 3:
                    raise
                await self._redis.script_load(script)
            except redis.ResponseError as e:
                if attempt == 3 or not connection.moving(e):
                    raise
                await connection.refresh_async(self._redis)
        raise AssertionError("unreachable")

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
                # One round trip: drop what we hold, wait for more.
                pipe = self._reader_redis.pipeline(transaction=False)
                if self._cursor.trim_below is not None:
                    pipe.xtrim(self.reply_key, minid=self._cursor.trim_below, approximate=False)
                pipe.xread(
                    {self.reply_key: self._cursor.last},
                    count=READ_COUNT,
                    block=int(READ_BLOCK_S * 1000),
                )
                batch = self._cursor.take((await pipe.execute())[-1])
                backoff = 0.05
            except connection.REDIS_ERRORS as e:
                if self._closed:
                    return
                log.warning("reply reader: %s; retrying in %.2fs", e, backoff)
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


async def _aiter(frames: Iterable[Sendable] | AsyncIterable[Sendable]) -> AsyncIterator[Sendable]:
    if isinstance(frames, AsyncIterable):
        async for frame in frames:
            yield frame
    else:
        for frame in frames:
            yield frame
