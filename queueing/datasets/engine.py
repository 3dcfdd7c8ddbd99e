"""Scoring a table dataset: chunks of rows from sources, through the pool, into sinks.

As for arrays (:mod:`queueing.score`): a window of chunks is in flight, results are
written in input order as they arrive, a chunk that fails is re-run row by row, and the
run resumes after an interruption. Here the rows written are tables: the kept columns,
one column per model output (a list column for an output of several values), and
``error`` (null where the row was scored; where it was not, the reason, and null
outputs).

Several files (a folder) are one stream of chunks: the window spans files, so the last
chunks of one file are in flight with the first of the next. Chunks come back in order,
so at any time the files before one are finished, the files after it untouched, and the
progress record (``OUTPUT.progress.json``) holds, per file, whether it is finished or how
many rows its sink has made durable and what the sink needs to continue from there.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from queueing import connection, model_info
from queueing.client import Client, RequestFuture
from queueing.datasets.base import Sink, Source, rechunk
from queueing.datasets.columns import (
    ERROR_COLUMN,
    InputMapping,
    InputSpec,
    output_arrays,
    parse_model_inputs,
    to_arrow,
)
from queueing.datasets.files import Job, open_jobs
from queueing.errors import RequestError, RequestLost, RequestTimeout
from queueing.wire import Outputs, Sendable

log = logging.getLogger(__name__)

#: Seconds between checkpoints.
SAVE_EVERY_S = 2.0


@dataclass
class _Chunk:
    job: Job
    rows: pa.Table  # the input and kept columns of these rows
    inputs: Sendable | None  # None: the rows could not be converted together
    future: RequestFuture | None


@dataclass
class _End:
    job: Job  # every chunk of this job is before this marker in the window


@dataclass
class _State:
    """The progress record: what is durable, per job."""

    fingerprint: dict[str, Any]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    schema: pa.Schema | None = None  # the output columns' types, once known


def score_dataset(
    client: Client,
    model: str,
    source: str | Source | Iterable[pa.RecordBatch],
    output: str | Sink,
    *,
    input_columns: dict[str, list[str]] | None,
    keep_columns: Sequence[str],
    chunk_rows: int,
    window: int,
    timeout: float,
    progress: Callable[[int, int], Any],
) -> tuple[int, int, int, float]:
    """Score every row of ``source`` into ``output``, continuing an interrupted run.
    Returns (rows, scored this run, failed rows this run, seconds)."""
    _flat_memory_pool()
    jobs = open_jobs(source, output)
    sidecar = (output if isinstance(output, str) else jobs[0].output) + ".progress.json"
    fingerprint = {
        "model": model,
        "chunk_rows": chunk_rows,
        "input_columns": input_columns,
        "keep_columns": list(keep_columns),
        "files": {job.key: job.source.identity() for job in jobs},
    }
    state = _load(sidecar, fingerprint) if os.path.exists(sidecar) else _State(fingerprint)
    spec = _model_inputs(client, model)
    run = _Run(client, model, state, sidecar, keep_columns, chunk_rows, timeout)
    for job in jobs:
        record = state.files.get(job.key)
        if record is not None and not record.get("finished"):
            job.sink.resume(record["sink"])
    for job in jobs:  # a column missing or unmapped is said now, before anything is written
        if not state.files.get(job.key, {}).get("finished"):
            run.mappings[job.key] = InputMapping(
                job.source.schema(),
                spec=spec,
                input_columns=input_columns,
                keep_columns=keep_columns,
            )
    counts = [job.source.count_rows() for job in jobs]
    total = 0 if None in counts else sum(c or 0 for c in counts)  # 0: not known
    done = sum(_rows_done(state, job) for job in jobs)
    bar = progress(total, done)
    run.bar = bar
    started = time.monotonic()
    try:
        run.loop(jobs, window)
    except BaseException:
        run.save(jobs)  # what is done stays done: the next run starts from here
        for job in jobs:
            job.sink.close()
        raise
    finally:
        bar.close()
    if os.path.exists(sidecar):
        os.remove(sidecar)
    rows = done + run.scored
    return rows, run.scored, run.failed, time.monotonic() - started


def _rows_done(state: _State, job: Job) -> int:
    record = state.files.get(job.key, {})
    return int(record.get("rows", 0))


class _Run:
    """One run's loop and what it has written (single-threaded: the caller's thread)."""

    def __init__(
        self,
        client: Client,
        model: str,
        state: _State,
        sidecar: str,
        keep_columns: Sequence[str],
        chunk_rows: int,
        timeout: float,
    ) -> None:
        self.client, self.model, self.state, self.sidecar = client, model, state, sidecar
        self.keep, self.chunk_rows, self.timeout = list(keep_columns), chunk_rows, timeout
        self.scored = self.failed = 0
        self.bar: Any = None
        # Rows held back because they failed before any output's type was known (a
        # column of nulls needs a type): written as soon as a chunk succeeds.
        self.held: list[tuple[Job, pa.Table, list[str | None]]] = []
        self.unfinished: list[Job] = []  # their last rows are among the held ones
        self.rows_written: dict[str, int] = {}
        self.mappings: dict[str, InputMapping] = {}

    def loop(self, jobs: list[Job], window: int) -> None:
        in_flight: deque[_Chunk | _End] = deque()
        pending = self._chunks(jobs)
        last_save = time.monotonic()
        while True:
            while sum(isinstance(c, _Chunk) for c in in_flight) < window:
                item = next(pending, None)
                if item is None:
                    break
                in_flight.append(item)
            if not in_flight:
                break
            item = in_flight.popleft()
            if isinstance(item, _End):
                self._finish(item.job)
                continue
            self._collect(item)
            if time.monotonic() - last_save > SAVE_EVERY_S:
                self.save(jobs)
                last_save = time.monotonic()
        if self.held:  # every row failed, and no output's type was ever seen
            self.state.schema = pa.schema([])
            self._release_held()

    def _chunks(self, jobs: list[Job]) -> Iterator[_Chunk | _End]:
        for job in jobs:
            record = self.state.files.get(job.key, {})
            if record.get("finished"):
                continue
            skip = int(record.get("rows", 0))
            self.rows_written[job.key] = skip
            mapping = self.mappings[job.key]
            columns = list(dict.fromkeys(mapping.columns + self.keep))
            batches = job.source.batches(columns, skip, self.chunk_rows, as_text=mapping.columns)
            for rows in rechunk(batches, self.chunk_rows):
                try:
                    inputs: Sendable | None = mapping.convert(rows, job.source.base_dir)
                except ValueError:
                    inputs = None  # the rows go one by one, and say which fails
                future = None
                if inputs is not None:
                    (future,) = self.client.submit_many(self.model, [inputs])
                yield _Chunk(job, rows, inputs, future)
            yield _End(job)

    def _collect(self, chunk: _Chunk) -> None:
        """Write a chunk's rows; if it failed, score its rows one by one."""
        n = chunk.rows.num_rows
        if chunk.future is not None:
            for attempt in range(3):
                try:
                    outputs = self.client.wait(chunk.future, timeout=self.timeout)
                except (RequestLost, RequestTimeout):
                    if attempt == 2:
                        break
                    assert chunk.inputs is not None  # a future was sent for them
                    (chunk.future,) = self.client.submit_many(self.model, [chunk.inputs])
                    continue
                except RequestError:
                    break
                self._write(chunk.job, chunk.rows, [outputs], [None] * n, whole=True)
                return
        results, errors = self._rows_alone(chunk)
        self._write(chunk.job, chunk.rows, results, errors, whole=False)

    def _rows_alone(self, chunk: _Chunk) -> tuple[list[Outputs | None], list[str | None]]:
        mapping = self.mappings[chunk.job.key]
        sendable: dict[int, Sendable] = {}
        errors: list[str | None] = []
        for row in range(chunk.rows.num_rows):
            try:
                sendable[row] = mapping.convert(chunk.rows.slice(row, 1), chunk.job.source.base_dir)
                errors.append(None)
            except ValueError as e:
                errors.append(f"InvalidInput: {e}")
        sent = self.client.submit_many(self.model, list(sendable.values()))  # one round trip
        futures = dict(zip(sendable, sent, strict=True))
        results: list[Outputs | None] = []
        for row in range(chunk.rows.num_rows):
            future = futures.get(row)
            if future is None:
                results.append(None)
                continue
            try:
                results.append(self.client.wait(future, timeout=self.timeout))
            except RequestError as e:
                results.append(None)
                errors[row] = " ".join(f"{type(e).__name__}: {e}".split())
        return results, errors

    def _write(
        self,
        job: Job,
        rows: pa.Table,
        results: list[Outputs | None],
        errors: list[str | None],
        *,
        whole: bool,
    ) -> None:
        """Append rows to the job's sink: kept columns, outputs, error."""
        n = rows.num_rows
        failed = np.array([e is not None for e in errors], dtype=bool)
        columns: dict[str, pa.Array] = {name: rows.column(name) for name in self.keep}
        outputs = _outputs(results, failed, whole)
        if outputs is None:
            if self.state.schema is None:
                self.held.append((job, rows, errors))
                return
            outputs = {f.name: pa.nulls(n, f.type) for f in self.state.schema}
        elif self.state.schema is None:
            self.state.schema = pa.schema([pa.field(k, v.type) for k, v in outputs.items()])
        columns.update(outputs)
        columns[ERROR_COLUMN] = pa.array(errors, pa.string())
        if self.held:
            self._release_held()
        job.sink.write(pa.table(columns))
        self.rows_written[job.key] = self.rows_written.get(job.key, 0) + n
        self.scored += n
        self.failed += int(failed.sum())
        self.bar.update(n)

    def _release_held(self) -> None:
        held, self.held = self.held, []
        for job, rows, errors in held:
            self._write(job, rows, [None] * rows.num_rows, errors, whole=False)
        unfinished, self.unfinished = self.unfinished, []
        for job in unfinished:
            self._finish(job)

    def _finish(self, job: Job) -> None:
        if self.held:
            self.unfinished.append(job)  # finished once its held rows are written
            return
        job.sink.finish()
        self.state.files[job.key] = {"finished": True, "rows": self.rows_written[job.key]}

    def save(self, jobs: list[Job]) -> None:
        """Checkpoint every started, unfinished job's sink, then record the run."""
        if self.held:
            return  # the held rows are not written: nothing past them is durable yet
        for job in jobs:
            record = self.state.files.get(job.key, {})
            if record.get("finished") or job.key not in self.rows_written:
                continue
            self.state.files[job.key] = {
                "rows": self.rows_written[job.key],
                "sink": job.sink.checkpoint(),
            }
        schema = self.state.schema
        record = {
            "fingerprint": self.state.fingerprint,
            "files": self.state.files,
            "schema": None
            if schema is None
            else base64.b64encode(schema.serialize().to_pybytes()).decode(),
        }
        tmp = self.sidecar + ".tmp"
        Path(tmp).write_text(json.dumps(record))
        os.replace(tmp, self.sidecar)


def _outputs(
    results: list[Outputs | None], failed: np.ndarray, whole: bool
) -> dict[str, pa.Array] | None:
    """The output columns of a chunk's rows; None when no row has outputs."""
    if whole:
        return {k: to_arrow(v, None) for k, v in output_arrays(results[0]).items()}  # type: ignore[arg-type]
    good = [output_arrays(r) for r in results if r is not None]
    if not good:
        return None
    columns = {}
    for name, first in good[0].items():
        values = np.repeat(first[:1], len(results), axis=0)  # failed rows: masked anyway
        values[~failed] = np.concatenate([g[name] for g in good])
        columns[name] = to_arrow(values, failed)
    return columns


def _load(sidecar: str, fingerprint: dict[str, Any]) -> _State:
    record = json.loads(Path(sidecar).read_text())
    if record.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{sidecar} is from a different run (other input, model, columns or chunk size);"
            " delete it (and the partial output) to start over"
        )
    schema = record.get("schema")
    return _State(
        fingerprint,
        record["files"],
        None if schema is None else pa.ipc.read_schema(pa.py_buffer(base64.b64decode(schema))),
    )


def _model_inputs(client: Client, model: str) -> list[InputSpec] | None:
    """The inputs of the version ``model`` names, as its pool describes them in Redis
    (names, dtypes): how columns are matched and cast. None before any pool has served
    the model."""
    conn = connection.connect(client.redis_url, socket_timeout=10)
    try:
        text = model_info.read_field(conn, model, "inputs")
    finally:
        conn.close()
    return parse_model_inputs(text) if text else None


def _flat_memory_pool() -> None:
    """Make pyarrow allocate with jemalloc (or the system allocator) rather than mimalloc,
    its default in current wheels: reading a Parquet file a batch at a time, mimalloc's RSS
    grew with every row group read (84 MB over a 136 MB file of strings, measured), where
    jemalloc's stayed within 25 MB. Process-wide, as pyarrow's pool is."""
    if pa.default_memory_pool().backend_name != "mimalloc":
        return
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without jemalloc
        pool = pa.system_memory_pool()
    pa.set_memory_pool(pool)
