"""Choosing the worker layout by measurement (``workers = "auto"``): which layouts are
tried, which is kept, and which pools measure at all. Figures are given: no processes."""

from __future__ import annotations

import pytest

from workers.config import PoolConfig
from workers.layouts import LayoutFigures, WorkerLayout, candidate_layouts, choose_layout
from workers.placement import Slot, plan
from workers.probe import why_not_measure


def _names(cores: int) -> list[str]:
    return [str(layout) for layout in candidate_layouts(cores)]


def test_candidates_use_every_core_with_power_of_two_processes_and_one_per_core() -> None:
    assert _names(1) == ["1x1"]
    assert _names(2) == ["1x2", "2x1"]
    assert _names(6) == ["1x6", "2x3", "6x1"]
    assert _names(8) == ["1x8", "2x4", "4x2", "8x1"]
    assert _names(12) == ["1x12", "2x6", "4x3", "12x1"]
    for cores in range(1, 130):
        layouts = candidate_layouts(cores)
        assert all(layout.processes * layout.threads == cores for layout in layouts)
        assert layouts[0] == WorkerLayout(1, cores) and layouts[-1] == WorkerLayout(cores, 1)


def test_many_cores_keep_the_list_short() -> None:
    assert _names(64) == ["1x64", "4x16", "8x8", "16x4", "64x1"]
    assert len(candidate_layouts(1024)) == 5


def test_a_layout_places_its_processes_with_its_threads() -> None:
    assert WorkerLayout(2, 3).slots(inter_op_threads=1) == [Slot(0, None, 3, 1),
                                                           Slot(1, None, 3, 1)]  # fmt: skip


def _figures(processes: int, threads: int, **rows_per_s: float) -> LayoutFigures:
    by_batch = {int(k.removeprefix("b")): v for k, v in rows_per_s.items()}
    return LayoutFigures(WorkerLayout(processes, threads), by_batch)


def test_the_layout_with_most_rows_per_s_at_its_best_batch_size_is_chosen() -> None:
    # 1x2 is faster at batch 1, 2x1 at its best size: the best sizes decide.
    one = _figures(1, 2, b1=9_000, b32=120_000)
    two = _figures(2, 1, b1=5_000, b32=100_000, b64=150_000)
    best, why = choose_layout([one, two])
    assert best is two and two.best_batch == 64
    assert why == (
        "150,000 rows/s at batch 64, 1.25x the next best (1x2: 120,000 rows/s at batch 32)"
    )
    assert choose_layout([two, one])[0] is two  # whatever the order measured


def test_a_tie_goes_to_fewer_processes_and_a_lone_layout_is_said_so() -> None:
    one, two = _figures(1, 2, b8=1000), _figures(2, 1, b8=1000)
    assert choose_layout([two, one])[0] is one
    assert choose_layout([one]) == (one, "1,000 rows/s at batch 8, the only layout that fits")
    with pytest.raises(ValueError, match="no layout"):
        choose_layout([])


def test_the_best_batch_size_is_the_smaller_one_on_a_tie() -> None:
    assert _figures(1, 1, b4=500, b8=500, b2=100).best_batch == 4


def test_describe_says_every_batch_size_and_the_best() -> None:
    line = _figures(2, 1, b1=2_582, b32=79_179).describe()
    assert line == (
        "layout 2x1 (2 processes x 1 intra-op thread): rows/s by batch size 1: 2,582,"
        " 32: 79,179; best 79,179 at 32"
    )


def test_only_workers_auto_on_the_cpu_of_one_model_measures() -> None:
    auto = PoolConfig(model="m.keras")
    assert auto.workers == "auto"
    cpu = plan(auto, gpus=[], cores=2)
    assert why_not_measure(auto, cpu, cores=2) is None
    # A number of workers (0 too: the fixed default) or GPUs: no question, nothing logged.
    for workers in (0, 1, 3):
        config = PoolConfig(model="m.keras", workers=workers)
        assert why_not_measure(config, plan(config, gpus=[], cores=2), cores=2) == ""
    assert why_not_measure(auto, plan(auto, gpus=["0"], cores=2), cores=2) == ""
    # Cases where auto keeps the default, saying why.
    repo = PoolConfig(model_repo="models")
    assert "model repository" in str(why_not_measure(repo, cpu, cores=2))
    threads = PoolConfig(model="m.keras", intra_op_threads=2)
    assert "intra_op_threads" in str(why_not_measure(threads, cpu, cores=2))
    assert "one core" in str(why_not_measure(auto, plan(auto, gpus=[], cores=1), cores=1))
