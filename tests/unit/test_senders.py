"""The sync client's sender (queueing.senders.SenderThread): what a caller may send on its
own thread, and that nothing overtakes or is lost when it does."""

from __future__ import annotations

import threading

from queueing.outbox import Outgoing
from queueing.senders import SenderThread


def _item(n: int) -> Outgoing[int]:
    return Outgoing("m", n, b"", None, 0)


class Recorder:
    """A send that records which thread sent what, and can be held mid-send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[int]]] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()
        self._active = 0
        self.most_at_once = 0  # sends under way at the same time, at most
        self._lock = threading.Lock()

    def send(self, items: list[Outgoing[int]]) -> None:
        with self._lock:
            self._active += 1
            self.most_at_once = max(self.most_at_once, self._active)
        self.entered.set()
        self.release.wait(10)
        self.sent.append((threading.current_thread().name, [i.future for i in items]))
        with self._lock:
            self._active -= 1


def test_an_idle_sender_lets_the_caller_send_on_its_own_thread() -> None:
    recorder = Recorder()
    sender: SenderThread[int] = SenderThread(recorder.send, lambda items, e: None, name="snd")
    sender.start()
    assert sender.send_inline(_item(1))
    assert recorder.sent == [(threading.current_thread().name, [1])]
    sender.stop(timeout=5)


def test_while_a_caller_sends_the_others_wait_for_the_thread_in_order() -> None:
    recorder = Recorder()
    sender: SenderThread[int] = SenderThread(recorder.send, lambda items, e: None, name="snd")
    sender.start()
    recorder.release.clear()
    inline = threading.Thread(target=sender.send_inline, args=(_item(1),), name="caller")
    inline.start()
    assert recorder.entered.wait(10)
    assert not sender.send_inline(_item(2))  # a send is under way: not on this thread
    sent = sender.put(_item(2))
    assert sent is not None
    sender.put(_item(3))
    assert not sent.wait(0.2)  # the thread does not send beside the caller's send
    recorder.release.set()
    inline.join(10)
    assert sent.wait(10)
    assert recorder.sent == [("caller", [1]), ("snd", [2, 3])]
    assert recorder.most_at_once == 1
    sender.stop(timeout=5)


def test_a_caller_does_not_send_past_requests_already_waiting() -> None:
    recorder = Recorder()
    sender: SenderThread[int] = SenderThread(recorder.send, lambda items, e: None, name="snd")
    sent = sender.put(_item(1))  # the thread is not started: it waits
    assert sent is not None
    assert not sender.send_inline(_item(2))
    sender.put(_item(2))
    sender.start()
    assert sent.wait(10)
    sender.stop(timeout=5)
    assert recorder.sent == [("snd", [1, 2])]


def test_a_send_that_raises_fails_the_caller_s_request() -> None:
    failed: list[tuple[list[int], str]] = []

    def broken(items: list[Outgoing[int]]) -> None:
        raise ValueError("a bug")

    sender: SenderThread[int] = SenderThread(
        broken, lambda items, e: failed.append(([i.future for i in items], str(e))), name="snd"
    )
    sender.start()
    assert sender.send_inline(_item(7))
    assert failed == [([7], "a bug")]
    assert sender.send_inline(_item(8))  # and the sender is free again
    sender.stop(timeout=5)


def test_a_stopped_sender_sends_nothing_inline() -> None:
    recorder = Recorder()
    sender: SenderThread[int] = SenderThread(recorder.send, lambda items, e: None, name="snd")
    sender.start()
    sender.stop(timeout=5)
    assert not sender.send_inline(_item(1))
    assert recorder.sent == []
