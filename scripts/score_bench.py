"""Offline scoring throughput against the bare model, in one run.

    python scripts/score_bench.py                  # 1,000,000 rows through the bench `mlp`
    python scripts/score_bench.py --rows 200000 --chunk-rows 4096 --window 8

Writes the rows to a temporary .npy, scores them with `tfpool score`'s code into another
.npy through a pool on a private Redis, and prints rows/s next to the bare model's best
rows/s (measured in the same run, placed like the pool's worker).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from queueing import Client
from queueing.score import Progress, score
from workers.batcher import default_buckets
from workers.bench import build_model, measure_bare
from workers.cli import redis_url_or_embedded
from workers.config import PoolConfig
from workers.placement import Slot, cpu_count
from workers.supervisor import Supervisor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk-rows", type=int, default=4096)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=4096)
    args = parser.parse_args()

    slot = Slot(0, None, cpu_count(), 1)
    with tempfile.TemporaryDirectory() as tmp, redis_url_or_embedded(None) as url:
        path = build_model("mlp", tmp)
        buckets = default_buckets(args.max_batch_size)
        bare = measure_bare(path, [slot], buckets, seconds=1.5)
        x = np.random.default_rng(0).standard_normal((args.rows, 64)).astype(np.float32)
        np.save(Path(tmp) / "x.npy", x)
        del x
        config = PoolConfig(
            model=path,
            name="mlp",
            redis_url=url,
            log_level="WARNING",
            max_batch_size=args.max_batch_size,
            buckets=buckets,
        )
        supervisor = Supervisor(config, slots=[slot])
        supervisor.start()
        try:
            if not supervisor.wait_ready(timeout=600):
                return 1
            with Client(url) as client:
                summary = score(
                    client,
                    "mlp",
                    str(Path(tmp) / "x.npy"),
                    str(Path(tmp) / "y.npy"),
                    chunk_rows=args.chunk_rows,
                    window=args.window,
                    progress=lambda total, done: Progress(total, done),
                )
        finally:
            supervisor.drain()
    rate = summary.scored / summary.seconds
    print(f"scored {summary.scored:,} rows in {summary.seconds:.1f}s: {rate:,.0f} rows/s")
    print(f"bare model best: {bare['rows_per_s']:,.0f} rows/s at batch {bare['best_batch']}")
    print(f"scoring / bare: {rate / bare['rows_per_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
