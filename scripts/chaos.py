"""Chaos run: SIGKILL workers under load and count what the clients saw.

    python scripts/chaos.py                       # private redis-server, 2 workers, 5 kills
    python scripts/chaos.py --requests 20000 --kills 10 --redis-url redis://...

Producer threads send one-row requests to the demo MLP in small pipelined chunks while a
killer SIGKILLs a serving worker every time another share of the requests is answered.
Prints: requests sent, answered, correct, typed errors, requests never resolved (lost:
the client gave up waiting with no result and no error), duplicates suppressed by the
clients, dead-lettered, worker kills. Exits 1 if anything was lost or wrong.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import redis

from queueing import Client, RequestError, RequestTimeout, keys
from workers.cli import redis_url_or_embedded
from workers.config import PoolConfig
from workers.demo import DemoWeights, build_demo_model
from workers.placement import Slot
from workers.supervisor import Supervisor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", help="Redis URL (default: a private redis-server)")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--producers", type=int, default=4)
    args = parser.parse_args()

    weights = DemoWeights.random()
    x = np.random.default_rng(0).standard_normal((args.requests, 16)).astype(np.float32)
    want = weights.forward(x)
    with tempfile.TemporaryDirectory() as tmp, redis_url_or_embedded(args.redis_url) as url:
        config = PoolConfig(model=build_demo_model(tmp, weights), name="chaos", redis_url=url,
                            max_batch_size=16, claim_idle_ms=1000, log_level="ERROR")  # fmt: skip
        supervisor = Supervisor(config, slots=[Slot(i, None, 1, 1) for i in range(args.workers)])
        supervisor.start()
        if not supervisor.wait_ready():
            print("workers did not start", file=sys.stderr)
            return 1
        until = threading.Event()
        monitor = threading.Thread(target=supervisor.monitor, args=(until,), daemon=True)
        monitor.start()
        try:
            started = time.perf_counter()
            results, duplicates, errors, unresolved, killed = _run(url, x, supervisor, args)
            elapsed = time.perf_counter() - started
        finally:
            until.set()
            monitor.join()
            supervisor.drain()
        conn = redis.Redis.from_url(url)
        dead: int = conn.xlen(keys.dead_letters("chaos"))
        conn.close()

    answered = len(results)
    correct = sum(np.allclose(results[i], want[i], atol=1e-4) for i in results)
    # Counted, not inferred: a request is lost when its wait ended with neither a result
    # nor an error from the pool (the client's own RequestTimeout).
    lost = unresolved
    assert answered + errors + lost == args.requests  # every request waited on once
    print(f"requests sent          {args.requests}")
    print(f"answered               {answered} ({correct} correct)")
    print(f"errors (typed)         {errors}")
    print(f"lost (never resolved)  {lost}")
    print(f"duplicates suppressed  {duplicates}")
    print(f"dead-lettered          {dead}")
    print(f"workers killed         {len(killed)} (SIGKILL, under load)")
    print(f"elapsed                {elapsed:.1f}s")
    return 0 if lost == 0 and correct == answered and errors == 0 else 1


def _run(
    url: str, x: np.ndarray, supervisor: Supervisor, args: argparse.Namespace
) -> tuple[dict[int, np.ndarray], int, int, int, list[int]]:
    results: dict[int, np.ndarray] = {}
    duplicates: list[int] = []
    errors: list[int] = []
    unresolved: list[int] = []

    def produce(index: int) -> None:
        with Client(url) as client:
            for start in range(index * 20, len(x), 20 * args.producers):
                rows = range(start, min(start + 20, len(x)))
                futures = client.submit_many("chaos", [x[i] for i in rows])
                for i, future in zip(rows, futures, strict=True):
                    try:
                        results[i] = np.asarray(client.wait(future, timeout=120))
                    except RequestTimeout:
                        unresolved.append(i)
                    except RequestError:
                        errors.append(i)
            duplicates.append(client.duplicates_ignored)

    killed: list[int] = []
    with ThreadPoolExecutor(args.producers) as pool:
        running = [pool.submit(produce, i) for i in range(args.producers)]
        for k in range(1, args.kills + 1):
            threshold = k * len(x) // (args.kills + 1)
            while len(results) < threshold and not all(r.done() for r in running):
                time.sleep(0.01)
            pids = supervisor.serving_pids()
            while len(pids) < len(supervisor.handles) or set(pids) & set(killed):
                time.sleep(0.05)  # wait for the last victim's successor to be serving
                pids = supervisor.serving_pids()
            os.kill(pids[k % len(pids)], signal.SIGKILL)
            killed.append(pids[k % len(pids)])
        for r in running:
            r.result()
    return results, sum(duplicates), len(errors), len(unresolved), killed


if __name__ == "__main__":
    sys.exit(main())
