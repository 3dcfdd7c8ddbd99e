"""Paths to sources and sinks: a file of a table format, a folder of such files (one
output file per input file, under the same relative name), or an iterator of record
batches handed over from Python."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from queueing.datasets.base import Sink, Source, skip_rows
from queueing.datasets.formats import FORMATS, Format, format_of, supported, table_format_of_folder
from queueing.datasets.parquet import ParquetSink, ParquetSource
from queueing.datasets.text import CsvSink, CsvSource, JsonLinesSink, JsonLinesSource
from queueing.datasets.tfrecord import TFRecordSink, TFRecordSource

_SOURCES: dict[str, type[Source]] = {
    "parquet": ParquetSource, "csv": CsvSource, "jsonl": JsonLinesSource,
    "tfrecord": TFRecordSource,
}  # fmt: skip
_SINKS: dict[str, type[Sink]] = {
    "parquet": ParquetSink, "csv": CsvSink, "jsonl": JsonLinesSink, "tfrecord": TFRecordSink,
}  # fmt: skip


@dataclass
class Job:
    """One source scored into one sink; ``key`` names it in the progress record."""

    key: str
    source: Source
    sink: Sink
    output: str  # where the sink writes (for messages)


class BatchesSource:
    """Record batches from Python (data that lives elsewhere). Read once; a resumed run
    must be given the same batches again: the rows already done are read past."""

    base_dir = "."

    def __init__(self, batches: Iterable[pa.RecordBatch], name: str = "batches") -> None:
        self.name = name
        self._batches: Iterator[pa.RecordBatch] = iter(batches)
        self._first: pa.RecordBatch | None = next(self._batches, None)
        if self._first is None:
            raise ValueError("no record batches to score")

    def schema(self) -> pa.Schema:
        assert self._first is not None
        return self._first.schema

    def count_rows(self) -> int | None:
        return None

    def identity(self) -> dict[str, Any]:
        return {"batches": self.name}

    def batches(
        self, columns: Sequence[str], skip: int, batch_rows: int, as_text: Sequence[str] = ()
    ) -> Iterator[pa.RecordBatch]:
        def read() -> Iterator[pa.RecordBatch]:
            if self._first is not None:
                yield self._first
                self._first = None
            yield from self._batches

        return skip_rows((b.select(list(columns)) for b in read()), skip)


def open_jobs(source: str | Source | Iterable[pa.RecordBatch], output: str | Sink) -> list[Job]:
    """The jobs of a run: one per input file (a folder gives one per file in it)."""
    if not isinstance(source, str):
        own = source if isinstance(source, Source) else BatchesSource(source)
        return [_job(own.name, own, output)]
    if os.path.isdir(source):
        fmt = table_format_of_folder(source)
        if fmt is None:
            raise ValueError(f"{source}: no table files in it ({supported()})")
        if not isinstance(output, str):
            raise ValueError("a folder is scored into a folder: give its path")
        out_fmt = format_of(output) or fmt
        files = sorted(
            str(p.relative_to(source))
            for p in Path(source).rglob("*")
            if p.is_file() and format_of(p.name) == fmt and not p.name.startswith((".", "_"))
        )
        jobs = []
        for name in files:
            target = os.path.join(output, str(Path(name).with_suffix(out_fmt.suffixes[0])))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            jobs.append(Job(name, _open_source(os.path.join(source, name), fmt),
                            _open_sink(target, out_fmt), target))  # fmt: skip
        return jobs
    fmt = format_of(source)
    if fmt is None or not fmt.table:
        raise ValueError(f"{source}: not a table file ({supported()})")
    return [_job(os.path.basename(source), _open_source(source, fmt), output)]


def _job(key: str, source: Source, output: str | Sink) -> Job:
    if isinstance(output, str):
        fmt = format_of(output)
        if fmt is None or not fmt.table:
            raise ValueError(
                f"{output}: rows of a table are written to a table format"
                f" ({', '.join(s for f in _table_formats() for s in f.suffixes)})"
            )
        return Job(key, source, _open_sink(output, fmt), output)
    return Job(key, source, output, getattr(output, "path", type(output).__name__))


def _table_formats() -> list[Format]:
    return [f for f in FORMATS if f.table]


def _open_source(path: str, fmt: Format) -> Source:
    return _SOURCES[fmt.name](path)  # type: ignore[call-arg]


def _open_sink(path: str, fmt: Format) -> Sink:
    return _SINKS[fmt.name](path)  # type: ignore[call-arg]
