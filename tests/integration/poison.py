"""A model that kills its worker process when it sees a marker value: the poison pill of
the fault tests. Workers import this module (``preload``) so the layer can be loaded."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

#: A value that kills the worker that runs it.
MARKER = 666.0

#: A value that makes the model raise (a ModelError for its request).
FAIL = 555.0

#: A value that makes its batch take SLOW_S seconds.
SLOW = 777.0
SLOW_S = 1.5

#: When set in a worker's environment, the file to which every batch the model runs is
#: appended, one JSON list of rows per line: what the model was given, padding included.
BATCH_LOG = "TFPOOL_TEST_BATCH_LOG"


@keras.saving.register_keras_serializable(package="tfpool_tests")
class ExitOnMarker(keras.layers.Layer):
    """Passes its input through; exits the process (code 17) if any value is MARKER,
    sleeps SLOW_S seconds if any value is SLOW, raises if any value is FAIL; logs the
    batch first when BATCH_LOG is set."""

    def call(self, x: Any) -> Any:
        def check(values: Any) -> Any:
            log = os.environ.get(BATCH_LOG)
            if log:
                with open(log, "a") as f:
                    f.write(json.dumps(values.numpy().tolist()) + "\n")
            if np.any(values.numpy() == MARKER):
                os._exit(17)
            if np.any(values.numpy() == SLOW):
                time.sleep(SLOW_S)
            if np.any(values.numpy() == FAIL):
                raise ValueError("a FAIL marker in the input")
            return values

        y = tf.py_function(check, [x], x.dtype)
        y.set_shape(x.shape)
        return y


def build_poison_model(directory: Path) -> str:
    """x [*, 4] -> ExitOnMarker -> Dense(2): ordinary outputs unless a row holds MARKER."""
    keras.utils.set_random_seed(11)
    x = keras.Input((4,), name="x")
    y = keras.layers.Dense(2, name="y")(ExitOnMarker()(x))
    path = str(directory / "poison.keras")
    keras.Model(x, y).save(path)
    return path
