"""A model built by the user's code (``model = "mypkg.models:build_model"``) and restored from
a checkpoint: a ``tf.train.Checkpoint`` folder or ``ckpt-N`` prefix (what
``tf.train.CheckpointManager`` writes), or a Keras ``.weights.h5`` file (what Keras'
``ModelCheckpoint(save_weights_only=True)`` writes). Imports TensorFlow: worker-only."""

from __future__ import annotations

import glob
import importlib
import os
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from workers.errors import ModelLoadError, first_line
from workers.model import (
    LoadedModel,
    keras_model,
    name_outputs,
    output_specs,
    spec_of,
    tf_dtype,
    tf_signature,
)
from workers.spec import TensorSpec, parse_spec


def load_builder(
    target: str, *, checkpoint: str, input_signature: Mapping[str, str]
) -> LoadedModel:
    """Call the builder ``module:function``, restore ``checkpoint`` into what it returns (a
    Keras model or a tf.Module), and wrap it. ``input_signature`` (name -> "float32 [*, 4]")
    for a model that does not know its inputs."""
    import keras

    inputs = _parse_signature(target, input_signature)
    obj = _build(target)
    source = f"{target} ({checkpoint})" if checkpoint else target
    is_keras = isinstance(obj, keras.Model)
    if is_keras and inputs and not obj.built:
        # Variables exist only once the model is built: build them before restoring, or
        # the restore would bind nothing and the first call make fresh random weights.
        zeros = [tf.zeros(s.example_shape(1), tf_dtype(s.dtype)) for s in inputs]
        obj(zeros[0] if len(zeros) == 1 else zeros)
    if checkpoint:
        _restore(obj, checkpoint, target, keras_model_=is_keras)
    if is_keras:
        return keras_model(obj, source=source, inputs=inputs or None)
    if isinstance(obj, tf.Module):
        return _module_model(obj, source, inputs)
    raise ModelLoadError(
        f"{target}() returned a {type(obj).__name__}: expected a Keras model or a tf.Module"
    )


def _parse_signature(target: str, signature: Mapping[str, str]) -> list[TensorSpec]:
    try:
        return [parse_spec(name, text) for name, text in signature.items()]
    except ValueError as e:
        raise ModelLoadError(f"input_signature of {target}: {e}") from e


def _build(target: str) -> Any:
    module_name, _, function_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ModelLoadError(
            f"cannot import {module_name!r} for model {target!r}: {e!r} (it is imported with"
            " the worker's sys.path and PYTHONPATH)"
        ) from e
    build = getattr(module, function_name, None)
    if not callable(build):
        raise ModelLoadError(f"{module_name} has no function {function_name!r} (model {target!r})")
    try:
        return build()
    except Exception as e:
        raise ModelLoadError(f"{target}() failed: {e!r}") from e


def _restore(obj: Any, checkpoint: str, target: str, *, keras_model_: bool) -> None:
    """Restore into ``obj``; every variable of it must be found in the checkpoint (values
    the model has no use for, such as an optimizer's, may be left over)."""
    path = checkpoint
    if os.path.isdir(checkpoint):
        latest = tf.train.latest_checkpoint(checkpoint)
        if latest is None:
            weights = sorted(
                glob.glob(os.path.join(checkpoint, "*.weights.h5")), key=os.path.getmtime
            )
            if not weights:
                raise ModelLoadError(
                    f"checkpoint folder {checkpoint} has no tf.train checkpoint (no 'checkpoint'"
                    " file) and no .weights.h5 file"
                )
            latest = weights[-1]
        path = latest
    if path.endswith(".weights.h5"):
        if not keras_model_:
            raise ModelLoadError(f"{path} holds Keras weights but {target}() is not a Keras model")
        try:
            obj.load_weights(path)
        except Exception as e:
            raise ModelLoadError(f"cannot restore {path} into {target}(): {first_line(e)}") from e
        return
    if not os.path.exists(path + ".index"):
        raise ModelLoadError(f"no checkpoint at {path} (expected {path}.index)")
    try:
        # read(), not restore(): a checkpoint from write() has no save counter to match.
        status = tf.train.Checkpoint(model=obj).read(path)
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise ModelLoadError(
            f"checkpoint {path} does not restore all of {target}(): {first_line(e)} (a partial"
            " restore would serve random weights)"
        ) from e
    except Exception as e:
        raise ModelLoadError(f"cannot restore {path} into {target}(): {first_line(e)}") from e
    status.expect_partial()  # left-over values (an optimizer's) are expected, not a warning


def _module_model(module: tf.Module, source: str, inputs: list[TensorSpec]) -> LoadedModel:
    """A tf.Module called as ``module(*inputs)``: with ``inputs`` given, or its ``__call__``
    a tf.function with an input signature."""
    if not inputs:
        # A tf.function __call__ carries its signature (a plain method has none).
        given = getattr(type(module).__dict__.get("__call__"), "input_signature", None)
        if not given:
            raise ModelLoadError(
                f"{source}: the tf.Module has no input signature: give input_signature, or"
                " decorate __call__ with @tf.function(input_signature=[...])"
            )
        inputs = [spec_of(s.name or f"input_{i}", s.shape, s.dtype) for i, s in enumerate(given)]

    @tf.function(input_signature=tf_signature(inputs), autograph=False)  # type: ignore[untyped-decorator]
    def run(*tensors: tf.Tensor) -> dict[str, tf.Tensor]:
        return name_outputs(module(*tensors), None)

    try:
        concrete = run.get_concrete_function()
    except Exception as e:
        raise ModelLoadError(f"{source}: the module cannot be traced: {first_line(e)}") from e
    concrete.module = module  # keep it alive with its function
    return LoadedModel(
        inputs=inputs,
        output_names=sorted(concrete.structured_outputs),
        function=concrete,
        source=source,
        outputs=output_specs(concrete.structured_outputs),
        kind=f"tf.Module {type(module).__name__} from a builder",
    )
