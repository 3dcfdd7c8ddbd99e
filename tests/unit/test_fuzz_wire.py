"""Property-based fuzzing of the request decoder: whatever bytes arrive, decoding either
gives a request or raises InvalidInput; nothing else, never a crash, never a huge
allocation.

Each property counts where its cases stopped (the decoder's stage, read from the
InvalidInput message) and prints the counts under ``pytest -s``: a fuzz run whose cases
all stop at the version check would prove little about the array checks. The
structure-aware property asserts that most of its cases reach the array checks and that
some decode.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from queueing import wire
from queueing.errors import InvalidInput

#: Cases per property; the README quotes the total.
CASES = 1000
FUZZ = settings(
    max_examples=CASES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    database=None,  # every run draws afresh; a failure prints its example to replay
)

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
odd_dtypes = ["object", "V8", "U4", "O", "datetime64[s]", "<f4", ">f8", "float128", "S4"]
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

# --- where a case stopped ---------------------------------------------------------------

#: The decoder's stages, in the order it runs them, each with the messages it refuses with.
STAGES: list[tuple[str, re.Pattern[str]]] = [
    (stage, re.compile(pattern))
    for stage, pattern in [
        ("msgpack", r"no body|request body of|not valid msgpack"),
        ("map", r"must be a map"),
        ("version", r"protocol version"),
        ("model", r"model must be"),
        ("deadline/keep", r"deadline_ms|keep_s"),
        ("inputs", r"no inputs|no arrays|arrays is over|array names|expected \[dtype"),
        ("dtype", r"dtype .* is not allowed"),
        (
            "shape",
            r"shape must be|rank \d+ is over|non-negative integers|elements is over"
            r"|shape .* is over|items is over",
        ),
        ("size", r"needs \d+ bytes|data must be bytes|needs a list of"),
        ("items", r"every item of"),
    ]
]
#: The stages that check an array's contents: what the structure-aware cases must reach.
ARRAY_STAGES = {"dtype", "shape", "size", "items", "decoded"}


def _stage(error: InvalidInput) -> str:
    # The decoder's last-resort "inputs cannot be decoded" (numpy refused something the
    # checks let through) matches no stage on purpose: the fuzz run fails on it.
    message = str(error)
    for stage, pattern in STAGES:
        if pattern.search(message):
            return stage
    raise AssertionError(f"an InvalidInput no stage accounts for: {message}")


def _decode(body: Any) -> tuple[str, wire.RequestBody | None]:
    """Decode ``body``: ("decoded", the request) or (the stage that refused it, None).
    Anything other than InvalidInput escapes and fails the test."""
    try:
        decoded = wire.decode_request_body(body)
    except InvalidInput as e:
        return _stage(e), None
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
    return "decoded", decoded


def _fuzz(name: str, strategy: st.SearchStrategy[Any], check: Callable[[Any], str]) -> Counter[str]:
    """Run ``check`` on CASES examples of ``strategy``; print and return the stage counts."""
    counts: Counter[str] = Counter()

    @FUZZ
    @given(strategy)
    def run(case: Any) -> None:
        counts[check(case)] += 1

    run()
    order = [stage for stage, _ in STAGES] + ["decoded"]
    shown = ", ".join(f"{stage} {counts[stage]}" for stage in order if counts[stage])
    print(f"\n{name}: {sum(counts.values())} cases stopped at: {shown}")
    assert sum(counts.values()) >= CASES
    return counts


# --- unstructured cases -----------------------------------------------------------------


def test_random_bytes() -> None:
    _fuzz("random bytes", st.binary(max_size=512), lambda body: _decode(body)[0])


def test_random_msgpack_structures() -> None:
    _fuzz(
        "random msgpack",
        values,
        lambda value: _decode(msgpack.packb(value, use_bin_type=True))[0],
    )


request_fields = st.fixed_dictionaries(
    {
        "v": st.one_of(st.just(1), values),
        "model": st.one_of(st.just("m"), values),
        "inputs": st.one_of(arrays, st.dictionaries(st.text(max_size=5), arrays, max_size=4)),
        "deadline_ms": st.one_of(st.none(), st.integers(min_value=-5, max_value=10**6), values),
        "keep_s": st.one_of(st.just(0), values),
    }
)


def test_request_shaped_bodies_with_any_field_wrong() -> None:
    _fuzz(
        "request-shaped, any field wrong",
        request_fields,
        lambda body: _decode(msgpack.packb(body, use_bin_type=True))[0],
    )


def test_truncated_valid_requests() -> None:
    def truncated(case: tuple[bytes, int]) -> str:
        data, cut = case
        body = wire.encode_request_body("m", np.frombuffer(data, np.uint8))
        return _decode(body[: min(cut, len(body) - 1)])[0]

    cases = st.tuples(st.binary(min_size=1, max_size=400), st.integers(min_value=1, max_value=399))
    _fuzz("truncated", cases, truncated)


# --- structure-aware cases: valid envelopes with hostile arrays -------------------------


@st.composite
def hostile_array(draw: st.DrawFn) -> tuple[list[Any], tuple[str, list[int], Any] | None]:
    """``(wire array, expected)``: an array as it goes on the wire, and, when it is valid,
    the dtype, shape and data it must decode to (None when it must be refused)."""
    family = draw(st.sampled_from(["numeric"] * 5 + ["items"] * 3 + ["odd"] * 2))
    kind = draw(
        st.sampled_from(
            {
                "numeric": sorted(wire.ALLOWED_DTYPES),
                "items": [wire.BYTES, wire.STR],
                "odd": odd_dtypes,
            }[family]
        )
    )
    valid = kind in wire.ALLOWED_DTYPES or kind in (wire.BYTES, wire.STR)
    # Mostly small honest shapes; else negative, huge, empty-but-huge, bool or float dims.
    shape: list[Any] = draw(st.lists(st.integers(0, 5), max_size=4))
    flaw = draw(
        st.sampled_from(["none"] * 10 + ["shape"] * 3 + ["rank", "size"] * 3 + ["items"] * 3)
    )
    if flaw == "shape":
        bad_dim = draw(st.sampled_from([-1, 2**31, 2**62, 2**64 - 1, True, 1.5, "3", None, [2]]))
        shape.insert(draw(st.integers(0, len(shape))), bad_dim)
        if draw(st.booleans()):
            shape.insert(0, 0)  # empty, and still claiming the bad dimension
        valid = False
    elif flaw == "rank":
        shape = [1] * draw(st.integers(wire.DEFAULT_LIMITS.max_rank + 1, 40))
        valid = False
    # The elements of the honest dimensions (all of them when the shape is valid).
    elements = math.prod(d for d in shape if type(d) is int and 0 <= d <= 5)
    if kind in (wire.BYTES, wire.STR):
        item = st.binary(max_size=12) if kind == wire.BYTES else st.text(max_size=6)
        items: list[Any] = draw(st.lists(item, min_size=elements, max_size=elements))
        if flaw == "size":
            shorter = bool(items) and draw(st.booleans())
            items = items[:-1] if shorter else [*items, items[0] if items else b""]
            valid = False
        elif flaw == "items" and items:
            wrong = b"x" if kind == wire.STR else "x"
            items[draw(st.integers(0, len(items) - 1))] = draw(
                st.sampled_from([wrong, 7, None, 1.5, [b"x"]])
            )
            valid = False
        return [kind, shape, items], ((kind, shape, items) if valid else None)
    itemsize = np.dtype(kind).itemsize if kind in wire.ALLOWED_DTYPES else 4
    size = elements * itemsize
    if flaw == "size":
        size = max(0, size + draw(st.sampled_from([-itemsize, -1, 1, itemsize])))
        valid = valid and size == elements * itemsize
    data: Any = draw(st.binary(min_size=size, max_size=size))  # any bits: NaN, inf, ...
    if flaw == "items":
        data = draw(st.sampled_from([data.hex(), list(data[:4]), None]))
        valid = False
    return [kind, shape, data], ((kind, shape, data) if valid else None)


@st.composite
def hostile_request(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, list[int], Any] | None]]:
    """A valid envelope around one array or a few named ones; and what each must decode to."""
    named = draw(st.booleans())
    drawn = draw(st.lists(hostile_array(), min_size=1, max_size=3 if named else 1))
    inputs: Any = {f"in{i}": array for i, (array, _) in enumerate(drawn)} if named else drawn[0][0]
    body = {
        "v": 1,
        "model": draw(st.sampled_from(["m", "resnet", ""])),
        "inputs": inputs,
        "deadline_ms": draw(st.one_of(st.none(), st.integers(0, 10**6))),
        "keep_s": draw(st.integers(0, 3600)),
    }
    return msgpack.packb(body, use_bin_type=True), [want for _, want in drawn]


def _decodes_to_what_was_sent(
    case: tuple[bytes, list[tuple[str, list[int], Any] | None]],
) -> str:
    body, wanted = case
    stage, decoded = _decode(body)
    if decoded is None:
        assert None in wanted, f"a valid request was refused at {stage}"
        return stage
    assert None not in wanted, "a request with a hostile array decoded"
    inputs = decoded.inputs
    arrays = (
        [inputs[f"in{i}"] for i in range(len(inputs))] if isinstance(inputs, dict) else [inputs]
    )
    for array, want in zip(arrays, wanted, strict=True):
        assert want is not None
        kind, shape, data = want
        assert wire.dtype_name(array) == kind and list(array.shape) == shape
        if kind in wire.ALLOWED_DTYPES:
            assert array.tobytes() == data  # the very bits sent: no cast, no copy-with-change
        else:
            if kind == wire.STR:  # numpy U arrays drop trailing NULs (as documented: U)
                data = [item.rstrip("\0") for item in data]
            assert array.ravel().tolist() == list(data)
    return stage


def test_valid_envelopes_with_hostile_arrays_reach_the_array_checks() -> None:
    counts = _fuzz("valid envelope, hostile arrays", hostile_request(), _decodes_to_what_was_sent)
    total = sum(counts.values())
    reached = sum(counts[stage] for stage in ARRAY_STAGES)
    assert reached >= 0.9 * total, counts  # the envelope is not where these cases stop
    assert counts["decoded"] >= 0.1 * total, counts  # and valid ones get through whole
    assert min(counts[stage] for stage in ("dtype", "shape", "size", "items")) > 0, counts
