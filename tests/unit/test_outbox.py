"""The I/O-free parts of coalescing: a held request's deadline, batches and their signal,
grouping by model; and a client refusing to be used across fork."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from queueing import Client, wire
from queueing.outbox import Outbox, Outgoing, by_model


def _item(model: str = "m", deadline_ms: int | None = None, keep_s: int = 0) -> Outgoing[str]:
    body = wire.encode_request_body(
        model, np.arange(3, dtype=np.float32), deadline_ms=deadline_ms, keep_s=keep_s
    )
    return Outgoing(model, "future", body, deadline_ms, keep_s, queued_at=100.0)


@pytest.mark.parametrize("keep_s", [0, 3600])
def test_time_held_is_taken_off_the_deadline(keep_s: int) -> None:
    item = _item(deadline_ms=250, keep_s=keep_s)
    assert item.body_now(100.0) is item.body  # not held: sent as encoded
    later = wire.decode_request_body(item.body_now(100.1))
    assert later.deadline_ms == 150 and later.keep_s == keep_s
    np.testing.assert_array_equal(np.asarray(later.inputs), np.arange(3, dtype=np.float32))
    assert wire.decode_request_body(item.body_now(101.0)).deadline_ms == 0  # past: expires


def test_a_request_without_deadline_is_sent_as_encoded() -> None:
    item = _item()
    assert item.body_now(500.0) is item.body


def test_with_deadline_refuses_a_body_it_does_not_recognise() -> None:
    body = wire.encode_request_body("m", np.zeros(2, np.float32), deadline_ms=10)
    with pytest.raises(ValueError, match="not a request body"):
        wire.with_deadline(body, 11, 0, 5)


def test_a_batch_shares_one_signal_and_the_next_gets_a_new_one() -> None:
    outbox: Outbox[str, threading.Event] = Outbox(threading.Event)
    first = outbox.put(_item("a"))
    assert outbox.put(_item("b")) is first and len(outbox) == 2
    items, signal = outbox.take()
    assert [i.model for i in items] == ["a", "b"] and signal is first and not outbox
    assert outbox.put(_item("a")) is not first
    assert outbox.take()[1] is not first
    assert outbox.take() == ([], None)


def test_groups_by_model_keep_arrival_order() -> None:
    items = [_item(m, deadline_ms=i) for i, m in enumerate("abab")]
    groups = by_model(items)
    assert {m: [i.deadline_ms for i in g] for m, g in groups.items()} == {"a": [0, 2], "b": [1, 3]}


def test_a_client_cannot_be_used_across_fork() -> None:
    client = Client("redis://127.0.0.1:1/0")  # connects lazily: nothing is reached here
    pid = os.fork()
    if pid == 0:  # the child: submit must refuse before any I/O
        try:
            client.submit("m", np.zeros(2, np.float32))
        except RuntimeError as e:
            os._exit(0 if "fork" in str(e) else 2)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
