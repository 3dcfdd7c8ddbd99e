"""The metrics a worker records and the figures derived from them (no Redis, no TF)."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest

from queueing.errors import (
    DeadLettered,
    DeadlineExceeded,
    InvalidInput,
    ModelError,
    RequestError,
)
from workers.config import PoolConfig
from workers.metrics import (
    OUTCOMES,
    SECONDS_BUCKETS,
    Histogram,
    LaneRecorder,
    Layout,
    Rates,
    Recorder,
    Snapshot,
    Window,
    drain_seconds,
    outcome,
)
from workers.supervisor import model_layouts


def recorder(max_batch_size: int = 8) -> Recorder:
    layout = Layout.for_config(PoolConfig(model="m.keras", max_batch_size=max_batch_size))
    return Recorder(layout, [0.0] * layout.size)


def snapshot(r: Recorder) -> Snapshot:
    return Snapshot.read(r.layout, r.cells)


def test_layout_gives_every_figure_its_own_cells() -> None:
    layout = Layout.for_config(PoolConfig(model="m.keras", max_batch_size=12))
    assert layout.batch_buckets == (1.0, 2.0, 4.0, 8.0, 12.0)
    cells = [*range(len(OUTCOMES)), layout.rows, layout.batches, layout.gpu_memory]
    for name in ("batch_rows", "queue_wait_seconds", "compute_seconds", "request_seconds"):
        start = layout.histogram(name)
        cells += range(start, start + len(layout.bounds(name)) + 2)  # buckets, +Inf, sum
    assert sorted(cells) == list(range(layout.size))


def test_batches_and_answers_land_in_their_buckets() -> None:
    r = recorder()
    r.batch_done(3, 0.004, [0.0005, 0.02, 100.0])
    r.batch_done(8, 0.5, [0.001])
    r.answered([("ok", 0.002), ("ok", 0.002), ("invalid_input", 0.0001), ("dead_lettered", 75)])
    s = snapshot(r)
    assert s.rows == 11 and s.batches == 2
    assert [s.requests(o) for o in OUTCOMES] == [2, 1, 0, 0, 1]
    rows = s.histogram("batch_rows")
    assert rows.cumulative() == [("1.0", 0), ("2.0", 0), ("4.0", 1), ("8.0", 2), ("+Inf", 2)]
    assert rows.sum == 11
    wait = s.histogram("queue_wait_seconds")
    assert wait.count == 4 and wait.sum == pytest.approx(100.0215)
    # A value on a bound counts in that bound's bucket (le is "less or equal").
    assert dict(wait.cumulative())["0.0005"] == 1
    assert dict(wait.cumulative())["60.0"] == 3  # 100 s only under +Inf
    request = s.histogram("request_seconds")
    assert request.count == 4 and dict(request.cumulative())["0.0025"] == 3


def test_a_disabled_recorder_records_nothing() -> None:
    r = recorder()
    r.enabled = False
    r.batch_done(3, 0.1, [0.1])
    r.answered([("ok", 0.1)])
    assert not any(r.cells[i] for i in range(r.layout.size))


def test_answers_from_two_threads_are_all_counted() -> None:
    r = recorder()

    def answer() -> None:
        for _ in range(2000):
            r.answered([("ok", 0.001)])

    threads = [threading.Thread(target=answer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert snapshot(r).requests("ok") == 8000
    assert snapshot(r).histogram("request_seconds").count == 8000


def test_lanes_count_their_own_model_and_add_to_the_slots_shared_cells() -> None:
    slot = recorder(max_batch_size=8)
    layout = Layout.for_config(PoolConfig(model="m.keras", max_batch_size=32))
    a, b = LaneRecorder(layout, slot=slot), LaneRecorder(layout, slot=slot)

    def run(lane: Recorder) -> None:
        for _ in range(2000):
            lane.batch_done(20, 0.001, [0.001])
            lane.answered(iter([("ok", 0.002)]))  # an iterable read once

    threads = [threading.Thread(target=run, args=(lane,)) for lane in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert snapshot(a).batches == 2000 and snapshot(a).requests("ok") == 2000
    assert snapshot(a).histogram("batch_rows").cumulative()[-2] == ("32.0", 2000)
    # The slot's layout stops at 8 rows: its own bounds place the 20-row batches.
    assert snapshot(slot).batches == 4000 and snapshot(slot).rows == 80_000
    assert snapshot(slot).histogram("batch_rows").cumulative()[-2:] == [("8.0", 0), ("+Inf", 4000)]
    assert snapshot(slot).requests("ok") == 4000


def test_a_lane_given_its_models_shared_cells_counts_there_and_its_window_reads_them() -> None:
    slot = recorder(max_batch_size=8)
    layout = Layout.for_config(PoolConfig(model="m.keras", max_batch_size=16))
    shared = [0.0] * layout.size  # what the supervisor made for this model in this slot
    shared[OUTCOMES.index("ok")] = 5.0  # counted by the slot's previous process
    lane = LaneRecorder(layout, slot=slot, cells=shared)
    window = Window()
    window.figures(snapshot(lane), now=0.0)
    lane.batch_done(12, 0.002, [0.001, 0.001])
    lane.answered([("ok", 0.003), ("invalid_input", 0.001)])
    assert lane.cells is shared
    model = Snapshot.read(layout, shared)
    assert (model.requests("ok"), model.requests("invalid_input")) == (6, 1)
    assert (model.rows, model.batches) == (12, 1)
    assert model.histogram("batch_rows").cumulative()[-2:] == [("16.0", 1), ("+Inf", 1)]
    figures = window.figures(snapshot(lane), now=2.0)  # this process's own, not before
    assert figures["requests"]["ok"] == 1 and figures["requests"]["invalid_input"] == 1
    assert snapshot(slot).requests("ok") == 1 and snapshot(slot).rows == 12


def test_a_repository_pools_models_each_get_a_layout_from_their_own_settings(
    tmp_path: Path,
) -> None:
    for name in ("b", "a", ".hidden"):
        (tmp_path / name).mkdir()
    config = PoolConfig(model_repo=str(tmp_path), max_batch_size=8,
                        models={"b": {"max_batch_size": 6, "buckets": [2, 6]}})  # fmt: skip
    layouts = model_layouts(config)
    assert list(layouts) == ["a", "b"]
    assert layouts["a"].batch_buckets == (1.0, 2.0, 4.0, 8.0)
    assert layouts["b"].batch_buckets == (2.0, 6.0)
    assert model_layouts(PoolConfig(model="m.keras")) == {}


@pytest.mark.parametrize(
    ("error", "dead", "label"),
    [
        (None, False, "ok"),
        (InvalidInput("x"), False, "invalid_input"),
        (DeadlineExceeded("x"), False, "deadline_exceeded"),
        (ModelError("x"), False, "model_error"),
        (DeadLettered("x"), True, "dead_lettered"),
        (None, True, "dead_lettered"),  # no readable id: nothing sent, still set aside
    ],
)
def test_outcome_labels(error: RequestError | None, dead: bool, label: str) -> None:
    assert outcome(error, dead=dead) == label


def test_quantiles_interpolate_within_buckets_as_histogram_quantile_does() -> None:
    h = Histogram((1.0, 2.0, 4.0), (10.0, 0.0, 10.0, 0.0), 0.0)
    assert h.quantile(0.25) == pytest.approx(0.5)  # half-way into the first bucket
    assert h.quantile(0.5) == pytest.approx(1.0)
    assert h.quantile(0.75) == pytest.approx(3.0)  # half-way from 2 to 4
    beyond = Histogram((1.0, 2.0), (0.0, 1.0, 9.0), 0.0)
    assert beyond.quantile(0.99) == 2.0  # in +Inf: the highest finite bound
    assert Histogram((1.0,), (0.0, 0.0), 0.0).quantile(0.5) is None


def test_the_window_covers_the_last_minute_and_sums_over_workers() -> None:
    r = recorder()
    window = Window(span_s=60)
    window.figures(snapshot(r), now=0.0)
    r.answered([("ok", 0.003)] * 30)
    r.batch_done(6, 0.01, [0.003] * 6)
    window.figures(snapshot(r), now=30.0)
    r.answered([("ok", 0.003)] * 30 + [("model_error", 0.003)] * 6)
    r.batch_done(6, 0.01, [0.003] * 6)
    early = window.figures(snapshot(r), now=60.0)
    assert early["seconds"] == 60 and early["requests"]["ok"] == 60
    r.answered([("ok", 0.003)] * 30)
    late = window.figures(snapshot(r), now=90.0)  # the start moves up to t=30
    assert late["seconds"] == 60 and late["requests"]["ok"] == 60
    assert late["requests"]["model_error"] == 6 and late["batches"] == 1

    rates = Rates.of([early, late, {"seconds": 0}])  # a worker with nothing yet: skipped
    assert rates.requests_per_s == pytest.approx((66 + 66) / 60)
    assert rates.by_outcome["model_error"] == pytest.approx(12 / 60)
    assert rates.mean_batch == pytest.approx(6.0)
    wait = rates.queue_wait
    assert wait.count == 18 and wait.bounds == SECONDS_BUCKETS
    assert 0.0025 < (wait.quantile(0.99) or 0) <= 0.005


def test_drain_time() -> None:
    assert drain_seconds(0, 0.0) == 0.0
    assert drain_seconds(100, 50.0) == 2.0
    assert math.isinf(drain_seconds(1, 0.0))  # a backlog nobody drains: scale up
