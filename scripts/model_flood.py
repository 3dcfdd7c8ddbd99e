"""Two models in one worker: does flooding one hurt the other? Prints latencies.

    python scripts/model_flood.py                    # 5 s per phase
    python scripts/model_flood.py --seconds 10 --flood-threads 8

A private redis-server and one worker serving a repository of two models: ``big`` (Dense
256 -> 1024 -> 1024 -> 10, batches of up to 32 rows) and ``small`` (Dense 16 -> 4). One
thread sends ``small`` one-row requests, one at a time, first alone, then while
``--flood-threads`` threads keep ``big``'s queue full with 32-row requests. Printed: the
p50 / p99 of ``small`` in both phases, and ``big``'s model time per batch (from the
worker's heartbeat) -- the figure to compare the difference of the p99s with.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import cast

import keras
import numpy as np
import redis

from queueing import Client
from workers.config import PoolConfig
from workers.embedded_redis import RedisServer
from workers.placement import Slot
from workers.supervisor import Supervisor


def build(path: Path, widths: list[int]) -> None:
    keras.utils.set_random_seed(1)
    x = keras.Input((widths[0],), name="x")
    y = x
    for width in widths[1:-1]:
        y = keras.layers.Dense(width, activation="relu")(y)
    y = keras.layers.Dense(widths[-1])(y)
    path.mkdir(parents=True)
    keras.Model(x, y).save(str(path / "model.keras"))


def latencies(client: Client, seconds: float) -> list[float]:
    x = np.ones((1, 16), np.float32)
    found = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        client.predict("small", x, timeout=60)
        found.append(time.perf_counter() - started)
    return found


def flood(client: Client, stop: threading.Event) -> None:
    x = np.ones((32, 256), np.float32)
    while not stop.is_set():
        futures = client.submit_many("big", [x] * 4)
        for future in futures:
            future.result(timeout=120)


def batch_ms(url: str) -> float:
    conn = redis.Redis.from_url(url)
    try:
        for key in conn.scan_iter("tfpool:worker:*/big"):
            raw = cast(dict[bytes, bytes], conn.hgetall(key))
            beat = {k.decode(): v.decode() for k, v in raw.items()}
            return 1000 * float(beat["model_s"]) / max(1, int(beat["batches"]))
    finally:
        conn.close()
    return float("nan")


def describe(found: list[float]) -> str:
    ms = np.array(found) * 1000
    return f"p50 {np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms ({len(ms):,})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    parser.add_argument("--flood-threads", type=int, default=4)
    args = parser.parse_args()
    repo = Path(tempfile.mkdtemp(prefix="tfpool-flood-")) / "repo"
    build(repo / "big" / "1", [256, 1024, 1024, 10])
    build(repo / "small" / "1", [16, 4])
    with RedisServer() as server:
        config = PoolConfig(model_repo=str(repo), redis_url=server.url, workers=1,
                            max_latency_ms=2)  # fmt: skip
        supervisor = Supervisor(config, slots=[Slot(0, None, 2, 1)])
        supervisor.start()
        if not supervisor.wait_ready(timeout=300):
            print("the pool did not start", file=sys.stderr)
            return 1
        try:
            with Client(server.url) as client:
                latencies(client, 1.0)  # connections, caches
                alone = latencies(client, args.seconds)
                stop = threading.Event()
                threads = [
                    threading.Thread(target=flood, args=(client, stop))
                    for _ in range(args.flood_threads)
                ]
                for thread in threads:
                    thread.start()
                flooded = latencies(client, args.seconds)
                stop.set()
                for thread in threads:
                    thread.join()
                print(f"small alone:          {describe(alone)}")
                print(f"small, big flooded:   {describe(flooded)}")
                print(f"big: {batch_ms(server.url):.1f} ms of model time per batch")
        finally:
            supervisor.drain(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
