"""The ``tfpool`` command: serve, predict, score, status, bench, demo.

Every pool option can be given as ``--option-name``, as ``TFPOOL_OPTION_NAME`` in the
environment, or in a TOML file (``--config``); later ones win. With no Redis URL anywhere,
``serve`` and ``demo`` start a private redis-server and print its URL.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import redis

from queueing import Client, RequestError
from queueing.client import resolve_redis_url
from queueing.score import IMAGE_SUFFIXES
from workers.config import PoolConfig, option_types
from workers.embedded_redis import RedisServer
from workers.errors import WorkerError

log = logging.getLogger("tfpool")

#: Options that get a short, documented flag of their own in ``serve``; the rest are there
#: too, by their option name.
_SERVE_HELP = {
    "model": "SavedModel directory, or .keras / .h5 file",
    "name": "name producers use (default: the model's file name)",
    "redis_url": "Redis URL (default: TFPOOL_REDIS_URL, else a private redis-server)",
    "workers": "worker processes (default: one per GPU, else one per 4 cores)",
    "max_batch_size": "most rows in a batch",
    "max_latency_ms": "longest a request waits for company, from its arrival",
    "metrics_port": "serve /metrics, /healthz, /readyz on this port (0: any free port;"
    " default: none)",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", None) or "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = args.run(args)
    except (WorkerError, RequestError) as e:
        print(f"tfpool: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tfpool", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run a pool of workers for one model")
    serve.add_argument("--config", help="TOML file of options (see configs/example.toml)")
    _add_pool_options(serve)
    serve.set_defaults(run=_serve)

    predict = commands.add_parser("predict", help="send one request, print or save the result")
    predict.add_argument("--model", required=True, help="model name")
    predict.add_argument(
        "--input", required=True, help=".npy (one input), .npz (named), or an image file"
    )
    predict.add_argument("--output", help="write here (.npy; .npz for several outputs)")
    predict.add_argument("--redis-url", help="Redis URL (default: TFPOOL_REDIS_URL)")
    predict.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")
    predict.add_argument("--deadline", type=float, help="seconds before the request expires")
    predict.set_defaults(run=_predict)

    score = commands.add_parser("score", help="score a dataset file into a file, resumably")
    score.add_argument("--model", required=True, help="model name")
    score.add_argument(
        "input",
        help=".npy (memory-mapped), .npz (one array per input), or a folder of images"
        " (JPEG/PNG/GIF/BMP, for a pool with preprocess = image)",
    )
    score.add_argument("output", help=".npy (one output) or .npz (several)")
    score.add_argument("--redis-url", help="Redis URL (default: TFPOOL_REDIS_URL)")
    score.add_argument("--chunk-rows", type=int, help="rows per request (default: 1024; 32 images)")
    score.add_argument("--window", type=int, default=8, help="chunks in flight")
    score.set_defaults(run=_score)

    status = commands.add_parser("status", help="workers of every host, queues, dead letters")
    status.add_argument("--redis-url", help="Redis URL (default: TFPOOL_REDIS_URL)")
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    status.set_defaults(run=_status)

    bench = commands.add_parser(
        "bench", help="measure throughput, latency and CPU vs the bare model"
    )
    bench.add_argument(
        "--scenario",
        action="append",
        help="scenario to run (repeatable; default: all). One of: " + ", ".join(_bench_scenarios()),
    )
    bench.add_argument("--runs", type=int, default=3, help="runs per scenario (median shown)")
    bench.add_argument("--workers", type=int, default=1, help="worker processes")
    bench.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="TensorFlow intra-op threads per worker (default: cores / workers)",
    )
    bench.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="workers record no metrics (to measure what recording costs)",
    )
    bench.add_argument("--redis-url", help="Redis URL (default: a private redis-server)")
    bench.add_argument("--json", metavar="FILE", help="also write the figures here")
    bench.set_defaults(run=_bench)

    demo = commands.add_parser("demo", help="build a demo model, serve it, send it requests")
    demo.add_argument("--redis-url", help="Redis URL (default: a private redis-server)")
    demo.add_argument("--workers", type=int, default=1, help="worker processes")
    demo.add_argument("--requests", type=int, default=2000, help="one-row requests to send")
    demo.set_defaults(run=_demo)
    return parser


def _add_pool_options(parser: argparse.ArgumentParser) -> None:
    for option, kind in option_types().items():
        flag = "--" + option.replace("_", "-")
        help_text = _SERVE_HELP.get(option, f"see configs/example.toml ({option})")
        if kind in (int, float, str):
            parser.add_argument(flag, dest=option, type=kind, help=help_text)
        elif kind is bool:
            parser.add_argument(flag, dest=option, help=help_text + "; true or false")
        else:  # lists: comma- or space-separated
            parser.add_argument(flag, dest=option, help=help_text + "; comma-separated")


@contextlib.contextmanager
def redis_url_or_embedded(url: str | None) -> Iterator[str]:
    """The URL given, else a private redis-server's for the duration of the block."""
    if url:
        yield url
        return
    with RedisServer() as server:
        print(f"tfpool: started a private redis-server at {server.url}", flush=True)
        yield server.url


def _serve(args: argparse.Namespace) -> int:
    from workers.supervisor import Supervisor

    overrides = {k: getattr(args, k) for k in option_types() if hasattr(args, k)}
    config = PoolConfig.load(config_file=args.config, overrides=overrides)
    with redis_url_or_embedded(config.redis_url) as url:
        config = dataclasses.replace(config, redis_url=url)
        supervisor = Supervisor(config)
        print(
            f"tfpool: serving model {config.name!r} from {config.model} on {url}"
            f" with {len(supervisor.slots)} worker(s)",
            flush=True,
        )
        return supervisor.run_forever()


def _load_inputs(path: str) -> Any:
    if path.lower().endswith(IMAGE_SUFFIXES):  # sent encoded, for a pool that decodes images
        return Path(path).read_bytes()
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    return np.load(path, allow_pickle=False)


def _predict(args: argparse.Namespace) -> int:
    inputs = _load_inputs(args.input)
    with Client(resolve_redis_url(args.redis_url)) as client:
        outputs = client.predict(args.model, inputs, timeout=args.timeout, deadline=args.deadline)
    if args.output:
        if isinstance(outputs, dict):
            np.savez(args.output, **outputs)  # type: ignore[arg-type]
        else:
            np.save(args.output, outputs)
        print(f"wrote {args.output}")
    elif isinstance(outputs, dict):
        for name, value in outputs.items():
            print(f"{name}: {value.dtype} {list(value.shape)}\n{value}")
    else:
        print(f"{outputs.dtype} {list(outputs.shape)}\n{outputs}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from queueing.score import score
    from workers.memory import keep_large_buffers

    keep_large_buffers()  # a chunk is a megabyte: no fresh pages from the kernel for each

    with Client(resolve_redis_url(args.redis_url)) as client:
        try:
            summary = score(client, args.model, args.input, args.output,
                            chunk_rows=args.chunk_rows, window=args.window)  # fmt: skip
        except KeyboardInterrupt:
            print("tfpool score: interrupted; run the same command again to continue",
                  file=sys.stderr)  # fmt: skip
            return 130
    print(f"scored {summary.scored:,} of {summary.rows:,} rows in {summary.seconds:.1f}s"
          f" ({summary.scored / max(summary.seconds, 1e-9):,.0f} rows/s);"
          f" {summary.failed_rows} failed rows" + (f", see {args.output}.errors.tsv"
                                                   if summary.failed_rows else ""))  # fmt: skip
    return 0


def _status(args: argparse.Namespace) -> int:
    from workers.status import collect, render

    conn = redis.Redis.from_url(resolve_redis_url(args.redis_url), socket_timeout=10)
    try:
        status = collect(conn)
    finally:
        conn.close()
    print(json.dumps(status.to_json(), indent=2) if args.json else render(status))
    return 0


def _bench_scenarios() -> list[str]:
    from workers.bench import SCENARIOS

    return list(SCENARIOS)


def _bench(args: argparse.Namespace) -> int:
    from workers import bench

    names = args.scenario or list(bench.SCENARIOS)
    unknown = sorted(set(names) - set(bench.SCENARIOS))
    if unknown:
        print(f"tfpool bench: unknown scenarios {unknown}", file=sys.stderr)
        return 2
    with redis_url_or_embedded(args.redis_url) as url:
        figures = bench.run(
            names,
            redis_url=url,
            runs=args.runs,
            workers=args.workers,
            intra_op_threads=args.intra_op_threads,
            metrics=args.metrics,
        )
    print()
    print(bench.render(figures))
    if args.json:
        Path(args.json).write_text(bench.to_json(figures))
        print(f"wrote {args.json}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from workers.demo import DemoWeights, build_demo_model, run_requests
    from workers.supervisor import Supervisor

    weights = DemoWeights.random()
    with (
        tempfile.TemporaryDirectory(prefix="tfpool-demo-") as tmp,
        redis_url_or_embedded(args.redis_url) as url,
    ):
        path = build_demo_model(tmp, weights)
        config = PoolConfig(
            model=path, name="demo", redis_url=url, workers=args.workers, log_level="WARNING"
        )
        supervisor = Supervisor(config)
        supervisor.start()
        try:
            print(f"tfpool demo: starting {len(supervisor.slots)} worker(s)...", flush=True)
            if not supervisor.wait_ready(timeout=300):
                print("tfpool demo: a worker failed to start", file=sys.stderr)
                return 1
            with Client(url) as client:
                wrong = run_requests(client, "demo", weights, requests=args.requests)
        finally:
            supervisor.drain()
    print("tfpool demo: done" if not wrong else f"tfpool demo: {wrong} wrong results")
    return 0 if not wrong else 1


if __name__ == "__main__":
    sys.exit(main())
