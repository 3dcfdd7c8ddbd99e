"""``workers = "auto"``: the supervisor measures the layouts of this machine on the model
before starting any worker, logs what it found and chose, and starts that layout."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np
import pytest

from queueing import Client
from tests.integration.helpers import heartbeats
from tests.waiting import wait_until
from workers import probe
from workers.config import PoolConfig
from workers.layouts import LayoutFigures, candidate_layouts, choose_layout
from workers.placement import cpu_count
from workers.supervisor import EXIT_WORKER_LOAD_FAILED, Supervisor

pytestmark = pytest.mark.skipif(cpu_count() < 2, reason="one core: nothing to measure")


def test_workers_auto_serves_with_the_layout_it_measured_fastest(
    mlp_path: str,
    redis_url: str,
    client: Client,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="workers")
    # Which layout is fastest here is the unit tests' business: this one forces the choice
    # to a layout that the default (one worker per 4 cores) is not, to see it started.
    monkeypatch.setattr(probe, "PROBE_SECONDS", 0.2)
    real_rule = choose_layout

    def one_per_core(figures: Sequence[LayoutFigures]) -> tuple[LayoutFigures, str]:
        real_rule(figures)
        return max(figures, key=lambda f: f.layout.processes), "forced by the test"

    monkeypatch.setattr(probe, "choose_layout", one_per_core)
    config = PoolConfig(model=mlp_path, name="auto-mlp", redis_url=redis_url, max_batch_size=8)
    supervisor = Supervisor(config)
    try:
        supervisor.start()
        assert supervisor.wait_ready(timeout=120)
        lines = [r.getMessage() for r in caplog.records if r.name == "workers.probe"]
        candidates = {str(layout): layout for layout in candidate_layouts(cpu_count())}
        measured = [m.group(1) for line in lines if (m := re.match(r"layout (\S+) \(", line))]
        assert sorted(measured) == sorted(candidates)
        (chosen,) = [m.group(1) for line in lines if (m := re.search(r"chose (\S+) in", line))]
        layout = candidates[chosen]
        assert layout.threads == 1

        assert [s.intra_op_threads for s in supervisor.slots] == [layout.threads] * layout.processes

        def every_worker() -> list[dict[str, str]] | None:
            found = heartbeats(redis_url, "auto-mlp")
            return found if len(found) == layout.processes else None

        beats = wait_until(every_worker, timeout=60, what="a heartbeat from every worker")
        assert {int(b["intra_op_threads"]) for b in beats} == {layout.threads}
        assert {int(b["pid"]) for b in beats} == set(supervisor.serving_pids())
        x = np.arange(16, dtype=np.float32).reshape(2, 8)
        y = client.predict("auto-mlp", x, timeout=30)
        assert isinstance(y, np.ndarray) and y.shape == (2, 3)
    finally:
        supervisor.drain(timeout=30)


def test_a_model_that_cannot_load_is_reported_as_without_measuring(
    redis_url: str, mlp_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The measuring meets the failure first: it says so, and the workers start and fail
    as they do without measuring, stopping the pool with the load-failure exit code."""
    caplog.set_level(logging.INFO, logger="workers")
    config = PoolConfig(
        model=mlp_path, name="auto-broken", redis_url=redis_url, preload=["no_such_module_here"]
    )
    supervisor = Supervisor(config)
    try:
        supervisor.start()
        assert not supervisor.wait_ready(timeout=120)

        def stopped() -> bool:
            supervisor.poll()
            return supervisor.exit_code == EXIT_WORKER_LOAD_FAILED

        wait_until(stopped, timeout=30, what="the pool to stop")
    finally:
        supervisor.drain(timeout=30)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        line.startswith("workers = auto: could not measure the layouts (ModelLoadError:")
        and "no_such_module_here" in line
        for line in warnings
    ), warnings
