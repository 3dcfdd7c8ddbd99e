"""What a blocking ``Client.predict()`` waits on: one raw lock, where a
:class:`concurrent.futures.Future` takes a ``Condition`` (a lock and a list of waiters, a
new lock per wait, and ``notify_all``). With many threads calling ``predict()``, waking
each caller is most of the producer's own cost per request; this is the cheapest
hand-over between two threads that CPython has (see ``scripts/call_floor.py``).

Nobody but the client sees a :class:`CallWaiter`: ``submit()`` still returns a
``RequestFuture``. It has the parts of one that the client uses (``done``, ``result``,
``exception``, ``set_result``, ``set_exception``), and whoever sets it first wins, as with
a future: a second ``set_*`` (a result racing a failure) is ignored.
"""

from __future__ import annotations

import _thread
from typing import Any

from queueing import redis_state


class CallWaiter:
    """One ``predict()`` call's request: ``request_id`` names it, as a future's does."""

    __slots__ = ("_error", "_ready", "_result", "_unset", "model", "model_version",
                 "queued_in", "request_id")  # fmt: skip

    def __init__(self, request_id: str, model: str) -> None:
        self.request_id = request_id
        self.model = model
        self.model_version: int | None = None
        self.queued_in: str | None = redis_state.SENDING
        self._result: Any = None
        self._error: BaseException | None = None
        # Held until the outcome is in: the caller blocks acquiring it.
        self._ready = _thread.allocate_lock()
        self._ready.acquire()
        # One token: the first set_* pops it (list.pop is atomic under the GIL).
        self._unset = [True]

    def done(self) -> bool:
        return not self._unset

    def cancelled(self) -> bool:
        return False  # nobody holds it to cancel it

    def exception(self) -> BaseException | None:
        """The error it failed with (None: a result, or not done yet)."""
        return self._error

    def set_result(self, result: Any) -> None:
        if self._take():
            self._result = result
            self._ready.release()

    def set_exception(self, error: BaseException) -> None:
        if self._take():
            self._error = error
            self._ready.release()

    def result(self, timeout: float | None = None) -> Any:
        """The result, or raise its error; ``TimeoutError`` (what
        ``concurrent.futures.TimeoutError`` is) when none came within ``timeout``."""
        if not self._ready.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            raise TimeoutError
        self._ready.release()  # a second result() call returns at once
        if self._error is not None:
            raise self._error
        return self._result

    def _take(self) -> bool:
        try:
            self._unset.pop()
        except IndexError:
            return False
        return True
