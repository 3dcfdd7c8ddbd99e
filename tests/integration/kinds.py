"""Every kind of model users bring, built small into files, as the TensorFlow guides save them.
Also imported by workers (``preload``, builders): keep it free of test-only imports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

# --- Keras: Sequential, functional, subclassed, strings ---------------------------------


def sequential() -> keras.Model:
    """The first model of every tutorial: Dense 4 -> 8 -> 3."""
    keras.utils.set_random_seed(21)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
    )


def functional() -> keras.Model:
    keras.utils.set_random_seed(22)
    x = keras.Input((4,), name="features")
    hidden = keras.layers.Dense(6, activation="tanh")(x)
    return keras.Model(x, keras.layers.Dense(2, name="score")(hidden))


@keras.saving.register_keras_serializable(package="tfpool_tests")
class Doubled(keras.Model):
    """A subclassed model: Dense then times two. Registered, so a .keras file of it loads
    in a worker that preloads this module."""

    def __init__(self, units: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units
        self.dense = keras.layers.Dense(units)

    def call(self, features: Any) -> Any:
        return self.dense(features) * 2.0

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units}


def subclassed() -> keras.Model:
    keras.utils.set_random_seed(23)
    model = Doubled()
    model(np.zeros((1, 4), np.float32))  # built by a call, as subclassed models are
    return model


def text_classifier() -> keras.Model:
    """String input: TextVectorization -> embedding -> mean -> Dense 2."""
    keras.utils.set_random_seed(24)
    vectorize = keras.layers.TextVectorization(max_tokens=20, output_sequence_length=5)
    vectorize.adapt(["the cat sat on the mat", "a dog ran far away", "the dog sat"])
    text = keras.Input((1,), dtype="string", name="text")
    x = keras.layers.Embedding(20, 4)(vectorize(text))
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(text, keras.layers.Dense(2, name="score")(x))


def save_keras_kinds(directory: Path) -> dict[str, str]:
    """Each Keras model in each format it can be saved in: ``{kind: path}``."""
    paths: dict[str, str] = {}
    for name, model in (("sequential", sequential()), ("functional", functional()),
                        ("subclassed", subclassed())):  # fmt: skip
        paths[f"{name}.keras"] = str(directory / f"{name}.keras")
        model.save(paths[f"{name}.keras"])
        if name != "subclassed":  # Keras 3 cannot write a subclassed model to .h5
            paths[f"{name}.h5"] = str(directory / f"{name}.h5")
            model.save(paths[f"{name}.h5"])
        paths[f"{name} export"] = str(directory / f"{name}_export")
        model.export(paths[f"{name} export"], verbose=False)
        paths[f"{name} saved_model"] = str(directory / f"{name}_saved")
        # A subclassed model saved this way keeps the batch it was built with: [1, 4].
        tf.saved_model.save(model, paths[f"{name} saved_model"])
    paths["text.keras"] = str(directory / "text.keras")
    text_classifier().save(paths["text.keras"])
    return paths


# --- builders and checkpoints ------------------------------------------------------------


def build_sequential() -> keras.Model:
    """A builder (``model = "tests.integration.kinds:build_sequential"``): the architecture
    only; the weights come from a checkpoint."""
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
    )


def build_bigger() -> keras.Model:
    """build_sequential plus a layer: a checkpoint of build_sequential leaves it half-restored."""
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(3),
            keras.layers.Dense(2),
        ]
    )


class Affine(tf.Module):
    """A tf.Module: y = x @ w + b, with its signature on __call__."""

    def __init__(self) -> None:
        super().__init__()
        self.w = tf.Variable(tf.zeros([4, 2]))
        self.b = tf.Variable(tf.zeros([2]))

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def __call__(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"y": x @ self.w + self.b}


def build_affine() -> Affine:
    return Affine()


def save_checkpoints(directory: Path) -> dict[str, Any]:
    """Trained-looking weights saved as a CheckpointManager folder, a ckpt-N prefix and a
    Keras .weights.h5; and an Affine module's checkpoint. Returns the paths and the models
    that wrote them (to compare with)."""
    keras.utils.set_random_seed(31)
    model = build_sequential()
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, optimizer=keras.optimizers.Adam()),
        str(directory / "ckpts"),
        max_to_keep=2,
    )
    prefix = manager.save()
    weights = str(directory / "model.weights.h5")
    model.save_weights(weights)
    affine = Affine()
    affine.w.assign(tf.random.stateless_normal([4, 2], seed=[1, 2]))
    affine.b.assign([0.5, -0.5])
    affine_prefix = tf.train.Checkpoint(model=affine).write(str(directory / "affine" / "ckpt"))
    return {
        "folder": str(directory / "ckpts"),
        "prefix": prefix,
        "weights": weights,
        "model": model,
        "affine": affine,
        "affine_prefix": affine_prefix,
    }


# --- TF1 frozen graph -------------------------------------------------------------------


def save_frozen_graph(directory: Path) -> tuple[str, Any]:
    """A frozen GraphDef: x float32 [*, 3] -> probs = softmax(x @ w) [*, 2]. Returns the
    path and the function it froze."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    w = tf.Variable(tf.random.stateless_normal([3, 2], seed=[3, 4]))

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def probs(x: tf.Tensor) -> tf.Tensor:
        return tf.identity(tf.nn.softmax(x @ w), name="probs")

    frozen = convert_variables_to_constants_v2(probs.get_concrete_function())
    path = directory / "graph.pb"
    path.write_bytes(frozen.graph.as_graph_def().SerializeToString())
    return str(path), probs


# --- SavedModels: fixed batch, strings of ids, detection, leaking rows -------------------


class Detector(tf.Module):
    """Object Detection API-style: uint8 [1, None, None, 3] -> four candidate boxes (one of
    them padding), scored by the image's mean colour, best first."""

    BOXES = ((0.1, 0.2, 0.5, 0.6), (0.0, 0.0, 1.0, 1.0), (0.25, 0.25, 0.75, 0.75), (0, 0, 0, 0))

    @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8, name="images")])
    def __call__(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        mean = tf.reduce_mean(tf.cast(images, tf.float32) / 255.0, axis=[1, 2])  # [1, 3]
        scores = tf.concat([mean, tf.zeros([1, 1])], axis=1)  # the fourth is padding
        order = tf.argsort(scores[:, :3], direction="DESCENDING")
        order = tf.concat([order, tf.fill([1, 1], 3)], axis=1)
        return {
            "detection_boxes": tf.gather(
                tf.constant([self.BOXES], tf.float32), order, batch_dims=1
            ),
            "detection_scores": tf.gather(scores, order, batch_dims=1),
            "detection_classes": tf.cast(order + 1, tf.float32),
            "num_detections": tf.constant([3.0]),
        }


class Ids(tf.Module):
    """int64 ids [*, 3] -> float32 [*, 1]: half their sum (sent as int32: widened)."""

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.int64, name="ids")])
    def __call__(self, ids: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"half": tf.cast(tf.reduce_sum(ids, axis=1, keepdims=True), tf.float32) * 0.5}


def _leaking(kind: str) -> Any:
    def scalar(x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"total": tf.reduce_sum(x)}

    def mean_rows(x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"mean": tf.reduce_mean(x, axis=0)}

    def centred(x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"centred": x - tf.reduce_mean(x, axis=0, keepdims=True)}

    def gram(x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"gram": x @ tf.transpose(x)}

    body = {"scalar": scalar, "mean_rows": mean_rows, "centred": centred, "gram": gram}[kind]
    return tf.function(body, input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])


#: The leaking models, and the output each check names.
LEAKING = {"scalar": "total", "mean_rows": "mean", "centred": "centred", "gram": "gram"}


def save_saved_models(directory: Path) -> dict[str, str]:
    """The detector, the ids model and the leaking models, as SavedModels."""
    paths = {}
    for name, module in (("detector", Detector()), ("ids", Ids())):
        paths[name] = str(directory / name)
        tf.saved_model.save(module, paths[name], signatures={"serving_default": module.__call__})
    for kind in LEAKING:
        module = tf.Module()
        module.f = _leaking(kind)
        paths[kind] = str(directory / f"leak_{kind}")
        tf.saved_model.save(module, paths[kind], signatures={"serving_default": module.f})
    return paths
