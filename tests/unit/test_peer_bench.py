"""scripts/peer_bench.py's own arithmetic and table, without PyPI, Redis or TensorFlow
(the script itself installs service-streamer from PyPI: run it by hand, see its docstring)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from scripts.peer_bench import (
    PEER,
    Comparison,
    figures_of,
    median,
    parse_args,
    render,
    to_json,
)
from workers.bench import Figures


def bare(rows_per_s: float = 100_000.0) -> Figures:
    return Figures(
        scenario="mlp-threads-64",
        model="mlp",
        load="closed",
        layout="1x2",
        bare_layout="2x1",
        bare_rows_per_s=rows_per_s,
        bare_best_batch=128,
        bare_one_row_ms=0.2,
    )


def ours(requests_per_s: float) -> Figures:
    f = bare()
    f.requests_per_s = f.rows_per_s = requests_per_s
    f.ratio = requests_per_s / f.bare_rows_per_s
    return f


def test_a_producers_result_becomes_the_figures_tfpool_bench_prints() -> None:
    # 1,000 answers in a 4 s window, 1..1000 ms apart; 2 s of producer CPU.
    result: dict[str, Any] = {
        "latencies": [i / 1000 for i in range(1000, 0, -1)],
        "errors": 3,
        "cpu": 2.0,
    }
    f = figures_of(
        f"{PEER} mlp-threads-64",
        "mlp",
        result,
        window=4.0,
        cpu={"workers": 1.0, "redis": 0.5},
        batches=(1000, 40),
        bare=bare(500.0),
    )

    assert (f.requests, f.errors) == (1000, 3)
    assert f.requests_per_s == f.rows_per_s == 250.0
    assert (f.p50_ms, f.p90_ms, f.p99_ms, f.max_ms) == pytest.approx((501, 901, 991, 1000))
    assert f.mean_batch == 25.0
    assert f.cpu_split_us == pytest.approx({"producers": 2000, "workers": 1000, "redis": 500})
    assert f.cpu_us_per_request == pytest.approx(3500)
    assert f.ratio == 0.5  # of the bare model's rows/s, measured in the same run
    assert (f.bare_rows_per_s, f.bare_best_batch) == (500.0, 128)
    assert (f.layout, f.bare_layout) == ("1x2", "2x1")  # tfpool's, and the best bare one


def test_no_answers_in_the_window_is_a_row_of_zeros_not_an_error() -> None:
    f = figures_of(
        "x",
        "mlp",
        {"latencies": [], "errors": 64, "cpu": 1.0},
        window=4.0,
        cpu={},
        batches=(0, 0),
        bare=bare(),
    )
    assert (f.requests_per_s, f.p99_ms, f.errors) == (0.0, 0.0, 64)


def test_the_table_gives_tfpool_over_service_streamer_per_model() -> None:
    theirs = figures_of(
        f"{PEER} mlp-threads-64",
        "mlp",
        {"latencies": [0.03] * 8000, "errors": 0, "cpu": 1.0},
        window=4.0,
        cpu={},
        batches=(8000, 125),
        bare=bare(),
    )
    table = render([Comparison(ours(40_000.0), theirs, [19.0, 20.0, None])])

    assert f"{PEER} mlp-threads-64" in table.splitlines()[2]
    assert (
        f"mlp: tfpool / {PEER} = 20.00x req/s (40,000 / 2,000; per pair of runs 19.00x,"
        f" 20.00x, -); of bare: tfpool 0.400, {PEER} 0.020"
    ) in table
    assert "calls alone" not in table  # no floor measured


def test_the_table_gives_the_floor_of_the_calls_against_service_streamer() -> None:
    theirs = figures_of(
        f"{PEER} mlp-threads-64",
        "mlp",
        {"latencies": [0.03] * 8000, "errors": 0, "cpu": 1.0},
        window=4.0,
        cpu={},
        batches=(8000, 125),
        bare=bare(),
    )
    mine = ours(10_000.0)
    mine.floor_requests_per_s = 30_000.0
    table = render([Comparison(mine, theirs, [5.0])])
    assert f"the calls alone (no Redis, no model) reach 30,000 req/s: 15.00x {PEER}" in table


def test_a_peer_that_answered_nothing_has_no_ratio_in_the_table_or_the_json() -> None:
    theirs = figures_of(
        "x",
        "mlp",
        {"latencies": [], "errors": 0, "cpu": 0.0},
        window=4.0,
        cpu={},
        batches=(0, 0),
        bare=bare(),
    )
    comparison = Comparison(ours(1000.0), theirs, [None])
    assert f"tfpool / {PEER} = - req/s" in render([comparison])

    def strict(constant: str) -> None:
        raise AssertionError(f"not JSON: {constant}")

    (entry,) = json.loads(to_json([comparison]), parse_constant=strict)
    assert entry["tfpool_over_peer"] is None
    assert entry["tfpool_over_peer_per_run"] == [None]
    assert entry["tfpool"]["requests_per_s"] == 1000.0


def test_the_median_run_is_the_middle_one_by_rows_per_second() -> None:
    runs = [ours(3.0), ours(1.0), ours(2.0)]
    assert median(runs) is runs[2]


def test_arguments() -> None:
    args = parse_args([])
    assert (args.model, args.runs, args.seconds, args.peer_batch_size) == (
        ["mlp", "mobilenet"],
        1,
        4.0,
        0,
    )
    assert parse_args(["--model", "mobilenet", "--runs", "3"]).model == ["mobilenet"]
    for wrong in (["--runs", "0"], ["--seconds", "0"], ["--model", "resnet"]):
        with pytest.raises(SystemExit):
            parse_args(wrong)
