"""Parquet files, read a record batch at a time and written a row group per chunk.

A Parquet file cannot be appended to once its footer is written, nor resumed without it.
So the sink writes complete files, ``OUTPUT.parts/part-NNNNN.parquet``, closing one at each
checkpoint, and at the end copies their row groups, one per chunk, into ``OUTPUT``: the
row groups are the same however the run was cut into parts, and so are the final bytes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from queueing.datasets.base import skip_rows

#: Bytes read from a Parquet file at a time.
READ_BUFFER_BYTES = 4 << 20


class ParquetSource:
    """The rows of one Parquet file, only the columns asked for, from any row on."""

    def __init__(self, path: str) -> None:
        self.path, self.name, self.base_dir = path, os.path.basename(path), os.path.dirname(path)
        self._file = _open(path)

    def schema(self) -> pa.Schema:
        return self._file.schema_arrow

    def count_rows(self) -> int:
        return int(self._file.metadata.num_rows)

    def identity(self) -> dict[str, Any]:
        stat = os.stat(self.path)
        return {"size": stat.st_size, "mtime": stat.st_mtime_ns}

    def batches(
        self, columns: Sequence[str], skip: int, batch_rows: int, as_text: Sequence[str] = ()
    ) -> Iterator[pa.RecordBatch]:
        # Whole row groups before ``skip`` are not read at all.
        metadata, first = self._file.metadata, 0
        while first < metadata.num_row_groups and skip >= metadata.row_group(first).num_rows:
            skip -= metadata.row_group(first).num_rows
            first += 1
        batches = self._file.iter_batches(
            batch_size=batch_rows,
            row_groups=range(first, metadata.num_row_groups),
            columns=list(columns),
            use_threads=False,  # the cores are the model's
        )
        return skip_rows(batches, skip)


class ParquetSink:
    """Tables appended as row groups (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.parts_dir = path + ".parts"
        self.part = 0
        self.writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            if self.part == 0:  # a fresh start: parts of an earlier attempt are not ours
                shutil.rmtree(self.parts_dir, ignore_errors=True)
            os.makedirs(self.parts_dir, exist_ok=True)
            self.writer = pq.ParquetWriter(self._part(self.part), table.schema)
        self.writer.write_table(table, row_group_size=max(len(table), 1))

    def checkpoint(self) -> dict[str, Any]:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            with open(self._part(self.part), "rb") as f:
                os.fsync(f.fileno())
            self.part += 1
        return {"parts": self.part}

    def resume(self, state: dict[str, Any]) -> None:
        self.part = state["parts"]
        if os.path.isdir(self.parts_dir):
            for name in os.listdir(self.parts_dir):  # parts written after the checkpoint
                if int(name.split("-")[1].split(".")[0]) >= self.part:
                    os.remove(os.path.join(self.parts_dir, name))

    def finish(self) -> None:
        self.checkpoint()
        tmp = self.path + ".tmp"
        writer: pq.ParquetWriter | None = None
        for part in range(self.part):
            source = _open(self._part(part))
            for group in range(source.num_row_groups):
                table = source.read_row_group(group, use_threads=False)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table, row_group_size=max(len(table), 1))
        if writer is None:  # no rows at all
            pq.write_table(pa.table({}), tmp)
        else:
            writer.close()
        os.replace(tmp, self.path)
        shutil.rmtree(self.parts_dir, ignore_errors=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _part(self, number: int) -> str:
        return os.path.join(self.parts_dir, f"part-{number:05d}.parquet")


def _open(path: str) -> pq.ParquetFile:
    # pre_buffer (pyarrow's default) keeps every column chunk read until the file is
    # closed: the whole file in memory by the end of a pass. Read through a small buffer.
    return pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
