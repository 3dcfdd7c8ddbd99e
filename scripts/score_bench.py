"""Offline scoring throughput against the bare model, in one run.

    python scripts/score_bench.py                  # 1,000,000 rows through the bench `mlp`
    python scripts/score_bench.py --rows 200000 --chunk-rows 4096 --window 8
    python scripts/score_bench.py --images 2000   # JPEG files through mobilenet, decoded in
                                                  # the worker, against bare float batches

Writes the rows to a temporary .npy, scores them with `tfpool score`'s code into another
.npy through a pool on a private Redis, and prints rows/s next to the bare model's best
rows/s (measured in the same run, placed like the pool's worker).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import redis

from queueing import Client, keys
from queueing.score import Progress, score
from workers.batcher import default_buckets
from workers.bench import build_model, measure_bare, process_cpu, redis_cpu
from workers.cli import redis_url_or_embedded
from workers.config import PoolConfig
from workers.memory import keep_large_buffers
from workers.placement import Slot, cpu_count
from workers.supervisor import Supervisor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk-rows", type=int, default=4096)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=cpu_count(), help="intra-op threads")
    parser.add_argument(
        "--images",
        type=int,
        default=0,
        help="instead: a folder of this many 320x240 JPEGs through the bench mobilenet,"
        " decoded and resized in the worker (chunk and batch default to 16)",
    )
    args = parser.parse_args()
    if args.images:
        args.rows = args.images
        args.chunk_rows = min(args.chunk_rows, 16)
        args.max_batch_size = min(args.max_batch_size, 16)

    keep_large_buffers()  # as `tfpool score` does
    slot = Slot(0, None, args.threads, 1)
    with tempfile.TemporaryDirectory() as tmp, redis_url_or_embedded(None) as url:
        name = "mobilenet" if args.images else "mlp"
        path = build_model(name, tmp)
        buckets = default_buckets(args.max_batch_size)
        bare = measure_bare(path, [slot], buckets, seconds=1.5 if args.images == 0 else 4.0)
        if args.images:
            source = str(Path(tmp) / "photos")
            _write_jpegs(source, args.images)
            processing: dict[str, Any] = {
                "preprocess": "image", "image_scale": 1 / 127.5, "image_offset": -1.0,
                "postprocess": "top_k",
            }  # fmt: skip
        else:
            source = str(Path(tmp) / "x.npy")
            x = np.random.default_rng(0).standard_normal((args.rows, 64)).astype(np.float32)
            np.save(source, x)
            del x
            processing = {}
        config = PoolConfig(
            model=path,
            name=name,
            redis_url=url,
            log_level="WARNING",
            max_batch_size=args.max_batch_size,
            buckets=buckets,
            **processing,
        )
        supervisor = Supervisor(config, slots=[slot])
        supervisor.start()
        try:
            if not supervisor.wait_ready(timeout=600):
                return 1
            conn = redis.Redis.from_url(url)
            pids = supervisor.serving_pids()
            before = (process_cpu(pids), redis_cpu(conn), _own_cpu())
            model_before = _model_seconds(conn)
            with Client(url) as client:
                summary = score(
                    client,
                    name,
                    source,
                    str(Path(tmp) / ("top5.npz" if args.images else "y.npy")),
                    chunk_rows=args.chunk_rows,
                    window=args.window,
                    progress=lambda total, done: Progress(total, done),
                )
            after = (process_cpu(pids), redis_cpu(conn), _own_cpu())
            time.sleep(config.heartbeat_s * 1.5)  # the workers' next heartbeat has the total
            model_s = _model_seconds(conn) - model_before
        finally:
            supervisor.drain()
    rate = summary.scored / summary.seconds
    print(f"scored {summary.scored:,} rows in {summary.seconds:.1f}s: {rate:,.0f} rows/s")
    print(f"bare model best: {bare['rows_per_s']:,.0f} rows/s at batch {bare['best_batch']}")
    print(f"scoring / bare: {rate / bare['rows_per_s']:.3f}")
    # Where the CPU went, per 1,000 rows: the worker includes the model itself; the bare
    # model's own cost is its threads' time at its best rate.
    per_k = 1e6 / summary.scored  # seconds -> ms per 1,000 rows
    worker, server, producer = (a - b for a, b in zip(after, before, strict=True))
    model_ms = args.threads / bare["rows_per_s"] * 1e6
    print(
        f"CPU ms per 1,000 rows: worker {worker * per_k:.3f} (bare model {model_ms:.3f}),"
        f" redis-server {server * per_k:.3f}, scoring client {producer * per_k:.3f};"
        f" wall {summary.seconds * per_k:.3f} on {cpu_count()} cores"
    )
    print(
        f"model busy {model_s / summary.seconds:.0%} of the run:"
        f" {summary.scored / model_s:,.0f} rows per model-second in the pool"
    )
    return 0


def _model_seconds(conn: redis.Redis) -> float:
    """Seconds the pool's workers have spent in the model, from their heartbeats."""
    return sum(
        float(cast(dict[bytes, bytes], conn.hgetall(key)).get(b"model_s", 0))
        for key in conn.scan_iter(keys.worker_heartbeat("*"))
    )


def _write_jpegs(folder: str, count: int) -> None:
    """``count`` different 320x240 JPEG photos (gradients and noise), about 20 KB each."""
    from PIL import Image

    os.makedirs(folder)
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:240, 0:320]
    for i in range(count):
        base = (xs + 2 * ys + 7 * i) % 256
        pixels = (base[..., None] + rng.integers(0, 24, (240, 320, 3))) % 256
        Image.fromarray(pixels.astype(np.uint8)).save(f"{folder}/{i:07d}.jpg", quality=85)


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    sys.exit(main())
