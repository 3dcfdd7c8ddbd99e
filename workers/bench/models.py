"""The models the benchmark serves, by name: built with random weights and real shapes,
each in a spawned child, so that the benchmark's own process stays free of TensorFlow."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_SPAWN = multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class BenchModel:
    """A benchmark model: its input's shape (without the batch axis) and how to save it."""

    shape: tuple[int, ...]
    build: Callable[[str], None]  # saves the model at the path given
    input_name: str = "x"  # what a TF Serving client names the input (gateway scenarios)


def _build_identity(path: str) -> None:
    import keras

    x = keras.Input((16,), name="x")
    keras.Model(x, keras.layers.Identity(name="y")(x)).save(path)


def _build_mlp(path: str) -> None:
    import keras

    x = keras.Input((64,), name="x")
    h = keras.layers.Dense(256, activation="relu")(x)
    h = keras.layers.Dense(256, activation="relu")(h)
    keras.Model(x, keras.layers.Dense(10, name="y")(h)).save(path)


def _build_mobilenet(path: str) -> None:
    import keras

    keras.applications.MobileNetV2(input_shape=(224, 224, 3), weights=None).save(path)


def _build_framenet(path: str) -> None:
    """A small convolutional classifier of 112x112 frames (scripts/video_frames.py)."""
    import keras

    x = keras.Input((112, 112, 3), name="frame")
    h = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    h = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    keras.Model(x, keras.layers.Dense(10, activation="softmax", name="classes")(h)).save(path)


#: Every benchmark model, by the name scenarios use.
MODELS: dict[str, BenchModel] = {
    "identity": BenchModel((16,), _build_identity),
    "mlp": BenchModel((64,), _build_mlp),
    "mobilenet": BenchModel((224, 224, 3), _build_mobilenet),
    "framenet": BenchModel((112, 112, 3), _build_framenet, "frame"),
}


def build_model(name: str, directory: str) -> str:
    """Save benchmark model ``name`` under ``directory``; returns its path."""
    path = str(Path(directory) / f"{name}.keras")
    if not os.path.exists(path):
        child = _SPAWN.Process(target=_build, args=(name, path))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"building {name} failed")
    return path


def _build(name: str, path: str) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    MODELS[name].build(path)
