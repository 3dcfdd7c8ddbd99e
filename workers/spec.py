"""A model's input spec, and fitting a request's arrays to it. No TensorFlow here."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from queueing.errors import InvalidInput
from queueing.wire import BYTES, STR, Inputs, dtype_name

#: Said when encoded bytes (an image file, say) reach a pool whose model takes arrays.
_IMAGES_HINT = (
    '; this pool does not decode images: serve it with preprocess = "image"'
    " (--preprocess image) to send JPEG/PNG files, or send arrays"
)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output: name, numpy dtype name, shape *without* the batch axis
    (``None`` where any size goes)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    #: The batch axis's size when the model fixes it (a signature of ``[1, None, 3]``).
    batch: int | None = None

    def describe(self) -> str:
        """E.g. ``float32 [*, 64]``: ``*`` is a free axis (the batch axis included), a
        number a fixed one."""
        dims = ", ".join("*" if d is None else str(d) for d in (self.batch, *self.shape))
        return f"{self.dtype} [{dims}]"

    def example_shape(self, rows: int) -> tuple[int, ...]:
        """A concrete shape for ``rows`` rows (free axes get size 1), for warm-up."""
        return (rows, *(1 if d is None else d for d in self.shape))


@dataclass(frozen=True, slots=True)
class Fitted:
    """A request's arrays, checked against the spec and keyed by input name, each with a
    leading batch axis; ``unbatched`` when the sender left the batch axis out."""

    arrays: dict[str, np.ndarray]
    rows: int
    unbatched: bool
    group: Hashable


class InputFitter:
    """:func:`fit_inputs` with a memory: requests nearly always come in a few layouts
    (dtypes and shapes), so the full check runs once per layout and later requests of
    that layout only get their arrays keyed and, if needed, given a batch axis."""

    def __init__(
        self, spec: Sequence[TensorSpec], *, convert: bool = True, cache_size: int = 4096
    ) -> None:
        self.spec = list(spec)
        self.convert = convert
        self._names = [s.name for s in self.spec]
        self._cache: dict[Hashable, tuple[int, bool, Hashable, bool]] = {}
        self._cache_size = cache_size

    def __call__(self, inputs: Inputs) -> Fitted:
        if isinstance(inputs, np.ndarray):
            key: Hashable = (inputs.dtype.str, inputs.shape)
        else:
            key = tuple((name, a.dtype.str, a.shape) for name, a in inputs.items())
        known = self._cache.get(key)
        if known is None or known[3]:
            # A layout that needs conversions is fitted in full each time (conversions copy
            # the arrays anyway).
            fitted = fit_inputs(self.spec, inputs, convert=self.convert)  # or InvalidInput
            if len(self._cache) < self._cache_size:
                converted = any(fitted.arrays[n].dtype != _dtype_of(inputs, n) for n in self._names)
                self._cache[key] = (fitted.rows, fitted.unbatched, fitted.group, converted)
            return fitted
        rows, unbatched, group, _ = known
        if isinstance(inputs, np.ndarray):
            inputs = {self._names[0]: inputs}
        arrays = {n: inputs[n][np.newaxis] if unbatched else inputs[n] for n in self._names}
        return Fitted(arrays=arrays, rows=rows, unbatched=unbatched, group=group)


def _dtype_of(inputs: Inputs, name: str) -> np.dtype[np.generic]:
    array = inputs if isinstance(inputs, np.ndarray) else inputs[name]
    return array.dtype


def convert_array(array: np.ndarray, kind: str, want: str) -> np.ndarray | None:
    """``array`` (of wire dtype ``kind``) as dtype ``want`` when nothing is lost: str items
    UTF-8 encoded for a bytes input; numbers widened where ``np.can_cast(..., "safe")``
    holds. None when no lossless conversion exists."""
    if want == BYTES and kind == STR:
        out = np.empty(array.shape, dtype=object)
        out.reshape(-1)[:] = [item.encode() for item in array.reshape(-1).tolist()]
        return out
    if BYTES in (kind, want) or STR in (kind, want):
        return None
    if np.can_cast(np.dtype(kind), np.dtype(want), "safe"):
        return array.astype(want)
    return None


def fit_inputs(spec: Sequence[TensorSpec], inputs: Inputs, *, convert: bool = True) -> Fitted:
    """Check ``inputs`` against ``spec``. Raises :class:`InvalidInput` saying what is wrong.

    A single array is accepted for a model with one input. Each array either has the batch
    axis (rank = spec rank + 1) or is one row without it; all arrays of a request agree.
    ``convert``: arrays of another dtype are converted when nothing is lost
    (:func:`convert_array`).
    """
    if isinstance(inputs, np.ndarray):
        if len(spec) != 1:
            names = ", ".join(repr(s.name) for s in spec)
            raise InvalidInput(f"model takes inputs {names}: send a dict of named arrays")
        inputs = {spec[0].name: inputs}
    expected = {s.name for s in spec}
    missing = sorted(expected - inputs.keys())
    unknown = sorted(inputs.keys() - expected)
    if missing or unknown:
        raise InvalidInput(
            f"inputs {sorted(inputs)} do not match the model's {sorted(expected)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unknown {unknown}" if unknown else "")
        )

    arrays: dict[str, np.ndarray] = {}
    batched_flags: set[bool] = set()
    rows_seen: set[int] = set()
    for s in spec:
        array = inputs[s.name]
        kind = dtype_name(array)
        got = f"got {kind} {list(array.shape)}"
        if kind != s.dtype:
            converted = convert_array(array, kind, s.dtype) if convert else None
            if converted is None:
                hint = _IMAGES_HINT if kind == BYTES else ""
                raise InvalidInput(f"input {s.name!r}: expected {s.describe()}, {got}{hint}")
            array = converted
        if array.ndim == len(s.shape) + 1:
            batched_flags.add(True)
            body = array.shape[1:]
        elif array.ndim == len(s.shape):
            batched_flags.add(False)
            body = array.shape
            array = array[np.newaxis]
        else:
            raise InvalidInput(f"input {s.name!r}: expected {s.describe()}, {got}")
        if any(want is not None and want != have for want, have in zip(s.shape, body, strict=True)):
            raise InvalidInput(f"input {s.name!r}: expected {s.describe()}, {got}")
        arrays[s.name] = array
        rows_seen.add(array.shape[0])
    if len(batched_flags) > 1:
        raise InvalidInput("inputs disagree: some have the batch axis and some do not")
    if len(rows_seen) > 1:
        raise InvalidInput(f"inputs disagree on the number of rows: {sorted(rows_seen)}")
    rows = rows_seen.pop()
    if rows == 0:
        raise InvalidInput("request has no rows")
    group = tuple(arrays[s.name].shape[1:] for s in spec)
    return Fitted(arrays=arrays, rows=rows, unbatched=not batched_flags.pop(), group=group)


def parse_spec(name: str, text: str) -> TensorSpec:
    """``"float32 [*, 4]"`` (what :meth:`TensorSpec.describe` prints; ``string`` is taken
    for ``bytes``) as a spec. Raises ``ValueError`` saying what is wrong."""
    dtype, _, dims = text.strip().partition(" ")
    dims = dims.strip()
    if not (dims.startswith("[") and dims.endswith("]")):
        raise ValueError(f"{name}: {text!r} is not 'dtype [dims]', e.g. 'float32 [*, 4]'")
    dtype = BYTES if dtype in ("string", BYTES) else dtype
    if dtype != BYTES:
        try:
            np.dtype(dtype)
        except TypeError as e:
            raise ValueError(f"{name}: {dtype!r} is not a dtype") from e
    sizes: list[int | None] = []
    for d in (d.strip() for d in dims[1:-1].split(",") if d.strip()):
        if d in ("*", "None", "?", "-1"):
            sizes.append(None)
        elif d.isdigit():
            sizes.append(int(d))
        else:
            raise ValueError(f"{name}: dimension {d!r} of {text!r} is not a size or *")
    if not sizes:
        raise ValueError(f"{name}: {text!r} has no batch axis")
    return TensorSpec(name=name, dtype=dtype, shape=tuple(sizes[1:]), batch=sizes[0])
