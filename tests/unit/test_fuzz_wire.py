"""Property-based fuzzing of the request decoder: whatever bytes arrive, decoding either
gives a request or raises InvalidInput; nothing else, never a crash, never a huge
allocation."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from queueing import wire
from queueing.errors import InvalidInput

#: Cases per property; the README quotes the total.
CASES = 1000
FUZZ = settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=64),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=30,
)
odd_dtypes = ["object", "V8", "U4", "O", "datetime64[s]", "<f4", ">f8"]
dtypes = st.one_of(
    st.sampled_from(sorted(wire.ALLOWED_DTYPES)),
    st.text(max_size=10),
    st.sampled_from(odd_dtypes),
    st.sampled_from([wire.BYTES, wire.STR]),
)
# The data of bytes and str arrays: lists of items, right and wrong.
item_lists = st.one_of(
    st.lists(st.binary(max_size=16), max_size=8),
    st.lists(st.text(max_size=8), max_size=8),
    st.lists(st.one_of(st.binary(max_size=4), st.text(max_size=4), st.integers(0, 9)), max_size=8),
)
shapes = st.one_of(
    st.lists(st.integers(min_value=-3, max_value=2**40), max_size=10),
    st.lists(st.integers(min_value=0, max_value=6), max_size=4),
    values,
)
arrays = st.one_of(
    st.tuples(dtypes, shapes, st.one_of(st.binary(max_size=256), item_lists, values)), values
)


def _decodes_or_refuses(body: Any) -> None:
    try:
        decoded = wire.decode_request_body(body)
    except InvalidInput:
        return
    # What decodes is well formed: every array has an allowed dtype and its shape; bytes
    # and str arrays hold items of their kind only.
    inputs = decoded.inputs
    for array in inputs.values() if isinstance(inputs, dict) else [inputs]:
        assert isinstance(array, np.ndarray)
        kind = wire.dtype_name(array)
        assert kind in wire.ALLOWED_DTYPES or kind in (wire.BYTES, wire.STR)
        if kind == wire.BYTES:
            assert all(type(item) is bytes for item in array.ravel().tolist())
        assert array.nbytes <= wire.DEFAULT_LIMITS.max_payload_bytes


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(body: bytes) -> None:
    _decodes_or_refuses(body)


@FUZZ
@given(values)
def test_random_msgpack_structures(value: Any) -> None:
    _decodes_or_refuses(msgpack.packb(value, use_bin_type=True))


@FUZZ
@given(
    version=st.one_of(st.just(1), values),
    model=st.one_of(st.just("m"), values),
    inputs=st.one_of(arrays, st.dictionaries(st.text(max_size=5), arrays, max_size=4)),
    deadline=st.one_of(st.none(), st.integers(min_value=-5, max_value=10**6), values),
    keep=st.one_of(st.just(0), values),
)
def test_request_shaped_bodies_with_any_field_wrong(
    version: Any, model: Any, inputs: Any, deadline: Any, keep: Any
) -> None:
    body = {"v": version, "model": model, "inputs": inputs, "deadline_ms": deadline,
            "keep_s": keep}  # fmt: skip
    _decodes_or_refuses(msgpack.packb(body, use_bin_type=True))


@FUZZ
@given(st.binary(min_size=1, max_size=400), st.integers(min_value=1, max_value=399))
def test_truncated_valid_requests(data: bytes, cut: int) -> None:
    body = wire.encode_request_body("m", np.frombuffer(data, np.uint8))
    _decodes_or_refuses(body[: min(cut, len(body) - 1)])
