"""Worker layouts on the CPU, chosen by measurement (``workers = "auto"``): which layouts of
processes x intra-op threads to try on this machine, and which one to keep. Pure
functions of figures: the measuring, in fresh processes, is :mod:`workers.probe`'s.

Why measure rather than rule: a small model barely uses a second intra-op thread (its
matrices are too small to split), so two one-thread processes serve twice what one
two-thread process does; a convolutional network splits well, and one process per core
then only multiplies memory. Which holds for a given model and machine is cheap to try
(about a second per layout) and costly to guess wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from workers.placement import Slot

#: Most layouts tried: on many cores, the powers of two between one process and one per
#: core are thinned to this many (both ends kept).
MAX_LAYOUTS = 5


@dataclass(frozen=True, slots=True, order=True)
class WorkerLayout:
    """``processes`` CPU workers with ``threads`` intra-op threads each."""

    processes: int
    threads: int

    def slots(self, inter_op_threads: int = 1) -> list[Slot]:
        """The workers to start for this layout."""
        return [Slot(i, None, self.threads, inter_op_threads) for i in range(self.processes)]

    def __str__(self) -> str:
        return f"{self.processes}x{self.threads}"


def candidate_layouts(cores: int, limit: int = MAX_LAYOUTS) -> list[WorkerLayout]:
    """Every layout that uses exactly ``cores`` cores with a power-of-two number of
    processes, and one process per core: 1x2 and 2x1 on 2 cores; 1x12, 2x6, 4x3 and 12x1
    on 12. More than ``limit`` are thinned evenly, keeping 1xN and Nx1."""
    counts = {cores}
    power = 1
    while power < cores:
        if cores % power == 0:
            counts.add(power)
        power *= 2
    ordered = sorted(counts)
    if len(ordered) > limit:
        step = (len(ordered) - 1) / (limit - 1)
        ordered = sorted({ordered[round(i * step)] for i in range(limit)})
    return [WorkerLayout(p, cores // p) for p in ordered]


@dataclass(frozen=True)
class LayoutFigures:
    """What one layout's bare model did: rows/s by batch size, summed over its processes
    running at once, and the median one-row call time (0 when not measured)."""

    layout: WorkerLayout
    rows_per_s: Mapping[int, float]
    one_row_ms: float = 0.0

    @property
    def best_batch(self) -> int:
        """The batch size with the most rows/s (the smaller one on a tie)."""
        return max(sorted(self.rows_per_s), key=lambda rows: self.rows_per_s[rows])

    @property
    def best_rows_per_s(self) -> float:
        return self.rows_per_s[self.best_batch]

    def describe(self) -> str:
        """One log line: the layout, its rows/s at every batch size, its best."""
        sizes = ", ".join(f"{b}: {r:,.0f}" for b, r in sorted(self.rows_per_s.items()))
        return (
            f"layout {self.layout} ({_processes(self.layout)}): rows/s by batch size {sizes};"
            f" best {self.best_rows_per_s:,.0f} at {self.best_batch}"
        )


def choose_layout(figures: Sequence[LayoutFigures]) -> tuple[LayoutFigures, str]:
    """The layout with the most rows/s at its best batch size (on a tie, fewer processes:
    less memory), and why, in words for the log."""
    if not figures:
        raise ValueError("no layout was measured")
    ranked = sorted(figures, key=lambda f: (-f.best_rows_per_s, f.layout.processes))
    best = ranked[0]
    why = f"{best.best_rows_per_s:,.0f} rows/s at batch {best.best_batch}"
    if len(ranked) == 1:
        return best, f"{why}, the only layout that fits"
    runner_up = ranked[1]
    margin = best.best_rows_per_s / runner_up.best_rows_per_s if runner_up.best_rows_per_s else 0
    gain = f"{margin:.2f}x" if margin else "more than"
    return best, (
        f"{why}, {gain} the next best ({runner_up.layout}: {runner_up.best_rows_per_s:,.0f}"
        f" rows/s at batch {runner_up.best_batch})"
    )


def _processes(layout: WorkerLayout) -> str:
    plural = "es" if layout.processes > 1 else ""
    threads = "s" if layout.threads > 1 else ""
    return f"{layout.processes} process{plural} x {layout.threads} intra-op thread{threads}"
