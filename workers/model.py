"""Loading a model once per worker process, and running it on a batch. Imports TensorFlow:
import this module only in a worker, after the process's device environment is set."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from queueing import wire
from workers.errors import ModelLoadError
from workers.spec import TensorSpec

log = logging.getLogger(__name__)


class LoadedModel:
    """A model ready to run: its input and output specs and a batch function."""

    def __init__(
        self,
        *,
        inputs: Sequence[TensorSpec],
        output_names: Sequence[str],
        function: Callable[..., Any],
        source: str,
    ) -> None:
        self.inputs = list(inputs)
        self.output_names = list(output_names)
        self._function = function
        self.source = source

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: input arrays by name (rows first) -> output arrays by name."""
        outputs = self._function(*(arrays[s.name] for s in self.inputs))
        return {name: outputs[name].numpy() for name in self.output_names}

    def example(self, rows: int) -> dict[str, np.ndarray]:
        """Inputs of ``rows`` rows: zeros, or empty strings for string inputs."""
        arrays = {}
        for s in self.inputs:
            if s.dtype in (wire.BYTES, wire.STR):
                arrays[s.name] = np.full(s.example_shape(rows), b"", dtype=object)
            else:
                arrays[s.name] = np.zeros(s.example_shape(rows), dtype=s.dtype)
        return arrays

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run every batch size once so no trace or kernel choice happens on the hot path."""
        for rows in batch_sizes:
            try:
                self(self.example(rows))
            except tf.errors.InvalidArgumentError:
                if not any(s.dtype == wire.BYTES for s in self.inputs):
                    raise
                # A model of encoded inputs may refuse empty strings: it warms up on traffic.
                log.info("%s: no warm-up (the model refuses empty strings)", self.source)
                return


def configure_tensorflow(
    *, intra_op_threads: int | None, inter_op_threads: int | None
) -> dict[Any, Any]:
    """Thread pools and GPU memory growth: must run before TensorFlow runs any op.
    Returns the settings in force, as TensorFlow reports them (for the heartbeat)."""
    if intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
    if inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        # Without memory growth TensorFlow takes the whole card at start.
        tf.config.experimental.set_memory_growth(gpu, True)
    return {
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"),
        "visible_gpus": len(gpus),
        "memory_growth": "on"
        if gpus and all(tf.config.experimental.get_memory_growth(g) for g in gpus)
        else "n/a",
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def load_model(path: str, *, signature: str = "serving_default") -> LoadedModel:
    """Load a SavedModel directory (with ``signature``) or a Keras ``.keras`` / ``.h5`` file."""
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise ModelLoadError(f"{path} is a directory without saved_model.pb")
        return _load_saved_model(path, signature)
    if path.endswith((".keras", ".h5", ".hdf5")):
        if not os.path.exists(path):
            raise ModelLoadError(f"no model file at {path}")
        return _load_keras(path)
    raise ModelLoadError(f"{path}: expected a SavedModel directory, a .keras or an .h5 file")


def _spec(name: str, shape: Any, dtype: Any) -> TensorSpec:
    dims = tuple(shape)
    if not dims:
        raise ModelLoadError(f"input {name!r} has no batch axis; tfpool batches on axis 0")
    dtype = tf.as_dtype(dtype)
    # A tf.string input takes bytes items (an encoded image, say): the wire's "bytes".
    name_of_dtype = wire.BYTES if dtype == tf.string else dtype.name
    return TensorSpec(name=name, dtype=name_of_dtype, shape=tuple(dims[1:]))


def _load_saved_model(path: str, signature: str) -> LoadedModel:
    loaded = tf.saved_model.load(path)
    if signature not in loaded.signatures:
        raise ModelLoadError(
            f"{path} has no signature {signature!r}; it has {sorted(loaded.signatures)}"
        )
    concrete = loaded.signatures[signature]
    _, kwargs = concrete.structured_input_signature
    names = sorted(kwargs)
    inputs = [_spec(n, kwargs[n].shape, kwargs[n].dtype) for n in names]
    output_names = sorted(concrete.structured_outputs)

    def run(*arrays: np.ndarray) -> Any:
        return concrete(**dict(zip(names, arrays, strict=True)))

    # `loaded` must stay alive while the signature is used: keep it in the closure.
    run.loaded = loaded  # type: ignore[attr-defined]
    return LoadedModel(inputs=inputs, output_names=output_names, function=run, source=path)


def _load_keras(path: str) -> LoadedModel:
    import keras

    model = keras.models.load_model(path, compile=False)
    inputs = [_spec(t.name, t.shape, t.dtype) for t in model.inputs]
    output_names = list(model.output_names)
    structure = model.input
    signature = [tf.TensorSpec(shape=(None, *s.shape), dtype=s.dtype, name=s.name) for s in inputs]

    # autograph=False: the body is plain Python on tensors, nothing for AutoGraph to convert.
    @tf.function(input_signature=signature, autograph=False)  # type: ignore[untyped-decorator]
    def run(*tensors: tf.Tensor) -> dict[str, tf.Tensor]:
        if isinstance(structure, dict):
            args: Any = {s.name: t for s, t in zip(inputs, tensors, strict=True)}
        elif isinstance(structure, (list, tuple)):
            args = list(tensors)
        else:
            args = tensors[0]
        out = model(args, training=False)
        if isinstance(out, dict):
            return dict(out)
        if isinstance(out, (list, tuple)):
            return dict(zip(output_names, out, strict=True))
        return {output_names[0]: out}

    # The traced function itself: calling it skips tf.function's per-call argument
    # canonicalisation (the signature is fixed, so there is nothing to choose).
    concrete = run.get_concrete_function()
    return LoadedModel(inputs=inputs, output_names=output_names, function=concrete, source=path)


def gpu_memory_in_use() -> float:
    """Bytes of GPU memory TensorFlow holds in this process (its one visible GPU: each
    worker sees only its own), 0 when it cannot tell."""
    try:
        return float(tf.config.experimental.get_memory_info("GPU:0")["current"])
    except (ValueError, RuntimeError):  # no GPU, or a TensorFlow build without the figure
        return 0.0
