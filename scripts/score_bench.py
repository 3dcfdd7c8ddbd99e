"""Offline scoring throughput against the bare model, in one run.

    python scripts/score_bench.py                  # 1,000,000 rows through the bench `mlp`
    python scripts/score_bench.py --rows 200000 --chunk-rows 4096 --window 8
    python scripts/score_bench.py --images 2000   # JPEG files through mobilenet, decoded in
                                                  # the worker, against bare float batches
    python scripts/score_bench.py --parquet       # Parquet in -> Parquet out (id kept)
    python scripts/score_bench.py --parquet --images 1500   # a Parquet column of JPEG bytes

Writes the rows to a temporary .npy (or with --parquet a Parquet file: an id column and
the rows as a fixed-size list column, or the JPEG files' bytes in a binary column), scores
them with `tfpool score`'s code into another .npy (Parquet: the id, the outputs and the
error column) through a pool on a private Redis, and prints rows/s next to the bare
model's best rows/s (measured in the same run, placed like the pool's worker). Where Ray
Data is installed, the same Parquet file also goes through `read_parquet -> map_batches ->
write_parquet` with the same model, and its rows/s is printed too.
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
from workers.bench import build_model, process_cpu, redis_cpu
from workers.cli import redis_url_or_embedded
from workers.config import PoolConfig
from workers.layouts import WorkerLayout
from workers.memory import keep_large_buffers
from workers.placement import Slot, cpu_count
from workers.probe import measure_layouts
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
    parser.add_argument("--parquet", action="store_true", help="Parquet in, Parquet out")
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
        (bare,) = measure_layouts(PoolConfig(model=path), [WorkerLayout(1, args.threads)],
                                  buckets, seconds=1.5 if args.images == 0 else 4.0)  # fmt: skip
        if args.images:
            source = str(Path(tmp) / "photos")
            _write_jpegs(source, args.images)
            if args.parquet:
                source = _folder_to_parquet(source, str(Path(tmp) / "photos.parquet"))
            processing: dict[str, Any] = {
                "preprocess": "image", "image_scale": 1 / 127.5, "image_offset": -1.0,
                "postprocess": "top_k",
            }  # fmt: skip
        else:
            source = str(Path(tmp) / "x.npy")
            x = np.random.default_rng(0).standard_normal((args.rows, 64)).astype(np.float32)
            np.save(source, x)
            if args.parquet:
                source = _array_to_parquet(x, str(Path(tmp) / "x.parquet"))
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
            if args.parquet:
                output = str(Path(tmp) / "scores.parquet")
            else:
                output = str(Path(tmp) / ("top5.npz" if args.images else "y.npy"))
            with Client(url) as client:
                summary = score(
                    client,
                    name,
                    source,
                    output,
                    chunk_rows=args.chunk_rows,
                    window=args.window,
                    progress=lambda total, done: Progress(total, done),
                    keep_columns=["id"] if args.parquet else (),
                )
            after = (process_cpu(pids), redis_cpu(conn), _own_cpu())
            time.sleep(config.heartbeat_s * 1.5)  # the workers' next heartbeat has the total
            model_s = _model_seconds(conn) - model_before
        finally:
            supervisor.drain()
        ray_rate = _ray_data(path, source, tmp, args) if args.parquet else None
    rate = summary.scored / summary.seconds
    print(f"scored {summary.scored:,} rows in {summary.seconds:.1f}s: {rate:,.0f} rows/s")
    print(f"bare model best: {bare.best_rows_per_s:,.0f} rows/s at batch {bare.best_batch}")
    print(f"scoring / bare: {rate / bare.best_rows_per_s:.3f}")
    if args.parquet:
        if ray_rate is None:
            print("Ray Data: not installed (pip install 'ray[data]' to compare)")
        else:
            print(f"Ray Data read_parquet -> map_batches -> write_parquet: {ray_rate:,.0f} rows/s")
    # Where the CPU went, per 1,000 rows: the worker includes the model itself; the bare
    # model's own cost is its threads' time at its best rate.
    per_k = 1e6 / summary.scored  # seconds -> ms per 1,000 rows
    worker, server, producer = (a - b for a, b in zip(after, before, strict=True))
    model_ms = args.threads / bare.best_rows_per_s * 1e6
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


def _array_to_parquet(x: np.ndarray, path: str) -> str:
    """Rows as a Parquet file: ``id`` and ``x`` (a fixed-size list of float32 per row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    table = pa.table({"id": np.arange(len(x)), "x": values})
    pq.write_table(table, path, row_group_size=128 * 1024)
    return path


def _folder_to_parquet(folder: str, path: str) -> str:
    """The JPEG files of ``folder`` as a Parquet file: ``id`` and ``image`` (the bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = sorted(os.listdir(folder))
    images = [Path(folder, name).read_bytes() for name in names]
    pq.write_table(pa.table({"id": np.arange(len(names)), "image": images}), path)
    return path


def _ray_data(model_path: str, source: str, tmp: str, args: argparse.Namespace) -> float | None:
    """Rows/s of Ray Data on the same file and model: one actor holding the model, batches
    of the same size as the pool's chunks; None where Ray is not installed."""
    try:
        import ray  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None

    class Predict:
        def __init__(self) -> None:
            import keras

            self.model = keras.models.load_model(model_path, compile=False)

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if args.images:
                import tensorflow as tf

                pixels = [
                    tf.image.resize(tf.io.decode_image(b, channels=3, expand_animations=False),
                                    (224, 224)) / 127.5 - 1.0
                    for b in batch["image"]
                ]  # fmt: skip
                x = np.stack(pixels)
            else:
                x = np.stack(list(batch["x"])).astype(np.float32)
            y = np.asarray(self.model.predict_on_batch(x))
            return {"id": batch["id"], "output": y}

    ray.init(num_cpus=cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        started = time.monotonic()
        dataset = ray.data.read_parquet(source)
        scored = dataset.map_batches(
            Predict, batch_size=args.chunk_rows, concurrency=1, batch_format="numpy"
        )
        scored.write_parquet(str(Path(tmp) / "ray_out"))
        seconds = time.monotonic() - started
    finally:
        ray.shutdown()
    return float(args.rows / seconds)


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
