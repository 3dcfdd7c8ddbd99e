"""Fitting a request's arrays to a model's input spec."""

from __future__ import annotations

import numpy as np
import pytest

from queueing.errors import InvalidInput
from workers.spec import InputFitter, TensorSpec, fit_inputs, parse_spec

X = TensorSpec("x", "float32", (64,))
IMG = TensorSpec("img", "uint8", (None, None, 3))


def test_describe() -> None:
    assert X.describe() == "float32 [*, 64]"
    assert IMG.describe() == "uint8 [*, *, *, 3]"


def test_single_array_batched_and_unbatched() -> None:
    fitted = fit_inputs([X], np.zeros((5, 64), np.float32))
    assert (fitted.rows, fitted.unbatched) == (5, False)
    one = fit_inputs([X], np.zeros(64, np.float32))
    assert (one.rows, one.unbatched) == (1, True)
    assert one.arrays["x"].shape == (1, 64)
    assert one.group == fitted.group


def test_free_axes_make_separate_groups() -> None:
    a = fit_inputs([IMG], np.zeros((2, 4, 5, 3), np.uint8))
    b = fit_inputs([IMG], np.zeros((1, 4, 6, 3), np.uint8))
    c = fit_inputs([IMG], np.zeros((4, 5, 3), np.uint8))
    assert a.group != b.group
    assert a.group == c.group


def test_the_message_says_what_was_expected_and_what_came() -> None:
    with pytest.raises(
        InvalidInput, match=r"input 'x': expected float32 \[\*, 64\], got int64 \[3, 65\]"
    ):
        fit_inputs([X], np.zeros((3, 65), np.int64))
    with pytest.raises(InvalidInput, match=r"expected float32 \[\*, 64\], got float32 \[3, 65\]"):
        fit_inputs([X], np.zeros((3, 65), np.float32))
    with pytest.raises(InvalidInput, match=r"got float32 \[1, 2, 64\]"):
        fit_inputs([X], np.zeros((1, 2, 64), np.float32))


def test_names_must_match() -> None:
    y = TensorSpec("y", "float32", (2,))
    with pytest.raises(InvalidInput, match=r"missing \['y'\]; unknown \['z'\]"):
        fit_inputs([X, y], {"x": np.zeros((1, 64), np.float32), "z": np.zeros((1, 2), np.float32)})
    with pytest.raises(InvalidInput, match="send a dict"):
        fit_inputs([X, y], np.zeros((1, 64), np.float32))


def test_inputs_must_agree_on_rows_and_batch_axis() -> None:
    y = TensorSpec("y", "float32", (2,))
    with pytest.raises(InvalidInput, match="number of rows"):
        fit_inputs([X, y], {"x": np.zeros((2, 64), np.float32), "y": np.zeros((3, 2), np.float32)})
    with pytest.raises(InvalidInput, match="some have the batch axis"):
        fit_inputs([X, y], {"x": np.zeros((1, 64), np.float32), "y": np.zeros(2, np.float32)})
    with pytest.raises(InvalidInput, match="no rows"):
        fit_inputs([X], np.zeros((0, 64), np.float32))


def test_fitter_gives_what_fit_inputs_gives_and_still_refuses_bad_layouts() -> None:
    y = TensorSpec("y", "int32", (2,))
    fitter = InputFitter([X, y])
    cases: list[dict[str, np.ndarray]] = [
        {"x": np.ones((3, 64), np.float32), "y": np.ones((3, 2), np.int32)},
        {"x": np.ones(64, np.float32), "y": np.ones(2, np.int32)},
    ]
    for inputs in cases * 2:  # the second time round comes from the cache
        got, want = fitter(inputs), fit_inputs([X, y], inputs)
        assert (got.rows, got.unbatched, got.group) == (want.rows, want.unbatched, want.group)
        for name in ("x", "y"):
            np.testing.assert_array_equal(got.arrays[name], want.arrays[name])
    for _ in range(2):
        with pytest.raises(InvalidInput, match="input 'y'"):
            fitter({"x": np.ones((3, 64), np.float32), "y": np.ones((3, 2), np.int64)})
    single = InputFitter([X])
    for _ in range(2):
        assert single(np.ones((5, 64), np.float32)).arrays["x"].shape == (5, 64)


def test_model_errors_are_one_readable_line() -> None:
    from workers.runner import describe_model_error

    tf_like = RuntimeError(
        "Graph execution error:\n\nDetected at node x defined at (most recent call last):\n"
        '  File "a.py", line 1\n\nValueError: a FAIL marker in the input\n\t [[{{node x}}]]"'
    )
    assert describe_model_error(tf_like) == (
        "RuntimeError: Graph execution error: (ValueError: a FAIL marker in the input)"
    )
    assert describe_model_error(ValueError("x" * 900)).startswith("ValueError: xxx")
    assert len(describe_model_error(ValueError("x" * 900))) == 500


# --- lossless conversions ------------------------------------------------------------------

TEXT = TensorSpec("text", "bytes", (1,))
IDS = TensorSpec("ids", "int64", (3,))


def test_str_items_are_utf8_encoded_for_a_bytes_input() -> None:
    fitted = InputFitter([TEXT])(np.array([["héllo"], ["wörld"]]))
    assert fitted.arrays["text"].dtype == object
    assert fitted.arrays["text"].tolist() == [["héllo".encode()], ["wörld".encode()]]


@pytest.mark.parametrize(
    ("spec", "sent"),
    [(IDS, np.arange(6, dtype=np.int32).reshape(2, 3)),
     (IDS, np.arange(6, dtype=np.uint16).reshape(2, 3)),
     (X, np.ones((2, 64), np.float16))],
)  # fmt: skip
def test_safe_widening_keeps_every_value(spec: TensorSpec, sent: np.ndarray) -> None:
    fitter = InputFitter([spec])
    for _ in range(2):  # the second time through the fitter's cache of layouts
        got = fitter(sent).arrays[spec.name]
        assert got.dtype == np.dtype(spec.dtype)
        np.testing.assert_array_equal(got, sent)


@pytest.mark.parametrize(
    ("spec", "sent"),
    [(IDS, np.ones((2, 3), np.uint64)),   # would wrap past 2**63
     (IDS, np.ones((2, 3), np.float32)),  # would drop fractions
     (X, np.ones((2, 64), np.float64)),   # would round
     (X, np.ones((2, 64), np.int32)),     # float32 holds 24 bits of an int32
     (TEXT, np.array([[120]], np.uint8))],  # numbers are not text
)  # fmt: skip
def test_lossy_conversions_stay_invalid_input(spec: TensorSpec, sent: np.ndarray) -> None:
    with pytest.raises(InvalidInput, match=f"expected {spec.dtype}"):
        InputFitter([spec])(sent)


def test_conversions_can_be_turned_off() -> None:
    fitter = InputFitter([IDS], convert=False)
    with pytest.raises(InvalidInput, match="expected int64"):
        fitter(np.zeros((1, 3), np.int32))
    with pytest.raises(InvalidInput, match="expected bytes"):
        InputFitter([TEXT], convert=False)(np.array([["a"]]))


# --- fixed batch axes and written signatures ------------------------------------------------


def test_a_fixed_batch_axis_is_shown_as_it_is() -> None:
    assert TensorSpec("images", "uint8", (None, None, 3), batch=1).describe() == (
        "uint8 [1, *, *, 3]"
    )


def test_parse_spec_reads_what_describe_prints() -> None:
    for spec in (X, IMG, TEXT, TensorSpec("images", "uint8", (None, None, 3), batch=1)):
        assert parse_spec(spec.name, spec.describe()) == spec
    assert parse_spec("s", "string [None, 2]") == TensorSpec("s", "bytes", (2,))
    for bad in ("float32", "float33 [*]", "float32 []", "float32 [*, x]"):
        with pytest.raises(ValueError, match="s: "):
            parse_spec("s", bad)


def test_bytes_to_a_pool_of_arrays_say_how_to_send_images() -> None:
    jpeg = np.empty(1, dtype=object)
    jpeg[0] = b"\xff\xd8\xff\xe0 a JPEG file"
    with pytest.raises(InvalidInput) as error:
        fit_inputs([TensorSpec("x", "float32", (8,))], jpeg)
    assert str(error.value) == (
        "input 'x': expected float32 [*, 8], got bytes [1]; this pool does not decode"
        ' images: serve it with preprocess = "image" (--preprocess image) to send JPEG/PNG'
        " files, or send arrays"
    )
