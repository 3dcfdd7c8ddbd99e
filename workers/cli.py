"""The ``tfpool`` command: serve, inspect, predict, score, status, bench, demo, gateway.

Every pool option can be given as ``--option-name``, as ``TFPOOL_OPTION_NAME`` in the
environment, or in a TOML file (``--config``); later ones win. With no Redis URL anywhere,
``serve`` and ``demo`` start a private redis-server and print its URL. The commands that
talk to a running pool (predict, score, status) are in :mod:`workers.client_commands`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import logging
import os
import sys
import tempfile
import typing
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from queueing import Client, connection
from queueing.base import without_password
from workers import client_commands, failures
from workers.config import PoolConfig, option_types
from workers.embedded_redis import RedisServer
from workers.errors import ConfigError
from workers.option_help import help_for

log = logging.getLogger("tfpool")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    debug: bool = getattr(args, "debug", False)
    logging.basicConfig(
        level="DEBUG" if debug else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the try
    except BrokenPipeError:
        # `tfpool status | head`: the reader has what it wanted. Point stdout at /dev/null
        # so that Python's own flush at exit does not complain a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return failures.EXIT_BROKEN_PIPE
    except BaseException as e:
        failure = None if debug else failures.describe(e)
        if failure is None:
            raise
        line, code = failure
        print(f"tfpool {args.command}: {line}", file=sys.stderr)
    return code


#: ``--cluster`` of the commands that talk to Redis.
CLUSTER_HELP = (
    "the Redis URL names a node of a Redis Cluster (also TFPOOL_CLUSTER=1, or a"
    " redis+cluster:// URL)"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfpool",
        description="A TensorFlow inference worker pool over Redis Streams.",
        epilog="Exit codes: 0 done; 1 done but incomplete (score: failed rows; status: a model"
        " with no live worker); 2 bad arguments, configuration, input or request; 3 serve:"
        " the model cannot be loaded; 4 Redis cannot be reached; 5 no result in time;"
        " 130 interrupted. Add --debug to any command to see the traceback of a failure.",
    )
    parser.add_argument("--version", action="version", version=f"tfpool {_version()}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND", dest="command")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        help="show tracebacks, debug logs and TensorFlow's own start-up logging",
    )

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, parents=[common])

    serve = add("serve", "run a pool of workers for one model")
    serve.add_argument(
        "--config",
        help="TOML file of options (see configs/example.toml); relative paths in it are"
        " taken from its folder (default: none)",
    )
    _add_pool_options(serve)
    serve.set_defaults(run=_serve)

    inspect = add("inspect", "a model's inputs, outputs, batch limit, and what to send it")
    inspect.add_argument("path", nargs="?", metavar="MODEL", help="the model (or --model)")
    inspect.add_argument("--config", help="TOML file of options (see configs/example.toml)")
    _add_pool_options(inspect)
    inspect.set_defaults(run=_inspect)

    predict = add("predict", "send one request, print or save the result")
    predict.add_argument("--model", required=True, help="model name")
    predict.add_argument(
        "--input", required=True, help=".npy (one input), .npz (named), or an image file"
    )
    predict.add_argument("--output", help="write here (.npy; .npz for several outputs)")
    predict.add_argument("--redis-url", help="Redis URL (default: TFPOOL_REDIS_URL)")
    predict.add_argument("--cluster", action="store_true", help=CLUSTER_HELP)
    predict.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")
    predict.add_argument("--deadline", type=float, help="seconds before the request expires")
    predict.set_defaults(run=client_commands.predict)

    score = add("score", "score a dataset file into a file, resumably")
    score.add_argument("--model", required=True, help="model name")
    score.add_argument(
        "input",
        help=".npy (memory-mapped), .npz (one array per input), a folder of images"
        " (JPEG/PNG/GIF/BMP, for a pool with preprocess = image), or a table: .parquet, .csv,"
        " .jsonl, .tfrecord (tf.train.Example), or a folder of such files",
    )
    score.add_argument(
        "output",
        help=".npy (one output) or .npz (several) for array inputs; for a table, a table"
        " format (a folder for a folder)",
    )
    score.add_argument("--redis-url", help="Redis URL (default: TFPOOL_REDIS_URL)")
    score.add_argument("--cluster", action="store_true", help=CLUSTER_HELP)
    score.add_argument("--chunk-rows", type=int, help="rows per request (default: 1024; 32 images)")
    score.add_argument("--window", type=int, default=8, help="chunks in flight")
    score.add_argument(
        "--allow-failed-rows",
        type=client_commands.allowance,
        default=0,
        metavar="N",
        help="rows that may fail with exit code 0: a count (100), or a fraction of all rows"
        " (0.01); more failed rows exit with 1 (default: 0). A first chunk that fails whole"
        " for one reason still stops the run at once (exit 2): the input or model is wrong",
    )
    score.add_argument(
        "--input-column",
        action="append",
        default=[],
        metavar="NAME=COLUMN",
        help="tables: feed model input NAME from COLUMN (COLUMN,COLUMN,... or a pattern such"
        " as f* stacks scalar columns); repeat per input (default: columns named as the"
        " inputs, or the only column for a one-input model)",
    )
    score.add_argument(
        "--keep-columns",
        default="",
        metavar="COLUMN,...",
        help="tables: columns copied to the output beside the scores (e.g. id,ts)",
    )
    score.add_argument(
        "--allow-version-change",
        action="store_true",
        help="resume even if another model version answers now than in the earlier runs",
    )
    score.set_defaults(run=client_commands.score)

    reload = add("reload", "make every pool on this Redis re-scan its model repository now")
    reload.add_argument("--redis-url", help="Redis URL (default: TFPOOL_REDIS_URL)")
    reload.add_argument("--cluster", action="store_true", help=CLUSTER_HELP)
    reload.set_defaults(run=client_commands.reload)
    status = add(
        "status", "workers of every host, queues, dead letters; exit 1 if a model has no worker"
    )
    status.add_argument("--redis-url", help="Redis URL (default: TFPOOL_REDIS_URL)")
    status.add_argument("--cluster", action="store_true", help=CLUSTER_HELP)
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    status.set_defaults(run=client_commands.status)

    bench = add("bench", "measure throughput, latency and CPU vs the bare model")
    bench.add_argument(
        "--scenario",
        action="append",
        help="scenario to run (repeatable; default: all). One of: " + ", ".join(_bench_scenarios()),
    )
    bench.add_argument("--runs", type=int, default=3, help="runs per scenario (median shown)")
    bench.add_argument(
        "--seconds", type=float, help="measure each scenario this long (default: its own)"
    )
    bench.add_argument(
        "--workers",
        type=_workers,
        default="auto",
        help="worker processes: auto (the best layout of the bare model, measured in the"
        " run, as a pool chooses at start) or a number (default: auto)",
    )
    bench.add_argument(
        "--shards", type=int, default=1, help="streams each model's queue is split into"
    )
    bench.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="TensorFlow intra-op threads per worker (default: the best layout's with auto,"
        " else cores / workers)",
    )
    bench.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="workers record no metrics (to measure what recording costs)",
    )
    bench.add_argument("--redis-url", help="Redis URL (default: a private redis-server)")
    bench.add_argument("--cluster", action="store_true", help=CLUSTER_HELP)
    bench.add_argument("--json", metavar="FILE", help="also write the figures here")
    bench.set_defaults(run=_bench)

    demo = add("demo", "build a demo model, serve it, send it requests")
    demo.add_argument("--redis-url", help="Redis URL (default: a private redis-server)")
    demo.add_argument("--cluster", action="store_true", help=CLUSTER_HELP)
    demo.add_argument("--workers", type=int, default=1, help="worker processes")
    demo.add_argument("--requests", type=int, default=2000, help="one-row requests to send")
    demo.set_defaults(run=_demo)

    from workers.gateway.command import add_parser as add_gateway_parser

    add_gateway_parser(commands)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("tfpool")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "(not installed)"


def _add_pool_options(parser: argparse.ArgumentParser) -> None:
    for option, kind in option_types().items():
        flag = "--" + option.replace("_", "-")
        help_text = help_for(option)
        if kind is bool:
            # --option / --no-option: an option on by default (metrics, convert_inputs) can
            # be turned off from the command line too.
            parser.add_argument(flag, dest=option, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)  # fmt: skip
        elif kind in (int, float, str):
            parser.add_argument(flag, dest=option, type=kind, help=help_text)
        elif kind == int | str:  # workers: a number or "auto", checked by PoolConfig
            parser.add_argument(flag, dest=option, help=help_text)
        elif typing.get_origin(kind) is dict:
            parser.add_argument(flag, dest=option, help=help_text + "; a JSON object")
        else:  # lists: comma- or space-separated
            parser.add_argument(flag, dest=option, help=help_text + "; comma-separated")


@contextlib.contextmanager
def redis_url_or_embedded(url: str | None) -> Iterator[str]:
    """The URL given, else a private redis-server's for the duration of the block."""
    if url:
        yield url
        return
    # Tied to this process: a killed `tfpool serve` takes its private Redis with it.
    with RedisServer(die_with_parent=True) as server:
        print(f"tfpool: started a private redis-server at {server.url}", flush=True)
        yield server.url


def _serve(args: argparse.Namespace) -> int:
    from workers.supervisor import Supervisor

    overrides = {k: getattr(args, k) for k in option_types() if hasattr(args, k)}
    if args.debug:
        overrides["log_level"] = "DEBUG"
    config = PoolConfig.load(config_file=args.config, overrides=overrides)
    if config.model_repo:
        from workers.repository import model_names

        if not model_names(config.model_repo):  # ConfigError when not a folder
            raise ConfigError(f"model_repo {config.model_repo} holds no model folder")
    elif not os.path.exists(config.model) and not _is_builder(config.model):
        # Said now, rather than by every worker after it has imported TensorFlow.
        where = f"; set `model` in {args.config} or pass --model" if args.config else ""
        raise ConfigError(f"model {config.model}: no such file or directory{where}")
    with redis_url_or_embedded(config.redis_url) as url:
        config = dataclasses.replace(config, redis_url=url)

        def announce(workers: int) -> None:
            what = (
                f"the models of {config.model_repo}"
                if config.model_repo
                else f"model {config.name!r} from {config.model}"
            )
            print(
                f"tfpool: serving {what} on {without_password(url)} with {workers} worker(s)",
                flush=True,
            )

        supervisor = Supervisor(config, on_ready=announce)
        return supervisor.run_forever()


def _inspect(args: argparse.Namespace) -> int:
    from workers.quiet import native_stderr_silenced, quiet_tensorflow_logging

    quiet_tensorflow_logging(debug=args.debug)  # as in a worker
    with native_stderr_silenced(enabled=not args.debug):
        import tensorflow  # noqa: F401  (its start-up lines, kept off the terminal)
    from workers.inspection import inspect_model

    overrides = {k: getattr(args, k) for k in option_types() if hasattr(args, k)}
    if args.path:
        overrides["model"] = args.path
    print(inspect_model(PoolConfig.load(config_file=args.config, overrides=overrides)))
    return 0


def _bench_scenarios() -> list[str]:
    from workers.bench import SCENARIOS

    return list(SCENARIOS)


def _workers(value: str) -> int | str:
    """``--workers`` of bench: "auto" or a number >= 1."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"auto or a number >= 1, not {value!r}")
    return number


def _bench(args: argparse.Namespace) -> int:
    from workers import bench

    names = args.scenario or list(bench.SCENARIOS)
    unknown = sorted(set(names) - set(bench.SCENARIOS))
    if unknown:
        print(f"tfpool bench: unknown scenarios {unknown}", file=sys.stderr)
        return 2
    given = (
        connection.as_cluster_url(args.redis_url, args.cluster or None) if args.redis_url else None
    )
    with redis_url_or_embedded(given) as url:
        figures = bench.run(
            names,
            redis_url=url,
            runs=args.runs,
            workers=args.workers,
            intra_op_threads=args.intra_op_threads,
            metrics=args.metrics,
            seconds=args.seconds,
            shards=args.shards,
        )
    print()
    print(bench.render(figures))
    if args.json:
        Path(args.json).write_text(bench.to_json(figures))
        print(f"wrote {args.json}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from workers.demo import DemoWeights, build_demo_model, forget_model, run_requests
    from workers.placement import describe_slots
    from workers.redis_checks import check_redis_url
    from workers.supervisor import Supervisor

    if not args.debug:  # the demo says what happens itself
        logging.getLogger().setLevel(logging.WARNING)
    weights = DemoWeights.random()
    # On the user's Redis, a name of its own: never another pool's "demo", and removed after.
    if args.redis_url:
        args.redis_url = connection.as_cluster_url(args.redis_url, args.cluster or None)
    name = f"demo-{uuid.uuid4().hex[:8]}" if args.redis_url else "demo"
    if args.redis_url:  # said now, before TensorFlow builds the model
        check_redis_url(args.redis_url)
        conn = connection.connect(args.redis_url, socket_connect_timeout=5)
        try:
            conn.ping()
        finally:
            conn.close()
    with (
        tempfile.TemporaryDirectory(prefix="tfpool-demo-") as tmp,
        redis_url_or_embedded(args.redis_url) as url,
    ):
        path = build_demo_model(tmp, weights, debug=args.debug)
        config = PoolConfig(
            model=path,
            name=name,
            redis_url=url,
            workers=args.workers,
            log_level="DEBUG" if args.debug else "WARNING",
        )
        supervisor = Supervisor(config)
        replies: list[str] = []  # the demo client's reply list, removed with the rest
        print(f"tfpool demo: {describe_slots(supervisor.slots)}; starting...", flush=True)
        supervisor.start()
        try:
            if not supervisor.wait_ready(timeout=300):
                print("tfpool demo: a worker failed to start", file=sys.stderr)
                return failures.EXIT_LOAD_FAILED
            with Client(url) as client:
                replies.append(client.reply_key)
                wrong = run_requests(client, name, weights, requests=args.requests)
        finally:
            supervisor.drain()
            if args.redis_url:
                forget_model(url, name, replies)
    print("tfpool demo: done" if not wrong else f"tfpool demo: {wrong} wrong results")
    return failures.EXIT_OK if not wrong else failures.EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())


def _is_builder(model: str) -> bool:
    """``module:callable``: a model built by the user's code, not a path."""
    module, sep, name = model.partition(":")
    return bool(sep) and all(p.isidentifier() for p in [*module.split("."), name])
