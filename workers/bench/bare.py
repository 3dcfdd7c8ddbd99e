"""The bare model's figures: what the pool is compared with. A tight ``model(batch)`` loop
per worker slot, each in a fresh process with the slot's thread settings, all at once."""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from workers.placement import Slot

_SPAWN = multiprocessing.get_context("spawn")


def measure_bare(
    path: str, slots: Sequence[Slot], buckets: list[int], seconds: float
) -> dict[str, float]:
    """The bare model placed as the pool's workers are: one fresh process per slot, with
    its thread settings, all running tight ``model(batch)`` loops at once. Returns the best
    total rows/s over the buckets, its batch size, and the median one-row call time."""
    out = _SPAWN.Queue()
    barrier = _SPAWN.Barrier(len(slots))
    children = [
        _SPAWN.Process(target=_bare, args=(path, slot, buckets, seconds, barrier, out))
        for slot in slots
    ]
    for child in children:
        child.start()
    results = [out.get(timeout=900) for _ in children]
    for child in children:
        child.join()
    totals = {rows: sum(r["rows_per_s"][rows] for r in results) for rows in buckets}
    best = max(totals, key=lambda rows: totals[rows])
    return {
        "rows_per_s": totals[best],
        "best_batch": best,
        "one_row_ms": statistics.median(r["one_row_ms"] for r in results),
    }


def _bare(
    path: str, slot: Slot, buckets: list[int], seconds: float, barrier: Any, out: Any
) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from workers.model import configure_tensorflow, load_model

    configure_tensorflow(
        intra_op_threads=slot.intra_op_threads, inter_op_threads=slot.inter_op_threads
    )
    model = load_model(path)
    model.warm_up(buckets)
    spec = model.inputs[0]
    rng = np.random.default_rng(0)
    per_bucket = {}
    for rows in buckets:
        batch = {spec.name: rng.standard_normal(spec.example_shape(rows)).astype(spec.dtype)}
        barrier.wait()  # every process measures the same batch size at the same time
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds or calls < 3:
            model(batch)
            calls += 1
        per_bucket[rows] = calls * rows / elapsed
    barrier.wait()
    one = {spec.name: np.zeros(spec.example_shape(1), spec.dtype)}
    times = []
    for _ in range(200):
        started = time.perf_counter()
        model(one)
        times.append(time.perf_counter() - started)
    out.put({"rows_per_s": per_bucket, "one_row_ms": statistics.median(times) * 1000})
