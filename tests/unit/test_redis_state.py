"""The I/O-free decisions about Redis: eviction policy, lost data, where a reply reader
is in its stream."""

from __future__ import annotations

from queueing.base import ReplyCursor
from queueing.redis_state import SENDING, EpochWatch, eviction_problem


def test_only_noeviction_is_safe() -> None:
    assert eviction_problem("noeviction") is None
    assert eviction_problem(None) is None  # unreadable: nothing to say
    for policy in ("allkeys-lru", "volatile-lru", "allkeys-random", "volatile-ttl"):
        problem = eviction_problem(policy)
        assert problem is not None and policy in problem and "noeviction" in problem


def test_epoch_change_means_the_data_was_lost() -> None:
    watch = EpochWatch()
    assert not watch.lost("a")  # the first one read: nothing to compare with
    assert not watch.lost("a")  # a reconnect to a Redis that kept its data
    assert not watch.lost(None)  # could not read it: decides nothing
    assert watch.lost("b")  # a new dataset
    assert not watch.lost("b")


def test_only_requests_queued_in_the_old_dataset_are_gone() -> None:
    watch = EpochWatch()
    watch.lost("a")
    assert not any(watch.gone(tag, changed=False) for tag in ("a", None, SENDING))
    changed = watch.lost("b")
    assert watch.retired == {"a"}
    assert watch.gone("a", changed)  # queued in the Redis that is gone
    assert not watch.gone("b", changed)  # queued in the new one before the reader looked
    assert watch.gone(None, changed)  # unknown (a cluster): might have been in the old one
    assert not watch.gone(SENDING, changed)  # decided when its round trip returns
    # A reconnect that finds the same dataset loses nothing of unknown epoch.
    assert not watch.lost("b") and not watch.gone(None, changed=False)
    assert watch.gone("a", changed=False)  # but an old request found late is still gone


def test_reply_cursor_trims_only_what_it_has_read() -> None:
    cursor = ReplyCursor()
    assert cursor.last == b"0-0" and cursor.trim_below is None
    assert cursor.take(None) == [] and cursor.take([]) == []
    reply = [[b"k", [(b"5-0", {b"0": b"one", b"1": b"two"}), (b"5-1", {b"0": b""}),
                    (b"7-3", {b"0": b"three"})]]]  # fmt: skip
    assert cursor.take(reply) == [b"one", b"two", b"three"]  # b"": close()'s wake-up call
    assert cursor.last == b"7-3"
    assert cursor.trim_below == b"7-4"  # MINID keeps ids >= this: everything read goes
    assert cursor.take([[b"k", []]]) == []
    assert cursor.last == b"7-3"
