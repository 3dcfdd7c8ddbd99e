"""The batcher's closing rules, on a clock the test moves by hand."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import pytest

from workers.batcher import Batcher, default_buckets


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass(eq=False)
class Req:
    name: str
    rows: int = 1
    group: Hashable = "g"
    arrival: float = 100.0
    deadline: float | None = None


def make(max_rows: int = 4, latency: float = 0.010, **kw: object) -> tuple[Batcher[Req], FakeClock]:
    clock = FakeClock()
    return Batcher(max_rows=max_rows, max_latency_s=latency, clock=clock, **kw), clock  # type: ignore[arg-type]


def names(batch: object) -> list[tuple[str, int, int]]:
    return [(p.item.name, p.start, p.stop) for p in batch.parts]  # type: ignore[attr-defined]


def test_closes_when_full() -> None:
    b, _ = make()
    for i in range(3):
        b.add(Req(f"r{i}"))
    assert b.next_batch() is None
    b.add(Req("r3"))
    batch = b.next_batch()
    assert batch is not None and batch.rows == 4 and batch.padded_rows == 4
    assert [n for n, _, _ in names(batch)] == ["r0", "r1", "r2", "r3"]
    assert len(b) == 0


def test_closes_when_oldest_waited_the_budget_from_its_arrival() -> None:
    b, clock = make(latency=0.5)  # times exact in binary: no rounding at the boundary
    # Arrived 0.375 s before the worker read it: only 0.125 s of budget are left.
    b.add(Req("old", arrival=clock.now - 0.375))
    assert b.next_batch() is None
    assert b.next_due() == clock.now + 0.125
    clock.now += 0.0625
    assert b.next_batch() is None
    clock.now += 0.0625
    batch = b.next_batch()
    assert batch is not None and names(batch) == [("old", 0, 1)]


def test_empty_queue_closes_at_once_instead_of_waiting_for_company() -> None:
    b, _ = make()
    b.add(Req("lone"))
    assert b.next_batch() is None
    b.queue_empty = True
    batch = b.next_batch()
    assert batch is not None and batch.rows == 1 and batch.padded_rows == 1


def test_shapes_are_never_mixed_and_the_oldest_group_goes_first() -> None:
    b, clock = make()
    b.add(Req("a1", group="A", arrival=clock.now - 0.001))
    b.add(Req("b1", group="B", arrival=clock.now - 0.002))
    b.add(Req("a2", group="A"))
    b.queue_empty = True
    first = b.next_batch()
    second = b.next_batch()
    assert first is not None and second is not None
    assert [n for n, _, _ in names(first)] == ["b1"]
    assert [n for n, _, _ in names(second)] == ["a1", "a2"]
    assert b.next_batch() is None


def test_rows_are_counted_and_big_requests_split_across_batches() -> None:
    b, _ = make(max_rows=4)
    b.add(Req("small", rows=3))
    b.add(Req("big", rows=6))
    assert b.rows_waiting == 9
    first = b.next_batch()
    assert first is not None and names(first) == [("small", 0, 3), ("big", 0, 1)]
    second = b.next_batch()
    assert second is not None and names(second) == [("big", 1, 5)]
    assert b.rows_waiting == 1
    b.queue_empty = True
    third = b.next_batch()
    assert third is not None and names(third) == [("big", 5, 6)] and third.padded_rows == 1


def test_batches_are_padded_to_the_smallest_bucket() -> None:
    b, _ = make(max_rows=8, buckets=[2, 8])
    b.queue_empty = True
    for rows, padded in ((1, 2), (2, 2), (3, 8), (8, 8)):
        b.add(Req("r", rows=rows))
        batch = b.next_batch()
        assert batch is not None and (batch.rows, batch.padded_rows) == (rows, padded)


def test_default_buckets() -> None:
    assert default_buckets(1) == [1]
    assert default_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert default_buckets(24) == [1, 2, 4, 8, 16, 24]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        Batcher(max_rows=0, max_latency_s=0.01)
    with pytest.raises(ValueError, match="reach 8"):
        Batcher(max_rows=8, max_latency_s=0.01, buckets=[1, 4])


def test_expired_requests_are_dropped_before_running_but_not_half_run_ones() -> None:
    b, clock = make(max_rows=2)
    b.add(Req("split", rows=3, deadline=clock.now + 0.001))
    b.add(Req("late", deadline=clock.now + 0.001))
    b.add(Req("fine", deadline=clock.now + 10))
    b.add(Req("none"))
    first = b.next_batch()  # full: starts "split"
    assert first is not None and names(first) == [("split", 0, 2)]
    clock.now += 0.002
    expired = b.pop_expired()
    assert [r.name for r in expired] == ["late"]
    b.queue_empty = True
    rest = b.next_batch()
    assert rest is not None and names(rest) == [("split", 2, 3), ("fine", 0, 1)]
    assert b.rows_waiting == 1
