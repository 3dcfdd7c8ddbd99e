"""argmax and top-k on a batch of scores, against a full stable sort of each row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from queueing.wire import dtype_name
from workers.config import PoolConfig
from workers.errors import ConfigError
from workers.postprocess import TopK, read_labels
from workers.spec import TensorSpec


def _expected(scores: np.ndarray, k: int) -> np.ndarray:
    """Best first, ties to the lower index: what tf.math.top_k returns."""
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


@pytest.mark.parametrize(("classes", "k"), [(5, 3), (5, 5), (100, 4), (1000, 7)])
def test_top_k_matches_a_full_sort_with_ties(classes: int, k: int) -> None:
    rng = np.random.default_rng(classes)
    # Few distinct values: many ties, some of them at the k-th place.
    scores = rng.integers(0, 6, (64, classes)).astype(np.float32)
    top = TopK(k=k, argmax=False, output="p")
    got = top({"p": scores})
    want = _expected(scores, k)
    np.testing.assert_array_equal(got["indices"], want)
    np.testing.assert_array_equal(got["scores"], np.take_along_axis(scores, want, axis=-1))
    assert got["indices"].dtype == np.int32 and sorted(got) == ["indices", "scores"]


def test_argmax_with_labels_and_extra_axes() -> None:
    scores = np.random.default_rng(0).random((4, 2, 3)).astype(np.float32)
    top = TopK(k=9, argmax=True, output="p", labels=["a", "b", "c"])
    got = top({"p": scores, "other": np.zeros(4)})
    assert sorted(got) == ["index", "label", "score"]
    np.testing.assert_array_equal(got["index"], scores.argmax(axis=-1))
    np.testing.assert_array_equal(got["score"], scores.max(axis=-1))
    assert got["label"].tolist() == np.array(["a", "b", "c"])[scores.argmax(axis=-1)].tolist()


def test_configuration_checked_against_the_model(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n\n")
    assert read_labels(str(labels)) == ["cat", "dog"]
    config = PoolConfig(model="m.keras", postprocess="top_k", top_k=2, labels_file=str(labels))
    top = TopK.from_config(config, ["probabilities"])
    top.check(2)
    with pytest.raises(ConfigError, match="2 labels for 3 classes"):
        top.check(3)
    with pytest.raises(ConfigError, match="set postprocess_output"):
        TopK.from_config(config, ["a", "b"])
    with pytest.raises(ConfigError, match="top_k is 5 but the model has 3 classes"):
        TopK(k=5, argmax=False, output="p").check(3)
    with pytest.raises(ConfigError, match="postprocess must be"):
        PoolConfig(model="m.keras", postprocess="softmax")
    with pytest.raises(ConfigError, match="labels_file"):
        PoolConfig(model="m.keras", labels_file=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match=r"image_size must be \[height, width\]"):
        PoolConfig(model="m.keras", preprocess="image", image_size=[224])


@pytest.mark.parametrize("argmax", [True, False])
def test_output_specs_are_what_the_answers_carry(argmax: bool) -> None:
    """The specs a worker registers (the gateway's metadata) match a real answer's."""
    top = TopK(k=3, argmax=argmax, output="scores", labels=["a", "b", "c", "d", "e"])
    model_outputs = [TensorSpec("scores", "float16", (2, 5)), TensorSpec("other", "int64", ())]
    answer = top({"scores": np.zeros((4, 2, 5), np.float16)})
    specs = top.output_specs(model_outputs)
    assert [s.name for s in specs] == list(answer)
    for spec in specs:
        got = answer[spec.name]
        assert (spec.dtype, spec.shape) == (dtype_name(got), got.shape[1:])
    assert top.output_specs([TensorSpec("other", "int64", ())]) == []
