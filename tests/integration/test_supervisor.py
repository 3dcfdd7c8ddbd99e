"""The supervisor's promises (README, "Signals and exit codes"): restart backoff and its
reset, a successor taking over its predecessor's requests at once, and ``tfpool serve``
stopping at once (exit 130) on a second signal."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import pytest
import redis

from queueing import Client, keys
from tests.integration.conftest import PoolFactory
from tests.integration.helpers import start_serve, stop_process
from tests.integration.poison import SLOW, build_poison_model
from tests.waiting import wait_until
from workers.config import PoolConfig
from workers.placement import Slot
from workers.supervisor import (
    BACKOFF_MAX_S,
    BACKOFF_START_S,
    EXIT_FORCED,
    HEALTHY_AFTER_S,
    Supervisor,
)


class _Clock:
    """A clock the test moves by hand: restarts happen when the test says time has come."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_restart_backoff_doubles_to_its_cap_and_resets_after_a_healthy_minute(
    mlp_path: str, redis_url: str
) -> None:
    clock = _Clock()
    config = PoolConfig(model=mlp_path, redis_url=redis_url, name="backoff", workers=1)
    supervisor = Supervisor(config, slots=[Slot(0, None, 1, 1)], clock=clock)
    supervisor.start()
    handle = supervisor.handles[0]
    # Each worker lives 1 s (by the clock) before it is killed; the last one lives a
    # healthy minute and more. (Killed while loading: a crash all the same.)
    lifetimes = [1.0] * 8 + [HEALTHY_AFTER_S + 1]
    delays: list[float] = []
    try:
        for lived in lifetimes:
            process = handle.process
            assert process is not None and process.pid is not None
            clock.now += lived
            os.kill(process.pid, signal.SIGKILL)
            process.join(timeout=30)
            assert not process.is_alive()
            supervisor.poll()
            assert handle.process is None and handle.restart_at is not None
            delays.append(handle.restart_at - clock.now)
            clock.now = handle.restart_at - 0.01
            supervisor.poll()
            assert handle.process is None  # not restarted before its backoff is up
            clock.now = handle.restart_at
            supervisor.poll()
            assert handle.process is not None  # restarted as soon as it is
    finally:
        supervisor.kill()
    start, cap = BACKOFF_START_S, BACKOFF_MAX_S
    assert (start, cap) == (0.5, 30.0)  # the README's figures
    assert delays == pytest.approx([0.5, 1, 2, 4, 8, 16, 30, 30, 0.5]), delays
    assert [e[0] for e in supervisor.events] == ["crash"] * len(lifetimes)


def test_a_successor_takes_over_what_its_killed_predecessor_held_at_once(
    start_pool: PoolFactory, model_dir: Path, redis_url: str
) -> None:
    path = build_poison_model(model_dir)
    # Stale claims are taken over only after 10 min, far past this test's timeout: only the
    # successor's start-up takeover can answer what the dead worker held.
    supervisor = start_pool(path, name="successor", workers=1, max_batch_size=1,
                            claim_idle_ms=600_000,
                            preload=["tests.integration.poison"])  # fmt: skip
    conn = redis.Redis.from_url(redis_url)
    stream = keys.stream("successor")
    rows = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)
    rows[:, 0] = SLOW  # each a batch of 1.5 s: the worker holds the others meanwhile
    with Client(redis_url) as c:
        futures = c.submit_many("successor", list(rows))
        first = supervisor.handles[0].process
        assert first is not None and first.pid is not None

        def pending() -> int:
            summary = conn.xpending(stream, keys.GROUP)
            return int(summary["pending"])

        wait_until(lambda: pending() >= 2, timeout=60, what="the worker to hold requests")
        os.kill(first.pid, signal.SIGSTOP)  # frozen: what it holds no longer changes
        held = {
            r["message_id"]
            for r in cast(list[Any], conn.xpending_range(stream, keys.GROUP, "-", "+", 100))
        }
        assert held and not all(f.done() for f in futures)
        os.kill(first.pid, signal.SIGKILL)
        results = [np.asarray(c.wait(f, timeout=120)) for f in futures]
    assert all(r.shape == (2,) for r in results)
    crashes = [e for e in supervisor.events if e[0] == "crash"]
    assert [e[2] for e in crashes] == [first.pid]
    assert pending() == 0 and conn.xlen(stream) == 0  # all answered and acked
    conn.close()


def test_serve_stops_at_once_with_exit_130_on_a_second_signal(
    model_dir: Path, redis_url: str
) -> None:
    path = build_poison_model(model_dir)
    serve = start_serve("--model", path, "--name", "forced", "--redis-url", redis_url,
                        "--workers", "1", "--max-batch-size", "1",
                        "--preload", "tests.integration.poison")  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(iter(cast(IO[str], serve.stderr).readline, "")),
        daemon=True,
    )
    reader.start()
    conn = redis.Redis.from_url(redis_url)
    stream = keys.stream("forced")
    try:
        wait_until(lambda: any("is ready" in line for line in lines), timeout=120,
                   what="a ready worker")  # fmt: skip
        rows = np.full((20, 4), SLOW, np.float32)  # 20 batches of 1.5 s: a drain of 30 s
        with Client(redis_url) as c:
            c.submit_many("forced", list(rows))
            wait_until(
                lambda: int((conn.xpending(stream, keys.GROUP))["pending"]),
                timeout=60, what="the worker to hold requests",
            )  # fmt: skip
            serve.send_signal(signal.SIGINT)
            wait_until(lambda: any("draining" in line for line in lines), timeout=30,
                       what="the drain to start")  # fmt: skip
            serve.send_signal(signal.SIGINT)
            assert serve.wait(timeout=30) == EXIT_FORCED == 130, "".join(lines)
        reader.join(timeout=30)
        assert any("second signal: stopping at once" in line for line in lines)
        # Stopped at once: the requests in hand were not answered; they stay pending for
        # other workers to take over later.
        summary = conn.xpending(stream, keys.GROUP)
        assert int(summary["pending"]) > 0
    finally:
        conn.close()
        stop_process(serve)
