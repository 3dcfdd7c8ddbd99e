"""Are a model's rows independent? Checked at load, before a worker takes traffic. No
TensorFlow here: the model is any function of named arrays.

Batching is only safe for a model whose answer for a row depends on that row alone: then
which requests share a batch, and the padding, cannot change anyone's answer. A model
that mixes rows (``x - mean(x, axis=0)``, ``x @ transpose(x)``, a scalar or
``reduce_mean(x, axis=0)`` output) would hand one producer's data to another. Two checks:

* shape: on every warm-up batch, each output has the batch's rows on axis 0;
* values: a batch of random rows gives each row the answer that row gets alone (padded
  with copies of itself, as the pool runs a lone request), within float tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from queueing import wire
from workers.errors import ModelLoadError
from workers.spec import TensorSpec

Model = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

#: Outputs agree when |batched - alone| <= ATOL * scale + RTOL * |alone|, where scale is
#: the output's largest magnitude (at least 1): batched kernels sum in another order.
RTOL = 1e-3
ATOL = 1e-4

#: Rows of the random batch compared with their runs alone.
ROWS_COMPARED = 3

_ADVICE = (
    "Batching would mix requests: one producer's data would reach another's result. Fix"
    ' the model, or set batching = "off" to run each request in a call of its own.'
)


class RowsNotIndependent(ModelLoadError):
    """The model's answers for a row depend on the other rows of its batch."""


def check_output_rows(source: str, outputs: dict[str, np.ndarray], rows: int) -> None:
    """Raise :class:`RowsNotIndependent` unless every output has ``rows`` rows on axis 0."""
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != rows:
            raise RowsNotIndependent(
                f"{source}: output {name!r} is {value.dtype} {list(value.shape)} for a batch of"
                f" {rows} rows: it does not have one row per input row on axis 0. {_ADVICE}"
            )


def check_independent(
    source: str,
    model: Model,
    inputs: Sequence[TensorSpec],
    buckets: Sequence[int],
    *,
    seed: int = 0,
) -> None:
    """Raise :class:`RowsNotIndependent` if a row of a random batch of the largest bucket
    gets another answer than alone (run as the smallest bucket, padded with itself)."""
    rows = max(buckets)
    if rows < 2:
        return  # every batch is one row: nothing to mix
    rng = np.random.default_rng(seed)
    batch = {s.name: random_rows(s, rows, rng) for s in inputs}
    together = model(batch)
    check_output_rows(source, together, rows)
    alone_rows = min(buckets)
    for row in sorted({0, rows // 2, rows - 1})[:ROWS_COMPARED]:
        single = {n: np.repeat(a[row : row + 1], alone_rows, axis=0) for n, a in batch.items()}
        alone = model(single)
        check_output_rows(source, alone, alone_rows)
        for name, value in together.items():
            # np.asarray: a row of a 1-D output is a scalar (a bytes object for text).
            difference = _difference(np.asarray(value[row]), np.asarray(alone[name][0]))
            if difference is not None:
                raise RowsNotIndependent(
                    f"{source}: output {name!r} of row {row} of a batch of {rows} random rows"
                    f" differs from the same row run alone ({difference}): the model mixes the"
                    f" rows of a batch. {_ADVICE}"
                )


def _difference(batched: np.ndarray, alone: np.ndarray) -> str | None:
    """How the two answers differ, or None when they agree."""
    if batched.shape != alone.shape:
        return f"shape {list(batched.shape)} vs {list(alone.shape)}"
    if batched.dtype.kind in "fc":
        scale = max(1.0, float(np.nanmax(np.abs(alone), initial=0.0)))
        gap = np.abs(batched.astype(np.complex128) - alone.astype(np.complex128))
        close = (gap <= ATOL * scale + RTOL * np.abs(alone)) | (np.isnan(batched) & np.isnan(alone))
        if np.all(close):
            return None
        return f"largest difference {float(np.nanmax(np.where(close, 0.0, gap))):.3g}"
    if np.array_equal(batched, alone):
        return None
    return "values differ"


def random_rows(spec: TensorSpec, rows: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` random rows for an input: words for strings, small non-negative integers
    (valid ids for any embedding or lookup), normal floats, random booleans."""
    shape = spec.example_shape(rows)
    if spec.dtype in (wire.BYTES, wire.STR):
        words = np.array([b"the", b"cat", b"sat", b"on", b"a", b"mat", b"dog", b"ran"], object)
        return words[rng.integers(0, len(words), size=shape)]
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        return rng.integers(0, 3, size=shape).astype(dtype)
    if dtype.kind == "c":
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)
    return rng.normal(size=shape).astype(dtype)
