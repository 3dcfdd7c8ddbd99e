"""Small real models the integration tests build, and their own outputs to compare with."""

from __future__ import annotations

import io
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf


def build_keras_two_in_two_out(directory: Path) -> tuple[str, str]:
    """A Keras functional model: inputs a [*, 4] and b [*, 3]; outputs y [*, 2] and
    z [*, 1]. Saved as .keras and .h5; returns both paths."""
    keras.utils.set_random_seed(7)
    a = keras.Input((4,), name="a")
    b = keras.Input((3,), name="b")
    joined = keras.layers.Concatenate()([a, b])
    hidden = keras.layers.Dense(8, activation="tanh")(joined)
    y = keras.layers.Dense(2, name="y")(hidden)
    z = keras.layers.Dense(1, name="z")(hidden)
    model = keras.Model({"a": a, "b": b}, {"y": y, "z": z})
    keras_path, h5_path = str(directory / "twin.keras"), str(directory / "twin.h5")
    model.save(keras_path)
    model.save(h5_path)
    return keras_path, h5_path


def build_keras_mlp(directory: Path) -> str:
    """Dense 8 -> 16 -> 3, one input x, one output."""
    keras.utils.set_random_seed(3)
    x = keras.Input((8,), name="x")
    hidden = keras.layers.Dense(16, activation="relu")(x)
    out = keras.layers.Dense(3)(hidden)
    path = str(directory / "mlp.keras")
    keras.Model(x, out).save(path)
    return path


class _Ragged(tf.Module):
    """Inputs a [*, None] float32 (any width) and b [*, 3] float32; outputs
    total = sum(a, axis 1) + sum(b, axis 1)  [*, 1] and scaled = 2 * b  [*, 3]."""

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.float32, name="a"),
            tf.TensorSpec([None, 3], tf.float32, name="b"),
        ]
    )
    def serve(self, a: tf.Tensor, b: tf.Tensor) -> dict[str, tf.Tensor]:
        total = tf.reduce_sum(a, axis=1, keepdims=True) + tf.reduce_sum(b, axis=1, keepdims=True)
        return {"total": total, "scaled": 2.0 * b}


def build_saved_model(directory: Path) -> str:
    """A SavedModel with two inputs (one of free width) and two outputs, signature
    ``serving_default`` and the same under ``other``."""
    module = _Ragged()
    path = str(directory / "ragged")
    tf.saved_model.save(
        module, path, signatures={"serving_default": module.serve, "other": module.serve}
    )
    return path


class _Times(tf.Module):
    """x [*, 4] float32 -> y = x * factor."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = tf.constant(factor, tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"y": x * self.factor}


def build_times_model(path: Path, factor: float) -> str:
    """A SavedModel at ``path`` whose output ``y`` is its input ``x`` [*, 4] times
    ``factor`` (versions of one model that answer differently)."""
    module = _Times(factor)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return str(path)


class _Wider(tf.Module):
    """features [*, 6] float64 -> total = 2 * the row's sum [*, 1], doubled [*, 6]."""

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float64, name="features")])
    def serve(self, features: tf.Tensor) -> dict[str, tf.Tensor]:
        doubled = features * 2.0
        return {"total": tf.reduce_sum(doubled, axis=1, keepdims=True), "doubled": doubled}


def build_wider_model(path: Path) -> str:
    """A SavedModel at ``path`` whose signature differs from :func:`build_times_model`'s in
    every way: input ``features`` [*, 6] float64, outputs ``total`` [*, 1] and ``doubled``
    [*, 6] (a version of a model that takes other inputs than the version before)."""
    module = _Wider()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return str(path)


def ragged_outputs(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """What the SavedModel computes, in numpy."""
    total = a.sum(axis=-1, keepdims=True) + b.sum(axis=-1, keepdims=True)
    return {"total": total, "scaled": 2.0 * b}


def keras_outputs(path: str, inputs: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
    """The model's own outputs, from Keras in this process."""
    model = keras.models.load_model(path, compile=False)
    out = model.predict_on_batch(inputs)
    if isinstance(out, dict):
        return {k: np.asarray(v) for k, v in out.items()}
    return {model.output_names[0]: np.asarray(out)}


IMAGE_LABELS = ["cat", "dog", "fox", "owl", "yak"]


def build_keras_image_classifier(directory: Path) -> tuple[str, str]:
    """Image [*, 8, 8, 3] float32 -> class probabilities [*, 5] (softmax). Returns the model
    path and a labels file naming the five classes."""
    keras.utils.set_random_seed(11)
    image = keras.Input((8, 8, 3), name="image")
    features = keras.layers.Conv2D(4, 3, activation="relu")(image)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    probabilities = keras.layers.Dense(5, activation="softmax")(pooled)
    path = str(directory / "pets.keras")
    keras.Model(image, probabilities).save(path)
    labels = directory / "pets.labels.txt"
    labels.write_text("\n".join(IMAGE_LABELS) + "\n")
    return path, str(labels)


def decoded_image_input(data: bytes, *, scale: float) -> np.ndarray:
    """What the pool should make of one encoded image for the classifier, done directly."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return (tf.image.resize(image, (8, 8)) * scale).numpy()  # type: ignore[no-any-return]


def encode_image(pixels: np.ndarray, fmt: str) -> bytes:
    """``pixels`` (uint8 [h, w, c]) as PNG, JPEG, GIF or BMP bytes."""
    if fmt in ("gif", "bmp"):  # TensorFlow decodes these but cannot encode them
        from PIL import Image

        out = io.BytesIO()
        Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(out, fmt)
        return out.getvalue()
    if fmt == "png":
        return tf.io.encode_png(pixels).numpy()  # type: ignore[no-any-return]
    return tf.io.encode_jpeg(pixels, quality=90).numpy()  # type: ignore[no-any-return]
