"""``Client.stream``: frames in, results out in input order, with a window of them in
flight.

A feeder thread pulls and sends the frames, so that a result is yielded as soon as it is
in, not when the source (a camera: one frame per 1/fps) next has a frame. A frame that
fails yields its error in its place, so a stream never stalls on one frame.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, cast

from queueing.errors import RequestError
from queueing.wire import Outputs, Sendable

if TYPE_CHECKING:
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
