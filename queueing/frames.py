"""``Client.stream`` and ``AsyncClient.stream``: frames in, results out in input order,
with a window of them in flight.

A feeder thread pulls and sends the frames, so that a result is yielded as soon as it is
in, not when the source (a camera: one frame per 1/fps) next has a frame. A frame that
fails yields its error in its place, so a stream never stalls on one frame.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING, cast

from queueing.errors import RequestError
from queueing.wire import Outputs, Sendable

if TYPE_CHECKING:
    from queueing.aio import AsyncClient, AsyncRequestFuture
    from queueing.client import Client, RequestFuture

_END = object()  # the end of a stream's frames


def frames_in_order(
    client: Client,
    model: str,
    frames: Iterable[Sendable],
    *,
    window: int,
    deadline: float | None,
    timeout: float,
) -> Iterator[Outputs | RequestError]:
    """The results of ``frames`` through ``model``, in input order, each within
    ``timeout`` seconds of its turn; at most ``window`` frames sent and not yet yielded."""
    slots = threading.Semaphore(window)
    sent: queue.Queue[RequestFuture | BaseException | None] = queue.Queue()
    stop = threading.Event()

    def feed() -> None:
        try:
            source = iter(frames)
            while True:
                while not slots.acquire(timeout=0.1):  # a free place in the window
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                frame = next(source, _END)
                if frame is _END:
                    break
                (future,) = client.submit_many(model, [cast(Sendable, frame)], deadline=deadline)
                sent.put(future)
            sent.put(None)
        except BaseException as e:  # the source's own error, raised to the consumer
            sent.put(e)

    feeder = threading.Thread(target=feed, name="tfpool-stream-feeder", daemon=True)
    feeder.start()
    try:
        while (item := sent.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            try:
                yield client.wait(item, timeout=timeout)
            except RequestError as e:
                yield e
            slots.release()  # the consumer is done with that frame
    finally:
        stop.set()
        slots.release()  # a feeder waiting for a place sees the stop at once
        while not sent.empty():  # sent, never to be read: no future left behind
            item = sent.get_nowait()
            if not isinstance(item, BaseException) and item is not None:
                client._forget(item.request_id)  # the package's own helper


async def frames_in_order_async(
    client: AsyncClient,
    model: str,
    frames: Iterable[Sendable] | AsyncIterable[Sendable],
    *,
    window: int,
    deadline: float | None,
    timeout: float,
) -> AsyncIterator[Outputs | RequestError]:
    """As :func:`frames_in_order`, for ``AsyncClient.stream``: ``frames`` may also be an
    async iterable; a feeder task pulls and sends them."""
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
                (future,) = await client.submit_many(model, [frame], deadline=deadline)
                sent.put_nowait(future)
            sent.put_nowait(None)
        except Exception as e:  # the source's own error, raised to the consumer
            sent.put_nowait(e)

    feeder = asyncio.create_task(feed())
    try:
        while (item := await sent.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield await client._outcome(item, timeout)
            slots.release()  # the consumer is done with that frame
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        while not sent.empty():  # sent, never to be read: no future left behind
            item = sent.get_nowait()
            if item is not None and not isinstance(item, BaseException):
                client._forget(item.request_id)


async def _aiter(frames: Iterable[Sendable] | AsyncIterable[Sendable]) -> AsyncIterator[Sendable]:
    if isinstance(frames, AsyncIterable):
        async for frame in frames:
            yield frame
    else:
        for frame in frames:
            yield frame
