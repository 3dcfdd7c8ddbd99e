"""Offline dataset scoring: rows from a file, through the pool, into a file, resumably.

The input is read a chunk at a time (``.npy`` memory-mapped, never loaded whole; a folder
of images one file per row, in sorted order, listed in ``OUTPUT.files.txt``; see
:mod:`queueing.datasets.arrays`), a fixed window of chunks is in flight, and outputs are
written into memory-mapped ``.npy`` files as the results arrive, so memory stays flat
however many rows there are (table formats go through :mod:`queueing.datasets.engine`).
A sidecar file (``OUTPUT.progress.json``) records the chunks done; the output's data is
flushed before a chunk is recorded, so a run interrupted at any point continues where it
stopped when run again with the same arguments. A chunk that fails is re-run row by row;
the rows that fail alone go to ``OUTPUT.errors.tsv`` (row, error) and their output rows
are left NaN (-1 for integer outputs, such as top-k indices). A bad row never aborts the
run; but when every row of the first chunk fails for the same reason (the wrong dtype,
images sent to a pool that does not decode them), so will the rest: the run stops at
once, with that reason and nothing written. Waiting for a pool that has no live worker
stops the run too.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import redis

from queueing import connection, liveness, model_info
from queueing.client import Client, RequestFuture
from queueing.datasets.arrays import (
    ArrayOutput,
    ImageFolder,
    Input,
    check_output_suffix,
    identity,
    open_input,
    read_rows,
)
from queueing.datasets.arrays import VersionChanged as VersionChanged  # raised by score()
from queueing.datasets.formats import is_table_path
from queueing.errors import RequestError, RequestLost, RequestTimeout

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    import pyarrow as pa

    from queueing.datasets.base import Sink, Source

log = logging.getLogger(__name__)

#: Seconds between progress records (and log lines when not on a terminal).
SAVE_EVERY_S = 2.0
LOG_EVERY_S = 5.0


def single_output_name(conn: redis.Redis, model: str) -> str:
    """The name of ``model``'s one output (of the version it names) as its workers
    registered it (the member of a ``.npz`` it is written to); ``output`` when unknown."""
    names = model_info.read_field(conn, model, "outputs")
    listed = [n.strip() for n in names.split(",")] if names else []
    return listed[0] if len(listed) == 1 and listed[0] else "output"


@dataclass
class ScoreSummary:
    rows: int
    scored: int  # this run
    failed_rows: int  # in every run of this job
    seconds: float  # this run
    rows_done: int = 0  # in every run of this job (a resumed run counts the earlier ones')
    #: The model versions that answered, in every run of this job (empty: the pool did not say).
    model_versions: tuple[int, ...] = ()


class Progress:
    """A progress bar on a terminal (rows, rows/s, ETA); a log line every few seconds
    otherwise."""

    def __init__(self, total: int, done: int, stream: TextIO = sys.stderr) -> None:
        self.total, self.done, self.stream = total, done, stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.start_done = done
        self._shown = 0.0

    def update(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if now - self._shown < (0.1 if self.tty else LOG_EVERY_S) and (
            self.done < self.total or self.total <= 0
        ):
            return
        self._shown = now
        rate = (self.done - self.start_done) / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if 0 <= eta < 1e7 else "?"
        text = f"{self.done:,}/{self.total:,} rows  {rate:,.0f} rows/s  ETA {eta_text}"
        if self.total <= 0:  # not known (record batches from Python): no bar, no ETA
            text = f"{self.done:,} rows  {rate:,.0f} rows/s"
        if self.tty:
            filled = min(int(30 * self.done / max(self.total, 1)), 30) if self.total > 0 else 0
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {text}", end="", file=self.stream)
        else:
            print(f"scored {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=self.stream)


def score(
    client: Client,
    model: str,
    input_path: str | Source | Iterable[pa.RecordBatch],
    output_path: str | Sink,
    *,
    chunk_rows: int | None = None,
    window: int = 8,
    timeout: float = 300.0,
    progress: Callable[[int, int], Progress] = Progress,
    input_columns: Mapping[str, Sequence[str]] | None = None,
    keep_columns: Sequence[str] = (),
    allow_version_change: bool = False,
) -> ScoreSummary:
    """Score every row of ``input_path`` with ``model`` into ``output_path``; continue an
    interrupted run of the same job. See the module docstring. ``chunk_rows`` defaults to
    1024 rows of an array, 32 images of a folder.

    Raises the error of the first chunk's rows when every one of them failed the same way
    (nothing is left written), and :class:`RequestTimeout` when a chunk times out while no
    worker of ``model`` is live (what is done stays done). The model versions that answered
    are recorded in the progress record and returned; resuming a run of arrays across a
    version change raises :class:`VersionChanged` unless ``allow_version_change``.

    A table dataset (Parquet, CSV, JSON Lines, TFRecord: a file, a folder of files, a
    :class:`~queueing.datasets.base.Source`, or an iterable of ``pyarrow.RecordBatch``)
    goes to a table format or a :class:`~queueing.datasets.base.Sink`, through
    :mod:`queueing.datasets.engine`: ``input_columns`` maps model inputs to columns
    (``{"x": ["features"]}``), ``keep_columns`` are carried through to the output."""
    if not (isinstance(input_path, str) and isinstance(output_path, str)) or any(
        is_table_path(p) for p in (input_path, output_path)
    ):
        return _score_dataset(
            client, model, input_path, output_path, chunk_rows=chunk_rows or 1024,
            window=window, timeout=timeout, progress=progress,
            input_columns=input_columns, keep_columns=keep_columns,
        )  # fmt: skip
    check_output_suffix(output_path)
    inputs, rows = open_input(input_path)
    folder = inputs if isinstance(inputs, ImageFolder) else None
    if chunk_rows is None:
        chunk_rows = 1024 if folder is None else 32
    if chunk_rows < 1 or window < 1:
        raise ValueError("chunk_rows and window must be >= 1")
    fingerprint = {
        "input": os.path.abspath(input_path),
        **identity(input_path, folder),
        "model": model,
        "rows": rows,
        "chunk_rows": chunk_rows,
    }
    output = ArrayOutput(output_path, fingerprint, None if folder is None else folder.files,
                         allow_version_change=allow_version_change)  # fmt: skip
    resumed = output.resume()
    if not resumed and folder is not None:
        # Row i of the output is the i-th file of this list.
        Path(output_path + ".files.txt").write_text("".join(f + "\n" for f in folder.files))
    pool = _Pool(client.redis_url, model)
    try:
        output.single_name = pool.single_output_name()
        pool.warn_if_down()
        return _run(client, model, inputs, rows, chunk_rows, window, timeout, output, pool,
                    progress, fresh=not output.done)  # fmt: skip
    finally:
        pool.close()


def _run(
    client: Client,
    model: str,
    inputs: Input,
    rows: int,
    chunk_rows: int,
    window: int,
    timeout: float,
    output: ArrayOutput,
    pool: _Pool,
    progress: Callable[[int, int], Progress],
    *,
    fresh: bool,
) -> ScoreSummary:
    chunks = [c for c in range(-(-rows // chunk_rows)) if c not in output.done]
    bar = progress(rows, rows - sum(_chunk_rows(c, chunk_rows, rows) for c in chunks))
    started = time.monotonic()
    scored = 0
    last_save = started
    in_flight: deque[tuple[int, RequestFuture]] = deque()
    pending = iter(chunks)
    first = fresh  # the next chunk collected is the job's first
    try:
        while True:
            while len(in_flight) < window:
                chunk = next(pending, None)
                if chunk is None:
                    break
                in_flight.append((chunk, _submit(client, model, inputs, chunk, chunk_rows, rows)))
            if not in_flight:
                break
            chunk, future = in_flight.popleft()
            span = range(
                chunk * chunk_rows, chunk * chunk_rows + _chunk_rows(chunk, chunk_rows, rows)
            )
            failed = _collect(client, model, inputs, span, future, output, timeout, pool,
                              first=first)  # fmt: skip
            first = False
            output.failed_rows += failed
            output.done.add(chunk)
            scored += len(span)
            bar.update(len(span))
            if time.monotonic() - last_save > SAVE_EVERY_S:
                output.save()
                last_save = time.monotonic()
    except _FirstChunkFailed as e:
        output.discard()  # nothing of use was written: no files left to mislead
        raise e.error from None
    except BaseException:
        if output.done or output.layout is not None:
            output.save()  # what is done stays done: the next run starts from here
        else:
            output.discard()  # nothing done: nothing to resume, no files left behind
        raise
    finally:
        bar.close()
    output.finish()
    return ScoreSummary(
        rows=rows,
        scored=scored,
        failed_rows=output.failed_rows,
        seconds=time.monotonic() - started,
        rows_done=rows,
        model_versions=tuple(sorted(output.versions)),
    )


class _FirstChunkFailed(Exception):
    """Every row of the job's first chunk failed for one reason: ``error``."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(str(error))
        self.error = error


class _Pool:
    """What scoring asks Redis about the pool, on a connection of its own."""

    def __init__(self, redis_url: str, model: str) -> None:
        self.model = model
        self.conn = connection.connect(redis_url, socket_timeout=10)

    def single_output_name(self) -> str:
        try:
            return single_output_name(self.conn, self.model)
        except redis.RedisError:
            return "output"

    def down(self) -> liveness.Liveness | None:
        """The model's liveness when no worker is live; None when one is (or if unknown)."""
        try:
            state = liveness.read(self.conn, self.model)
        except redis.RedisError:
            return None
        return None if state.live else state

    def warn_if_down(self) -> None:
        state = self.down()
        if state is not None:
            log.warning("%s: scoring waits for a worker (Ctrl-C to stop)", state.describe())

    def close(self) -> None:
        self.conn.close()


def _score_dataset(
    client: Client,
    model: str,
    source: str | Source | Iterable[pa.RecordBatch],
    output: str | Sink,
    *,
    chunk_rows: int,
    window: int,
    timeout: float,
    progress: Callable[[int, int], Progress],
    input_columns: Mapping[str, Sequence[str]] | None,
    keep_columns: Sequence[str],
) -> ScoreSummary:
    try:
        from queueing.datasets.engine import score_dataset
    except ImportError as e:
        raise ImportError(
            f"scoring Parquet, CSV, JSON Lines or TFRecord needs {e.name}:"
            " pip install 'tfpool[datasets]'"
        ) from e
    if chunk_rows < 1 or window < 1:
        raise ValueError("chunk_rows and window must be >= 1")
    rows, scored, failed, seconds = score_dataset(
        client, model, source, output,
        input_columns=None if not input_columns else {k: list(c) for k, c in input_columns.items()},
        keep_columns=keep_columns, chunk_rows=chunk_rows, window=window, timeout=timeout,
        progress=progress,
    )  # fmt: skip
    return ScoreSummary(
        rows=rows, scored=scored, failed_rows=failed, seconds=seconds, rows_done=rows
    )


def _chunk_rows(chunk: int, chunk_rows: int, rows: int) -> int:
    return min(chunk_rows, rows - chunk * chunk_rows)


def _submit(
    client: Client, model: str, inputs: Any, chunk: int, chunk_rows: int, rows: int
) -> RequestFuture:
    span = range(chunk * chunk_rows, chunk * chunk_rows + _chunk_rows(chunk, chunk_rows, rows))
    (future,) = client.submit_many(model, [read_rows(inputs, span)])
    return future


def _collect(
    client: Client,
    model: str,
    inputs: Any,
    span: range,
    future: RequestFuture,
    output: ArrayOutput,
    timeout: float,
    pool: _Pool,
    *,
    first: bool,
) -> int:
    """Write a chunk's outputs; if it failed, score its rows one by one. Returns how many
    rows failed."""
    for attempt in range(3):
        try:
            outputs = client.wait(future, timeout=timeout)
            output.note_version(future.model_version)
            output.write(span.start, outputs)
            return 0
        except (RequestLost, RequestTimeout) as e:
            if isinstance(e, RequestTimeout) and pool.down() is not None:
                raise  # its message says that no worker is live: waiting more will not help
            if attempt == 2:
                break
            (future,) = client.submit_many(model, [read_rows(inputs, span)])  # lost: send again
        except RequestError:
            break
    failed = 0
    reasons: set[str] = set()
    first_error: RequestError | None = None
    singles = client.submit_many(model, [read_rows(inputs, range(r, r + 1)) for r in span])
    for row, single in zip(span, singles, strict=True):
        try:
            outputs = client.wait(single, timeout=timeout)
            output.note_version(single.model_version)
            output.write(row, outputs)
        except RequestError as e:
            if isinstance(e, RequestTimeout) and pool.down() is not None:
                raise
            output.fail_rows(range(row, row + 1), e)
            failed += 1
            reasons.add(f"{type(e).__name__}: {e}")
            first_error = first_error or e
    if first and failed == len(span) and len(reasons) == 1 and first_error is not None:
        raise _FirstChunkFailed(
            type(first_error)(
                f"every row of the first chunk (rows {span.start}-{span.stop - 1}) failed the"
                f" same way, so scoring stopped with nothing written: {first_error}",
                request_id=first_error.request_id,
            )
        )
    return failed
