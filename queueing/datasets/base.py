"""What the scoring engine asks of a dataset: a :class:`Source` of record batches and a
:class:`Sink` that appends tables in row order and can be resumed after an interruption.

A source reads a batch at a time (never the whole dataset); the engine cuts its batches
into chunks of exactly ``chunk_rows`` rows (the last one shorter), so that chunk ``k`` is
always rows ``k * chunk_rows`` onwards whatever the reader's own batch sizes: a resumed run
sends the same chunks and writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, BinaryIO, Protocol, runtime_checkable

import pyarrow as pa


@runtime_checkable
class Source(Protocol):
    """Rows of one dataset file (or of an iterator), read in order."""

    #: How the source is named in messages and in the progress record.
    name: str
    #: Where relative file paths in a column of paths are found (the file's folder).
    base_dir: str

    def schema(self) -> pa.Schema:
        """The columns (may read the first block of the file)."""
        ...

    def count_rows(self) -> int | None:
        """The number of rows, for the progress bar: from metadata, or from a fast pass
        that counts records without parsing them. None when it cannot be known."""
        ...

    def identity(self) -> dict[str, Any]:
        """What changes when the content does (size and mtime of a file)."""
        ...

    def batches(
        self, columns: Sequence[str], skip: int, batch_rows: int, as_text: Sequence[str] = ()
    ) -> Iterator[pa.RecordBatch]:
        """The rows from row ``skip`` on, of the named columns only, about ``batch_rows``
        at a time. ``as_text``: columns to read as text where the format would otherwise
        parse them (CSV), so that a bad value fails its row, not the whole read."""
        ...


@runtime_checkable
class Sink(Protocol):
    """Where the scored rows of one source go, appended in input order."""

    def write(self, table: pa.Table) -> None:
        """Append the rows of ``table`` (kept columns, outputs, ``error``)."""
        ...

    def checkpoint(self) -> dict[str, Any]:
        """Make what was written durable and return what :meth:`resume` needs to continue
        from exactly here (JSON-serialisable)."""
        ...

    def resume(self, state: dict[str, Any]) -> None:
        """Continue a sink whose last checkpoint returned ``state``: whatever was written
        after it is dropped."""
        ...

    def finish(self) -> None:
        """Complete the file: after this it is the final output."""
        ...

    def close(self) -> None:
        """Release the files on an interruption (after a checkpoint)."""
        ...


def rechunk(batches: Iterable[pa.RecordBatch], chunk_rows: int) -> Iterator[pa.Table]:
    """Tables of exactly ``chunk_rows`` rows (the last may be shorter) from batches of any
    size. Holds at most one chunk plus one batch."""
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while batch.num_rows:
            take = min(chunk_rows - count, batch.num_rows)
            held.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == chunk_rows:
                yield pa.Table.from_batches(held)
                held, count = [], 0
    if count:
        yield pa.Table.from_batches(held)


def skip_rows(batches: Iterable[pa.RecordBatch], skip: int) -> Iterator[pa.RecordBatch]:
    """The batches from row ``skip`` on: for readers that cannot seek."""
    for batch in batches:
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        yield batch.slice(skip) if skip else batch
        skip = 0


def sync_append(file: BinaryIO | None) -> int:
    """Flush and fsync a file written by appending; its length (0 before the first write)."""
    if file is None:
        return 0
    file.flush()
    os.fsync(file.fileno())
    return file.tell()


def reopen_append(path: str, length: int) -> BinaryIO:
    """A file written by appending, cut back to ``length`` (what its last checkpoint had),
    open to append after it."""
    file = open(path, "r+b" if os.path.exists(path) else "wb")  # noqa: SIM115 - for the run
    file.truncate(length)
    file.seek(length)
    return file
