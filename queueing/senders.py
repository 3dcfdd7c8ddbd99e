"""The clients' senders: the one thread (:class:`SenderThread`, for :class:`queueing.Client`)
or task (:class:`SenderTask`, for :class:`queueing.AsyncClient`) that takes everything
``submit()`` calls left in the outbox and sends it, then comes back for more (see
:mod:`queueing.outbox`). What sending means is the client's: ``send`` is handed the items
taken; should it raise (a bug), ``fail`` fails them, and the sender lives on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from queueing.outbox import Outbox, Outgoing

log = logging.getLogger(__name__)

F = TypeVar("F")

#: What a client does with items its sender could not send: fail their futures.
Fail = Callable[[list[Outgoing[F]], Exception], None]


class SenderThread(Generic[F]):
    """Callers :meth:`put`, one thread takes and sends; both under one condition's lock."""

    def __init__(self, send: Callable[[list[Outgoing[F]]], None], fail: Fail[F], name: str):
        self._send, self._fail, self._name = send, fail, name
        # Each batch's Event is set once it has been sent (or failed), for callers that
        # wait to raise at once.
        self._outbox: Outbox[F, threading.Event] = Outbox(threading.Event)
        self._wake = threading.Condition(threading.Lock())
        self._closed = False
        # A send is under way, on the thread or on a caller's (see send_inline).
        self._busy = False
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        """How many requests wait to be taken."""
        with self._wake:
            return len(self._outbox)

    def start(self) -> None:
        """Start the thread (once; the caller serializes)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def put(self, item: Outgoing[F]) -> threading.Event | None:
        """Hand ``item`` over; the Event of the batch it will leave in (None: stopped,
        nobody would send it)."""
        with self._wake:
            if self._closed:
                return None
            sent = self._outbox.put(item)
            self._wake.notify()
            return sent

    def send_inline(self, item: Outgoing[F]) -> bool:
        """Send ``item`` on the caller's thread, if nothing waits and no send is under way
        (a caller that blocks for its answer anyway: a lone ``predict()`` then skips the
        hand-over to the thread); False, doing nothing, otherwise. What callers hand over
        meanwhile waits for the thread, which starts once this send is done."""
        with self._wake:
            if self._closed or self._busy or self._outbox:
                return False
            self._busy = True
        try:
            self._send([item])
        except Exception as e:  # as in the thread: a bug must not strand the caller
            log.exception("sender: sending 1 request failed")
            self._fail([item], e)
        finally:
            with self._wake:
                self._busy = False
                if self._outbox:
                    self._wake.notify()
        return True

    def stop(self, timeout: float) -> threading.Event | None:
        """Stop taking (after this, :meth:`put` takes nothing), wait up to ``timeout`` for a
        send under way; the Event of what was left unsent, for the caller to set once it
        has failed those futures."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        with self._wake:
            _, unsent = self._outbox.take()
        return unsent

    def _loop(self) -> None:
        while True:
            with self._wake:
                while (not self._outbox or self._busy) and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return  # stop()'s caller fails what is left
                items, sent = self._outbox.take()
                self._busy = True
            try:
                self._send(items)
            except Exception as e:  # a bug here must not strand every later request
                log.exception("sender: sending %d requests failed", len(items))
                self._fail(items, e)
            finally:
                with self._wake:
                    self._busy = False
                if sent is not None:
                    sent.set()


class SenderTask(Generic[F]):
    """As :class:`SenderThread`, as an asyncio task: callers and the task share one loop,
    so no lock. ``before`` runs once, before the first send (the client's first look at
    Redis, however many tasks submitted at once)."""

    def __init__(
        self,
        send: Callable[[list[Outgoing[F]]], Awaitable[None]],
        fail: Fail[F],
        name: str,
        before: Callable[[], Awaitable[None]],
    ) -> None:
        self._send, self._fail, self._name, self._before = send, fail, name, before
        self._outbox: Outbox[F, asyncio.Future[None]] = Outbox(
            lambda: asyncio.get_running_loop().create_future()
        )
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def put(self, item: Outgoing[F]) -> asyncio.Future[None]:
        """Hand ``item`` over (starting the task on first use); the future of the batch it
        will leave in."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=self._name)
        sent = self._outbox.put(item)
        self._wake.set()
        return sent

    async def stop(self, timeout: float) -> asyncio.Future[None] | None:
        """Cancel the task, wait up to ``timeout`` for it; the future of what was left
        unsent, for the caller to complete once it has failed those futures."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=timeout)
        _, unsent = self._outbox.take()
        return unsent

    async def _loop(self) -> None:
        await self._before()
        while True:
            await self._wake.wait()
            self._wake.clear()
            items, sent = self._outbox.take()
            try:
                await self._send(items)
            except Exception as e:  # a bug here must not strand every later request
                log.exception("sender: sending %d requests failed", len(items))
                self._fail(items, e)
            finally:
                if sent is not None and not sent.done():
                    sent.set_result(None)
