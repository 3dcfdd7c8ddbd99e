"""The waiter a blocking ``predict()`` call waits on (queueing.waiter)."""

from __future__ import annotations

import threading

import pytest

from queueing.errors import QueueFull
from queueing.waiter import CallWaiter


def test_a_result_set_by_another_thread_wakes_the_caller() -> None:
    waiter = CallWaiter("r-1", "m")
    setter = threading.Timer(0.05, waiter.set_result, args=("out",))
    setter.start()
    assert waiter.result(timeout=10) == "out"
    assert waiter.done() and waiter.exception() is None
    assert waiter.result(timeout=0) == "out"  # again, at once


def test_no_outcome_within_the_timeout_is_a_timeout_error() -> None:
    waiter = CallWaiter("r-1", "m")
    with pytest.raises(TimeoutError):
        waiter.result(timeout=0.01)
    assert not waiter.done()


def test_the_first_outcome_wins_and_a_second_is_ignored() -> None:
    waiter = CallWaiter("r-1", "m")
    error = QueueFull("full", request_id="r-1")
    waiter.set_exception(error)
    waiter.set_result("late")  # a result racing the failure: ignored, no error
    waiter.set_exception(QueueFull("again", request_id="r-1"))
    with pytest.raises(QueueFull) as raised:
        waiter.result(timeout=0)
    assert raised.value is error
    assert waiter.exception() is error


def test_outcomes_racing_from_many_threads_settle_it_once() -> None:
    raised: list[BaseException] = []
    for _ in range(200):
        waiter = CallWaiter("r-1", "m")
        start = threading.Barrier(4)

        def settle(value: int, w: CallWaiter = waiter, s: threading.Barrier = start) -> None:
            s.wait()
            try:
                w.set_result(value)
            except BaseException as e:  # a second release of the lock: RuntimeError
                raised.append(e)

        threads = [threading.Thread(target=settle, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert waiter.result(timeout=0) in range(4)  # exactly one won
    assert raised == []
