"""The benchmark's floor of each way of calling (workers.bench.floor)."""

from __future__ import annotations

import numpy as np
import pytest

from workers.bench import floor


@pytest.mark.parametrize(("call", "concurrency"), [("many", 64), ("submit", 64), ("threads", 8),
                                                   ("tasks", 100), ("threads", 1)])  # fmt: skip
def test_each_way_of_calling_is_served_and_measured(call: str, concurrency: int) -> None:
    measured = floor.measure(call, concurrency, 0.2, np.zeros(4, np.float32))
    assert (measured.call, measured.concurrency) == (call, concurrency)
    assert measured.requests_per_s > 0
    assert measured.cpu_us_per_request > 0


def test_the_ceiling_is_what_the_extra_cpu_per_request_leaves() -> None:
    many = floor.Floor("many", 512, 100_000.0, 5.0)
    threads = floor.Floor("threads", 64, 50_000.0, 17.0)
    assert floor.ceiling(76.0, many, threads) == pytest.approx(76 / (76 + 12))
    cheaper = floor.Floor("tasks", 1000, 400_000.0, 2.0)
    assert floor.ceiling(76.0, many, cheaper) == 1.0  # calls cheaper than submit_many's
