"""Columns to model inputs, and model outputs to columns.

A model input is fed by one column, or by several scalar columns stacked side by side
(``--input-column x=f0,f1,f2`` or ``x=f*``). A column becomes an array of one row per
table row: numbers as they are (cast to the dtype the model takes), list and fixed-size
list columns as rows of arrays (nested lists as higher ranks; the lists of a request must
agree in length), binary columns as encoded files for an image model, and string columns
as paths of such files (relative to the dataset's folder) when the model takes images, as
JSON arrays when they look like ``[...]`` (how lists are written to CSV), as numbers
otherwise. A row that cannot be converted fails alone, with the reason.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from queueing.wire import Outputs, Sendable

#: The column of failed rows' errors (null where the row was scored).
ERROR_COLUMN = "error"
#: The column of a model with one unnamed output.
OUTPUT_COLUMN = "output"
#: The dtype an image model's input takes on the wire: encoded files.
BYTES = "bytes"


@dataclass(frozen=True)
class InputSpec:
    """A model input as its pool describes it in Redis: name, dtype, rank (no batch axis)."""

    name: str
    dtype: str
    rank: int


_SPEC = re.compile(r"(?:^|, )([^:,\s]+): (\w+) \[([^\]]*)\]")


def parse_model_inputs(text: str) -> list[InputSpec]:
    """The inputs of a pool's info (``x: float32 [*, 8], image: bytes [*] (...) or ...``)."""
    found = _SPEC.findall(text)
    return [InputSpec(name, dtype, len(dims.split(",")) - 1) for name, dtype, dims in found]


def parse_input_columns(pairs: Sequence[str]) -> dict[str, list[str]]:
    """``NAME=COLUMN[,COLUMN...]`` options as a map; a bare ``COLUMN`` feeds a one-input
    model (the name "")."""
    mapping: dict[str, list[str]] = {}
    for pair in pairs:
        name, _, columns = pair.rpartition("=")
        if not columns or any(not c for c in columns.split(",")):
            raise ValueError(f"--input-column {pair!r}: expected NAME=COLUMN[,COLUMN...]")
        mapping[name.strip()] = [c.strip() for c in columns.split(",")]
    return mapping


class InputMapping:
    """Which columns feed which model input, resolved once against the dataset's schema."""

    def __init__(
        self,
        schema: pa.Schema,
        *,
        spec: Sequence[InputSpec] | None,
        input_columns: Mapping[str, Sequence[str]] | None,
        keep_columns: Sequence[str],
    ) -> None:
        names = list(schema.names)
        missing = [c for c in keep_columns if c not in names]
        if missing:
            raise ValueError(f"--keep-columns {missing} not in the dataset's columns {names}")
        self.keep = list(keep_columns)
        self.dtypes = {s.name: s.dtype for s in spec or ()}
        if input_columns:
            mapping = {name: _expand(cols, names) for name, cols in input_columns.items()}
        else:
            mapping = self._by_name(names, spec)
        if len(mapping) == 1 and len(spec or ()) <= 1:
            # One input: send it unnamed, so that the column's name need not be the input's.
            ((name, cols),) = mapping.items()
            if spec:
                name = spec[0].name
            mapping = {name: cols}
            self.single = True
        else:
            self.single = False
        self.mapping = mapping
        self.columns = list(dict.fromkeys([c for cols in mapping.values() for c in cols]))

    def _by_name(self, names: list[str], spec: Sequence[InputSpec] | None) -> dict[str, list[str]]:
        free = [n for n in names if n not in self.keep]
        if spec:
            found = {s.name: [s.name] for s in spec if s.name in names}
            if len(found) == len(spec):
                return found
            if len(spec) == 1 and len(free) == 1:
                return {spec[0].name: free}
            wanted = ", ".join(s.name for s in spec if s.name not in found)
            raise ValueError(
                f"no column for the model's input {wanted} among {names}:"
                " say which with --input-column NAME=COLUMN"
            )
        if not free:
            raise ValueError(f"no column left to feed the model among {names}")
        return {n: [n] for n in free}

    def convert(self, table: pa.Table, base_dir: str) -> Sendable:
        """The request's inputs for these rows. Raises ValueError saying what is wrong."""
        arrays = {
            name: _stack(
                [
                    to_numpy(table.column(c).combine_chunks(), self.dtypes.get(name), base_dir)
                    for c in cols
                ],
                cols,
            )
            for name, cols in self.mapping.items()
        }
        return next(iter(arrays.values())) if self.single else arrays


def _expand(columns: Sequence[str], names: list[str]) -> list[str]:
    out: list[str] = []
    for c in columns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, c)] if "*" in c else [c]
        unknown = [m for m in matched if m not in names]
        if not matched or unknown:
            raise ValueError(f"--input-column: no column {c!r} among {names}")
        out += matched
    return out


def _stack(arrays: list[np.ndarray], cols: Sequence[str]) -> np.ndarray:
    if len(arrays) == 1:
        return arrays[0]
    if any(a.ndim != 1 for a in arrays):
        raise ValueError(f"columns {list(cols)} stack into one input only if each is a scalar")
    return np.stack(arrays, axis=1)


def to_numpy(array: pa.Array, dtype: str | None, base_dir: str) -> np.ndarray:
    """One column as an array with one row per table row (see the module docstring)."""
    if array.null_count:
        first = np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0]
        raise ValueError(f"a null value (row {first} of the request)")
    kind = array.type
    if pa.types.is_fixed_size_list(kind):  # one length by its type: nothing to check
        inner = to_numpy(array.flatten(), dtype, base_dir)
        return inner.reshape(len(array), kind.list_size, *inner.shape[1:])
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        size = int(lengths[0]) if len(lengths) else 0
        if (lengths != size).any():
            raise ValueError(f"lists of different lengths {sorted(set(lengths.tolist()))[:5]}")
        inner = to_numpy(array.flatten(), dtype, base_dir)
        return inner.reshape(len(array), size, *inner.shape[1:])
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return _objects(array.to_pylist())
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _from_text(array, dtype, base_dir)
    values: np.ndarray = array.to_numpy(zero_copy_only=False)
    if dtype is not None and dtype != BYTES and values.dtype != np.dtype(dtype):
        values = values.astype(dtype)
    return values


def _from_text(array: pa.Array, dtype: str | None, base_dir: str) -> np.ndarray:
    texts: list[str] = array.to_pylist()
    if dtype == BYTES:  # paths of encoded images
        return _objects([_read(os.path.join(base_dir, p)) for p in texts])
    if texts and texts[0].lstrip().startswith("["):  # lists, as CSV holds them
        try:
            values = np.array([json.loads(t) for t in texts], dtype=dtype or np.float32)
        except ValueError as e:
            raise ValueError(f"not JSON arrays of one shape: {e}") from None
        return values
    try:
        numbers: np.ndarray = pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid as e:
        raise ValueError(f"not a number: {e}") from None
    return numbers.astype(dtype or np.float32)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None


def _objects(items: list[bytes]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def output_arrays(outputs: Outputs) -> dict[str, np.ndarray]:
    """A model's outputs by column name: one unnamed output is the column ``output``."""
    return dict(outputs) if isinstance(outputs, dict) else {OUTPUT_COLUMN: outputs}


def to_arrow(values: np.ndarray, failed: np.ndarray | None) -> pa.Array:
    """One output as a column: a scalar per row, or a (nested) fixed-size list per row;
    the rows where ``failed`` is true are null."""
    flat = values.reshape(-1)
    column: pa.Array = pa.array(flat if flat.dtype != object else flat.tolist())
    for size in reversed(values.shape[1:]):
        column = pa.FixedSizeListArray.from_arrays(column, size)
    if failed is not None and failed.any():
        if values.ndim == 1:
            return pa.array(flat if flat.dtype != object else flat.tolist(), mask=failed)
        column = pa.FixedSizeListArray.from_arrays(
            column.flatten(), values.shape[1], mask=pa.array(failed)
        )
    return column
