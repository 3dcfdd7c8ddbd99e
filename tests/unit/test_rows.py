"""The row-independence check, on models written in numpy (the check only calls them)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from workers.rows import RowsNotIndependent, check_independent, check_output_rows
from workers.spec import TensorSpec

X = TensorSpec("x", "float32", (4,))
BUCKETS = [1, 2, 4, 8]

Fn = Callable[[np.ndarray], np.ndarray]


def model(fn: Fn, name: str = "y") -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    return lambda arrays: {name: fn(arrays["x"])}


def check(fn: Fn, buckets: list[int] = BUCKETS) -> None:
    for rows in buckets:  # what warm-up does on each bucket
        check_output_rows("m", model(fn)({"x": np.zeros((rows, 4), np.float32)}), rows)
    check_independent("m", model(fn), [X], buckets)


@pytest.mark.parametrize(
    "fn",
    [lambda x: x * 2 + 1,
     lambda x: np.tanh(x @ np.ones((4, 3), np.float32)),
     lambda x: x.sum(axis=1) > 0,
     lambda x: np.sort(x, axis=1)],
)  # fmt: skip
def test_row_wise_models_pass(fn: Fn) -> None:
    check(fn)


@pytest.mark.parametrize(
    ("fn", "message"),
    [(lambda x: x.sum(), r"output 'y' is float32 \[\] for a batch of 1 rows"),
     (lambda x: x.mean(axis=0), r"output 'y' is float32 \[4\] for a batch of 1 rows"),
     (lambda x: x - x.mean(axis=0, keepdims=True), "row 0 of a batch of 8 random rows differs"),
     (lambda x: x @ x.T, r"differs from the same row run alone \(shape \[8\] vs \[1\]\)"),
     (lambda x: x + x[::-1], "differs from the same row run alone")],
)  # fmt: skip
def test_models_that_mix_rows_are_refused(fn: Fn, message: str) -> None:
    with pytest.raises(RowsNotIndependent, match=message) as raised:
        check(fn)
    assert 'batching = "off"' in str(raised.value)


def test_float_noise_of_batched_kernels_is_tolerated() -> None:
    def noisy(x: np.ndarray) -> np.ndarray:  # batched sums in another order: last-bit noise
        return x * (1 + 1e-6 * (len(x) > 1))

    check(noisy)


def test_one_row_batches_have_nothing_to_mix() -> None:
    check_independent("m", model(lambda x: x - x.mean(axis=0)), [X], [1])


def test_strings_and_ids_get_random_rows_a_model_can_take() -> None:
    text = TensorSpec("t", "bytes", (1,))
    ids = TensorSpec("i", "int64", (3,))
    seen: list[dict[str, np.ndarray]] = []

    def lookup(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(arrays)
        table = np.arange(10.0)
        lengths = np.vectorize(len)(arrays["t"]).astype(np.float64)
        return {"y": table[arrays["i"]].sum(axis=1) + lengths[:, 0]}

    check_independent("m", lookup, [text, ids], BUCKETS)
    assert all(isinstance(item, bytes) for item in seen[0]["t"].reshape(-1))
    assert len({item for item in seen[0]["t"].reshape(-1)}) > 1  # not all the same row


def test_one_value_per_row_of_text_is_compared_as_a_value() -> None:
    """A text model answers one bytes object per row: a row is a scalar, not an array."""

    def words(x: np.ndarray) -> np.ndarray:
        return np.array([b"pos" if row.sum() > 0 else b"neg" for row in x], dtype=object)

    check(words)
