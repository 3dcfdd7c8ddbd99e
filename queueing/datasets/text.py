"""CSV and JSON Lines files: read with pyarrow's streaming readers, written by appending.

An appended file resumes exactly: a checkpoint records its length after an fsync, and a
resumed run cuts it back to that length and goes on. In CSV, a list cell is a JSON array
(``[0.5, 0.25]``) and is read back as one; in JSON Lines, lists are JSON lists and bytes
are base64 text.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.json as pjson

from queueing.datasets.base import reopen_append, skip_rows, sync_append

#: Bytes a reader parses at a time (pyarrow's default is 1 MiB; rows are small).
BLOCK_BYTES = 4 << 20


class _File:
    def __init__(self, path: str) -> None:
        self.path, self.name, self.base_dir = path, os.path.basename(path), os.path.dirname(path)

    def identity(self) -> dict[str, Any]:
        stat = os.stat(self.path)
        return {"size": stat.st_size, "mtime": stat.st_mtime_ns}

    def _lines(self) -> int:
        """Non-empty lines, counted without parsing (for the progress bar only)."""
        lines, last = 0, b"\n"
        with open(self.path, "rb") as f:
            while block := f.read(1 << 22):
                lines += block.count(b"\n")
                last = block[-1:]
        return lines + (last != b"\n")


class CsvSource(_File):
    """The rows of a CSV file with a header row."""

    def schema(self) -> pa.Schema:
        with pcsv.open_csv(self.path) as reader:
            return reader.schema

    def count_rows(self) -> int:
        return max(self._lines() - 1, 0)  # the header (a quoted newline would over-count)

    def batches(
        self, columns: Sequence[str], skip: int, batch_rows: int, as_text: Sequence[str] = ()
    ) -> Iterator[pa.RecordBatch]:
        types = {c: pa.string() for c in as_text}
        for name, kind in zip(self.schema().names, self.schema().types, strict=True):
            types.setdefault(name, kind)  # as the first block says: the same in every block
        reader = pcsv.open_csv(
            self.path,
            read_options=pcsv.ReadOptions(block_size=BLOCK_BYTES, use_threads=False),
            convert_options=pcsv.ConvertOptions(
                include_columns=list(columns),
                column_types=types,
                strings_can_be_null=True,  # as written: null empty, "" an empty string
            ),
        )
        return skip_rows(reader, skip)


class JsonLinesSource(_File):
    """The rows of a JSON Lines file (one object per line)."""

    def schema(self) -> pa.Schema:
        with pjson.open_json(self.path) as reader:
            return reader.schema

    def count_rows(self) -> int:
        return self._lines()

    def batches(
        self, columns: Sequence[str], skip: int, batch_rows: int, as_text: Sequence[str] = ()
    ) -> Iterator[pa.RecordBatch]:
        reader = pjson.open_json(
            self.path,
            read_options=pjson.ReadOptions(block_size=BLOCK_BYTES, use_threads=False),
            parse_options=pjson.ParseOptions(explicit_schema=self.schema()),
        )
        return skip_rows((b.select(list(columns)) for b in reader), skip)


class _AppendSink:
    def __init__(self, path: str) -> None:
        self.path = path
        self.file: BinaryIO | None = None

    def write(self, table: pa.Table) -> None:
        if self.file is None:
            self.file = open(self.path, "wb")  # noqa: SIM115 - open for the run
        self.file.write(self._encode(table, first=self.file.tell() == 0))

    def _encode(self, table: pa.Table, first: bool) -> bytes:
        raise NotImplementedError

    def checkpoint(self) -> dict[str, Any]:
        return {"bytes": sync_append(self.file)}

    def resume(self, state: dict[str, Any]) -> None:
        self.file = reopen_append(self.path, state["bytes"])

    def finish(self) -> None:
        if self.file is None:
            self.file = open(self.path, "wb")  # noqa: SIM115 - closed on the next line
        self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class CsvSink(_AppendSink):
    """Rows as CSV with a header row; list cells as JSON arrays, bytes as base64."""

    def _encode(self, table: pa.Table, first: bool) -> bytes:
        for i, field in enumerate(table.schema):
            if _nested(field.type) or pa.types.is_binary(field.type):
                text = pa.array([_json(v) for v in table.column(i).to_pylist()], pa.string())
                table = table.set_column(i, field.name, text)
        out = io.BytesIO()
        pcsv.write_csv(table, out, pcsv.WriteOptions(include_header=first))
        return out.getvalue()


class JsonLinesSink(_AppendSink):
    """Rows as JSON objects, one a line; bytes as base64 text."""

    def _encode(self, table: pa.Table, first: bool) -> bytes:
        lines = [json.dumps(row, default=_bytes_as_text) for row in table.to_pylist()]
        return ("\n".join(lines) + "\n").encode() if lines else b""


def _nested(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind)
    )


def _json(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return json.dumps(value, default=_bytes_as_text)


def _bytes_as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"{type(value).__name__} is not JSON")
