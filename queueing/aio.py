"""The asyncio producer: :class:`AsyncClient`, for services (redis.asyncio underneath).

Same requests, results and errors as :class:`queueing.Client`. One reply reader task per
client resolves futures by request id. A caller cancelled while it awaits a result takes
its future out of the client's table with it: nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from queueing import enqueue, keys, liveness, redis_state, wire
from queueing.base import READ_BLOCK_S, READ_COUNT, ClientBase
from queueing.errors import RequestError
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
        self._redis = aioredis.Redis.from_url(self.redis_url, socket_timeout=self.socket_timeout_s)
        self._reader_redis = aioredis.Redis.from_url(
            self.redis_url, socket_timeout=READ_BLOCK_S + self.socket_timeout_s
        )
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

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
        """Queue one request; raises QueueFull / UnknownModel / Unavailable at once."""
        (future,) = await self.submit_many(
            model, [inputs], deadline=deadline, keep=keep, keep_ttl_s=keep_ttl_s
        )
        if future.done() and future.exception() is not None:
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
        loop = asyncio.get_running_loop()
        futures = []
        for _ in bodies:
            future = AsyncRequestFuture(loop=loop)
            future.request_id = self._new_id()
            future.model = model
            # A future cancelled by its owner leaves the table at once.
            future.add_done_callback(self._forget_if_cancelled)
            futures.append(future)
        self._track(futures)
        if self._reader is None:
            # Learn which Redis this is before the first request is queued (see
            # Client._ensure_reader); should it not answer, the reader looks later.
            with contextlib.suppress(redis.RedisError):
                await self._look(self._redis)
        self._ensure_reader()
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
        if self._reader is not None:
            # The reader sees the flag within one XREAD timeout. It is also cancelled; but
            # redis-py may turn the cancellation of a blocking read into a connection
            # error, so the flag is what ends it, and the wait here is bounded either way.
            self._reader.cancel()
            await asyncio.wait({self._reader}, timeout=READ_BLOCK_S + 1)
        self._fail_all(lambda request_id: RequestError("client closed", request_id=request_id))
        await self._redis.aclose()
        await self._reader_redis.aclose()

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

    def _forget_if_cancelled(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            self._forget(cast(AsyncRequestFuture, future).request_id)

    async def _enqueue(self, model: str, ids: list[str], bodies: list[bytes]) -> list[Any]:
        """As :meth:`queueing.Client._enqueue_all`: the entry ids (0: no room)."""
        if not enqueue.is_large(bodies):
            calls = enqueue.script_calls(model, ids, self.reply_key, bodies)
            replies = await self._run_scripts(self._enqueue_sha, ENQUEUE, calls)
            return [entry for chunk in replies for entry in chunk]
        room_calls = [enqueue.room_call(model, len(bodies))]
        (room,) = await self._run_scripts(self._room_sha, ROOM, room_calls)
        pipe = self._redis.pipeline(transaction=False)
        self._fill_xadds(pipe, model, ids[:room], bodies[:room])
        added: list[Any] = await pipe.execute() if room else []
        return added + [0] * (len(bodies) - room)

    async def _run_scripts(self, sha: str, script: str, calls: list[list[Any]]) -> list[Any]:
        for attempt in (1, 2):
            pipe = self._redis.pipeline(transaction=False)
            self._fill_scripts(pipe, sha, calls)
            try:
                replies: list[Any] = await pipe.execute()
                return replies
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                await self._redis.script_load(script)
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
            except redis.RedisError as e:
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
