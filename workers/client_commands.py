"""The ``tfpool`` commands that talk to a running pool: predict, score, status. Each takes
the parsed arguments (:mod:`workers.cli`) and returns the exit code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from queueing import Client, connection
from queueing.client import resolve_redis_url
from queueing.datasets.arrays import IMAGE_SUFFIXES, check_output_suffix, numpy_kind
from queueing.score import single_output_name
from workers import failures


def redis_url_of(args: argparse.Namespace) -> str:
    """The Redis URL of a command: ``--redis-url`` or TFPOOL_REDIS_URL, in the cluster form
    with ``--cluster`` (or TFPOOL_CLUSTER)."""
    return connection.as_cluster_url(resolve_redis_url(args.redis_url), args.cluster or None)


def _load_inputs(path: str) -> Any:
    if path.lower().endswith(IMAGE_SUFFIXES):  # sent encoded, for a pool that decodes images
        return Path(path).read_bytes()
    if numpy_kind(path) == "npz":
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    return np.load(path, allow_pickle=False)


def predict(args: argparse.Namespace) -> int:
    if args.output:
        check_output_suffix(args.output)
    inputs = _load_inputs(args.input)
    url = redis_url_of(args)
    with Client(url) as client:
        outputs = client.predict(args.model, inputs, timeout=args.timeout, deadline=args.deadline)
    if args.output:
        if args.output.endswith(".npz"):
            if not isinstance(outputs, dict):
                outputs = {_single_output_name(url, args.model): outputs}
            np.savez(args.output, **outputs)  # type: ignore[arg-type]
        elif isinstance(outputs, dict):
            raise ValueError(
                f"model {args.model!r} has {len(outputs)} outputs ({', '.join(outputs)}):"
                " write them to a .npz"
            )
        else:
            np.save(args.output, outputs)
        print(f"wrote {args.output}")
    elif isinstance(outputs, dict):
        for name, value in outputs.items():
            print(f"{name}: {value.dtype} {list(value.shape)}\n{value}")
    else:
        print(f"{outputs.dtype} {list(outputs.shape)}\n{outputs}")
    return 0


def _single_output_name(url: str, model: str) -> str:
    conn = connection.connect(url, socket_timeout=10)
    try:
        return single_output_name(conn, model)
    finally:
        conn.close()


def allowance(text: str) -> float:
    """``--allow-failed-rows``: a count of rows (``100``), or a fraction of them (``0.01``)."""
    try:
        value = float(text) if "." in text or "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count or a fraction") from None
    if value < 0 or (isinstance(value, float) and value > 1):
        raise argparse.ArgumentTypeError(f"{text!r}: a count >= 0, or a fraction from 0 to 1")
    return value


def score(args: argparse.Namespace) -> int:
    from queueing.score import score as score_file
    from workers.memory import keep_large_buffers

    keep_large_buffers()  # a chunk is a megabyte: no fresh pages from the kernel for each

    from queueing.datasets.formats import is_table_path

    if not (is_table_path(args.input) or is_table_path(args.output)):
        check_output_suffix(args.output)
    input_columns = None
    if args.input_column:
        from queueing.datasets.columns import parse_input_columns

        input_columns = parse_input_columns(args.input_column)
    keep = [c.strip() for c in args.keep_columns.split(",") if c.strip()]
    with Client(redis_url_of(args)) as client:
        try:
            summary = score_file(client, args.model, args.input, args.output,
                            chunk_rows=args.chunk_rows, window=args.window,
                            input_columns=input_columns, keep_columns=keep,
                            allow_version_change=args.allow_version_change)  # fmt: skip
        except KeyboardInterrupt:
            print("tfpool score: interrupted; run the same command again to continue",
                  file=sys.stderr)  # fmt: skip
            return failures.EXIT_INTERRUPTED
    earlier = summary.rows_done - summary.scored
    print(f"scored {summary.rows_done:,} of {summary.rows:,} rows"
          + (f" ({summary.scored:,} in this run, {earlier:,} before)" if earlier else "")
          + f" in {summary.seconds:.1f}s ({summary.scored / max(summary.seconds, 1e-9):,.0f}"
          " rows/s); "
          + (f"model version {', '.join(map(str, summary.model_versions))}; "
             if summary.model_versions else "")
          + f"{summary.failed_rows:,} failed rows"
          + (_where_errors_are(args.output) if summary.failed_rows else ""))  # fmt: skip
    allowance: float = args.allow_failed_rows
    allowed = allowance * summary.rows if isinstance(allowance, float) else allowance
    if summary.failed_rows > allowed:
        print(
            f"tfpool score: {summary.failed_rows:,} of {summary.rows:,} rows failed, more than"
            f" --allow-failed-rows {allowance} allows{_where_errors_are(args.output, '; ')}",
            file=sys.stderr,
        )
        return failures.EXIT_INCOMPLETE
    return failures.EXIT_OK


def _where_errors_are(output: str, separator: str = ", ") -> str:
    from queueing.datasets.formats import is_table_path

    if is_table_path(output):
        return f"{separator}see the column 'error' of {output}"
    return f"{separator}see {output}.errors.tsv"


def status(args: argparse.Namespace) -> int:
    from workers.status import collect, render

    conn = connection.connect(redis_url_of(args), socket_timeout=10)
    try:
        status = collect(conn)
    finally:
        conn.close()
    print(json.dumps(status.to_json(), indent=2) if args.json else render(status))
    dead = status.models_without_workers
    if dead:
        sys.stdout.flush()
        print(
            f"tfpool status: no live worker for {', '.join(repr(n) for n in dead)}",
            file=sys.stderr,
        )
        return failures.EXIT_INCOMPLETE
    return failures.EXIT_OK


def reload(args: argparse.Namespace) -> int:
    """Ask every pool on this Redis to scan its model repository now."""
    from queueing import keys

    conn = connection.connect(redis_url_of(args), socket_timeout=10)
    try:
        count = conn.incr(keys.RELOAD)
    finally:
        conn.close()
    print(f"tfpool reload: asked the pools to scan their repositories (reload {count})")
    return failures.EXIT_OK
