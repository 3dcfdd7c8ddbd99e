"""Rollout demo: traffic on, new versions dropped into the repository, counts printed.

    python scripts/rollout_demo.py                       # versions 2 and 3, 4 threads
    python scripts/rollout_demo.py --versions 3 --threads 8 --poll-s 1 --marker

A private redis-server and a pool serving a model repository (one worker) start; producer
threads send one-row requests without pause. Version 2, then 3, ... are built beside the
repository and moved into it whole (one rename; with ``--marker``, a ``READY`` file is
written after the move instead). For each swap it prints when the new folder arrived,
when the new version gave its first answer, when the old one was unloaded, and how many
requests were answered while that went on. At the end: every request's answer is checked
against the version that says it made it. Exits 1 on any failed or wrong answer.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import keras
import numpy as np
import redis

from queueing import Client, RequestFuture
from workers.config import PoolConfig
from workers.embedded_redis import RedisServer
from workers.placement import Slot
from workers.repository import READY_MARKER
from workers.supervisor import Supervisor

WIDTH = 64


def build(folder: Path, version: int) -> keras.Model:
    """A Dense 64 -> 256 -> 10 model whose weights depend on ``version``, saved as
    ``folder/model.keras``; returned, to check the answers with."""
    keras.utils.set_random_seed(version)
    x = keras.Input((WIDTH,), name="x")
    hidden = keras.layers.Dense(256, activation="relu")(x)
    model = keras.Model(x, keras.layers.Dense(10)(hidden))
    folder.mkdir(parents=True)
    model.save(str(folder / "model.keras"))
    return model


class Traffic:
    """Producer threads: one request in flight each, without pause."""

    def __init__(self, client: Client, threads: int) -> None:
        self.client = client
        self.sent: list[tuple[np.ndarray, RequestFuture]] = []
        self.answered_at: list[tuple[float, int | None]] = []  # (when, version)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self.stop.is_set():
            x = rng.normal(size=(1, WIDTH)).astype(np.float32)
            future = self.client.submit("demo", x)
            with contextlib.suppress(Exception):  # counted at the end
                future.result(timeout=60)
            with self.lock:
                self.sent.append((x, future))
                self.answered_at.append((time.monotonic(), future.model_version))

    def first_answer(self, version: int, after: float) -> float | None:
        with self.lock:
            return next((t for t, v in self.answered_at if v == version and t >= after), None)

    def answers_between(self, start: float, end: float) -> int:
        with self.lock:
            return sum(1 for t, _ in self.answered_at if start <= t <= end)


def versions_line(conn: redis.Redis) -> str:
    for key in conn.scan_iter("tfpool:worker:*"):
        value = conn.hget(key, "versions")
        if isinstance(value, bytes) and value:
            return value.decode()
    return ""


def wait_for(condition: object, timeout: float = 300.0) -> float:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if condition():  # type: ignore[operator]
            return time.monotonic()
        time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {condition}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=2, help="new versions to roll out")
    parser.add_argument("--threads", type=int, default=4, help="producer threads")
    parser.add_argument("--poll-s", type=float, default=1.0, help="repository scan interval")
    parser.add_argument("--marker", action="store_true", help="write READY after the move")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tfpool-rollout-"))
    repo, staging = tmp / "repo", tmp / "staging"
    models = {1: build(repo / "demo" / "1", 1)}
    with RedisServer() as server:
        config = PoolConfig(model_repo=str(repo), redis_url=server.url, poll_s=args.poll_s,
                            max_latency_ms=2, workers=1)  # fmt: skip
        supervisor = Supervisor(config, slots=[Slot(0, None, 1, 1)])
        supervisor.start()
        if not supervisor.wait_ready(timeout=300):
            print("the pool did not start", file=sys.stderr)
            return 1
        monitor_stop = threading.Event()
        monitor = threading.Thread(target=supervisor.monitor, args=(monitor_stop,))
        monitor.start()
        conn = redis.Redis.from_url(server.url)
        try:
            with Client(server.url) as client:
                traffic = Traffic(client, args.threads)
                for thread in traffic.threads:
                    thread.start()
                wait_for(lambda: traffic.first_answer(1, 0.0) is not None)
                print(f"traffic on: {args.threads} threads, one request in flight each")
                for version in range(2, 2 + args.versions):
                    models[version] = build(staging / str(version), version)
                    arrived = time.monotonic()
                    os.rename(staging / str(version), repo / "demo" / str(version))
                    if args.marker:
                        (repo / "demo" / str(version) / READY_MARKER).touch()
                    first = wait_for(lambda v=version, t=arrived: traffic.first_answer(v, t))
                    unloaded = wait_for(lambda v=version: versions_line(conn) == f"{v} ready")
                    print(
                        f"version {version}: first answer {first - arrived:.2f}s after its"
                        f" folder arrived ({traffic.answers_between(arrived, first):,} requests"
                        f" answered by version {version - 1} meanwhile); version {version - 1}"
                        f" gone from the heartbeat {unloaded - arrived:.2f}s after"
                        f" ({traffic.answers_between(arrived, unloaded):,} answered in all)"
                    )
                settle_until = time.monotonic() + 1.0
                wait_for(lambda: time.monotonic() >= settle_until)
                traffic.stop.set()
                for thread in traffic.threads:
                    thread.join()
        finally:
            conn.close()
            monitor_stop.set()
            monitor.join()
            supervisor.drain(timeout=60)

    failed = wrong = 0
    by_version: Counter[int | None] = Counter()
    for x, future in traffic.sent:
        if future.exception() is not None:
            failed += 1
            continue
        made_by = future.model_version
        by_version[made_by] += 1
        want = models[made_by](x).numpy() if made_by in models else None
        if want is None or not np.allclose(future.result(), want, rtol=1e-4, atol=1e-4):
            wrong += 1
    counts = ", ".join(f"version {v}: {n:,}" for v, n in sorted(by_version.items()))
    print(f"requests: {len(traffic.sent):,} ({counts}); failed: {failed}; wrong: {wrong}")
    return 1 if failed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
