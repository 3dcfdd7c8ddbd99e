"""The worker's argmax / top-k against TensorFlow's own, on scores full of ties: the README
says ties go to the lower index, as ``tf.math.top_k`` does. (The unit tests cannot import
TensorFlow; this one needs no Redis.)"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from workers.postprocess import TopK


@pytest.mark.parametrize(("classes", "k"), [(5, 1), (5, 3), (5, 5), (100, 4), (1000, 7)])
def test_top_k_and_argmax_agree_with_tensorflow_on_ties(classes: int, k: int) -> None:
    rng = np.random.default_rng(classes + k)
    # Few distinct values, signed zeros among them: many ties, some at the k-th place.
    values = np.array([-0.0, 0.0, 0.25, 0.5, 1.0], np.float32)
    scores = rng.choice(values, size=(64, classes))
    got = TopK(k=k, argmax=False, output="p")({"p": scores})
    want = tf.math.top_k(scores, k=k)
    np.testing.assert_array_equal(got["indices"], want.indices.numpy())
    np.testing.assert_array_equal(got["scores"], want.values.numpy())
    best = TopK(k=1, argmax=True, output="p")({"p": scores})
    np.testing.assert_array_equal(best["index"], tf.math.argmax(scores, axis=-1).numpy())
