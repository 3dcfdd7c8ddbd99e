"""Loading a model once per worker process, and running it on a batch. Imports TensorFlow:
import this module only in a worker, after the process's device environment is set.

Every kind of model loads into the same :class:`LoadedModel`: Keras ``.keras`` / ``.h5``
files (Sequential, functional, subclassed), SavedModel directories (by signature), a
``module:callable`` builder restored from a checkpoint (:mod:`workers.checkpoints`) and a
TF1 frozen GraphDef (:mod:`workers.frozen_graph`). The input spec always comes from the
loaded model.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from queueing import wire
from workers.errors import ModelLoadError, first_line
from workers.rows import check_output_rows
from workers.spec import TensorSpec

if TYPE_CHECKING:
    from workers.config import PoolConfig

log = logging.getLogger(__name__)


class LoadedModel:
    """A model ready to run: its input and output specs and a batch function.

    ``batch_limit`` is the batch size the model's signature fixes (None: any size). A
    model with one runs every batch at exactly that many rows (padded)."""

    def __init__(
        self,
        *,
        inputs: Sequence[TensorSpec],
        output_names: Sequence[str],
        function: Callable[..., Any],
        source: str,
        outputs: Sequence[TensorSpec] = (),
        kind: str = "",
    ) -> None:
        self.inputs = list(inputs)
        self.output_names = list(output_names)
        self.outputs = list(outputs)
        self._function = function
        self.source = source
        self.kind = kind
        fixed = {s.batch for s in self.inputs if s.batch is not None}
        if len(fixed) > 1:
            raise ModelLoadError(
                f"{source}: the inputs fix different batch sizes {sorted(fixed)}: "
                + ", ".join(f"{s.name} {s.describe()}" for s in self.inputs)
            )
        self.batch_limit: int | None = fixed.pop() if fixed else None

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: input arrays by name (rows first) -> output arrays by name."""
        outputs = self._function(*(arrays[s.name] for s in self.inputs))
        return {name: np.asarray(outputs[name]) for name in self.output_names}

    def example(self, rows: int) -> dict[str, np.ndarray]:
        """Inputs of ``rows`` rows: zeros, or empty strings for string inputs."""
        arrays = {}
        for s in self.inputs:
            if s.dtype in (wire.BYTES, wire.STR):
                arrays[s.name] = np.full(s.example_shape(rows), b"", dtype=object)
            else:
                arrays[s.name] = np.zeros(s.example_shape(rows), dtype=s.dtype)
        return arrays

    def warm_up(self, batch_sizes: Sequence[int], *, check_rows: bool = True) -> None:
        """Run every batch size once so no trace or kernel choice happens on the hot path.
        ``check_rows``: and raise :class:`~workers.rows.RowsNotIndependent` unless every
        output has the batch's rows on axis 0."""
        for rows in batch_sizes:
            try:
                outputs = self(self.example(rows))
                if check_rows:
                    check_output_rows(self.source, outputs, rows)
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


#: ``package.module:callable``: a builder, not a path.
BUILDER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def load_configured(config: PoolConfig) -> LoadedModel:
    """:func:`load_model` of ``config.model`` with the config's loading options: what a
    worker, ``tfpool inspect`` and the layout measuring all load."""
    return load_model(
        config.model,
        signature=config.signature,
        checkpoint=config.checkpoint,
        input_signature=config.input_signature,
        graph_inputs=config.graph_inputs,
        graph_outputs=config.graph_outputs,
    )


def load_model(
    path: str,
    *,
    signature: str = "serving_default",
    checkpoint: str = "",
    input_signature: Mapping[str, str] | None = None,
    graph_inputs: Mapping[str, str] | None = None,
    graph_outputs: Mapping[str, str] | None = None,
) -> LoadedModel:
    """Load any kind of model tfpool serves (see the module docstring). Raises
    :class:`ModelLoadError` saying what is wrong and what to do."""
    if BUILDER.match(path) and not os.path.exists(path):
        from workers.checkpoints import load_builder

        return load_builder(path, checkpoint=checkpoint, input_signature=input_signature or {})
    if checkpoint:
        raise ModelLoadError(
            f"checkpoint is set but model {path!r} is not a builder: give model as"
            " 'package.module:function' returning the model the checkpoint restores"
        )
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise ModelLoadError(f"{path} is a directory without saved_model.pb")
        return _load_saved_model(path, signature)
    if not os.path.exists(path):
        raise ModelLoadError(f"no model file at {path}")
    if path.endswith((".keras", ".h5", ".hdf5")):
        return _load_keras_file(path)
    if path.endswith(".pb"):
        from workers.frozen_graph import load_frozen_graph

        return load_frozen_graph(path, inputs=graph_inputs or {}, outputs=graph_outputs or {})
    raise ModelLoadError(
        f"{path}: expected a SavedModel directory, a .keras / .h5 file, a frozen graph .pb,"
        " or 'package.module:function'"
    )


def spec_of(name: str, shape: Any, dtype: Any) -> TensorSpec:
    """The wire-side spec of a TensorFlow input: rows first; a fixed batch axis kept."""
    dims = tuple(tf.TensorShape(shape).as_list()) if shape is not None else None
    if not dims:
        raise ModelLoadError(
            f"input {name!r} has no batch axis (shape {dims}); tfpool batches on axis 0"
        )
    dtype = tf.as_dtype(dtype)
    # A tf.string input takes bytes items (an encoded image, text): the wire's "bytes".
    name_of_dtype = wire.BYTES if dtype == tf.string else dtype.name
    return TensorSpec(name=name, dtype=name_of_dtype, shape=tuple(dims[1:]), batch=dims[0])


def tf_signature(inputs: Sequence[TensorSpec]) -> list[tf.TensorSpec]:
    """The tf.function input signature of wire-side specs."""
    return [
        tf.TensorSpec(shape=(s.batch, *s.shape), dtype=tf_dtype(s.dtype), name=s.name)
        for s in inputs
    ]


def tf_dtype(name: str) -> tf.DType:
    """The TensorFlow dtype of a wire dtype name (``bytes`` and ``str`` -> tf.string)."""
    return tf.string if name in (wire.BYTES, wire.STR) else tf.as_dtype(name)


def output_specs(structured: Mapping[str, Any]) -> list[TensorSpec]:
    """Specs of a concrete function's outputs. A rank-0 output gets ``batch=0`` and no
    axes (it has no rows: the row check refuses it, and ``tfpool inspect`` says so)."""
    specs = []
    for name in sorted(structured):
        t = structured[name]
        dims = t.shape.as_list() if t.shape.rank is not None else [None]
        dtype = wire.BYTES if t.dtype == tf.string else t.dtype.name
        specs.append(
            TensorSpec(name=name, dtype=dtype, shape=tuple(dims[1:]), batch=dims[0] if dims else 0)
        )
    return specs


def name_outputs(out: Any, names: Sequence[str] | None) -> dict[str, tf.Tensor]:
    """A model's outputs by name: a dict as it is; a list by ``names`` (Keras' functional
    output names) or ``output_0``, ``output_1``...; one tensor as ``names[0]`` or
    ``output_0``. The same names ``model.export()`` gives, for the models that have none."""
    if isinstance(out, Mapping):
        return dict(out)
    items = list(out) if isinstance(out, (list, tuple)) else [out]
    if names is None or len(names) != len(items):
        names = [f"output_{i}" for i in range(len(items))]
    return dict(zip(names, items, strict=True))


def _load_saved_model(path: str, signature: str) -> LoadedModel:
    try:
        loaded = tf.saved_model.load(path)
    except Exception as e:
        raise ModelLoadError(f"cannot read {path} as a SavedModel: {first_line(e)}") from e
    if signature not in loaded.signatures:
        raise ModelLoadError(
            f"{path} has no signature {signature!r}; it has {sorted(loaded.signatures)}"
            " (save with signatures=..., or from Keras with model.export())"
        )
    concrete = loaded.signatures[signature]
    _, kwargs = concrete.structured_input_signature
    names = sorted(kwargs)
    inputs = [spec_of(n, kwargs[n].shape, kwargs[n].dtype) for n in names]
    output_names = sorted(concrete.structured_outputs)

    def run(*arrays: np.ndarray) -> Any:
        return concrete(**dict(zip(names, arrays, strict=True)))

    # `loaded` must stay alive while the signature is used: keep it in the closure.
    run.loaded = loaded  # type: ignore[attr-defined]
    return LoadedModel(
        inputs=inputs,
        output_names=output_names,
        function=run,
        source=path,
        outputs=output_specs(concrete.structured_outputs),
        kind=f"SavedModel, signature {signature!r}",
    )


def _load_keras_file(path: str) -> LoadedModel:
    import keras

    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:
        hint = ""
        if "Could not locate" in str(e) or "Unknown" in str(e):
            hint = " (custom classes: list the modules that define them in preload)"
        raise ModelLoadError(f"cannot read {path} as a Keras model: {first_line(e)}{hint}") from e
    return keras_model(model, source=path)


def keras_model(
    model: Any, *, source: str, inputs: Sequence[TensorSpec] | None = None
) -> LoadedModel:
    """A Keras model (Sequential, functional or subclassed) as a :class:`LoadedModel`.
    ``inputs``: the spec, for a model that does not know its own (a subclassed model
    never called)."""
    structure: Any
    if inputs is not None:
        structure = None if len(inputs) == 1 else [s.name for s in inputs]
    elif _has_symbolic_inputs(model):
        inputs = [spec_of(t.name, t.shape, t.dtype) for t in model.inputs]
        try:
            structure = model.input
        except AttributeError:  # a loaded Sequential model has inputs but no `input`
            structure = None
    else:
        inputs = _subclassed_inputs(model, source)
        structure = None
    # Functional models name their outputs; for the others, the names model.export() uses.
    given = list(model.output_names) if getattr(model, "output_names", None) else None
    keyed = isinstance(structure, dict)
    listed = isinstance(structure, (list, tuple)) and len(inputs) > 1

    # autograph=False: the body is plain Python on tensors, nothing for AutoGraph to convert.
    @tf.function(input_signature=tf_signature(inputs), autograph=False)  # type: ignore[untyped-decorator]
    def run(*tensors: tf.Tensor) -> dict[str, tf.Tensor]:
        if keyed:
            args: Any = {s.name: t for s, t in zip(inputs, tensors, strict=True)}
        elif listed:
            args = list(tensors)
        else:
            args = tensors[0]
        return name_outputs(model(args, training=False), given)

    # The traced function itself: calling it skips tf.function's per-call argument
    # canonicalisation (the signature is fixed, so there is nothing to choose).
    try:
        concrete = run.get_concrete_function()
    except Exception as e:
        raise ModelLoadError(f"{source}: the model cannot be traced: {first_line(e)}") from e
    # Keep the model alive with its function (a builder's model is referenced nowhere else).
    concrete.keras_model = model
    return LoadedModel(
        inputs=inputs,
        output_names=given
        if given is not None and set(given) == set(concrete.structured_outputs)
        else sorted(concrete.structured_outputs),
        function=concrete,
        source=source,
        outputs=output_specs(concrete.structured_outputs),
        kind=f"Keras {type(model).__name__}",
    )


def _has_symbolic_inputs(model: Any) -> bool:
    try:
        return bool(model.inputs)
    except (AttributeError, ValueError):  # a subclassed model has no symbolic inputs
        return False


def _subclassed_inputs(model: Any, source: str) -> list[TensorSpec]:
    """A subclassed model's input, from the shape it was built with (its batch axis is
    whatever batch it first saw: free here) and the name of ``call``'s first argument."""
    config = model.get_build_config() if hasattr(model, "get_build_config") else None
    shape = (config or {}).get("input_shape")
    if not shape or not all(d is None or isinstance(d, int) for d in shape):
        raise ModelLoadError(
            f"{source}: the Keras model {type(model).__name__} has no input shape tfpool can"
            " read (a subclassed model that was never called, or of several inputs): build it"
            " with keras.Input, or serve it from model.export()"
        )
    params = [p for p in inspect.signature(model.call).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]  # fmt: skip
    name = params[0].name if params else "inputs"
    dtype = getattr(model, "input_dtype", None) or "float32"
    return [TensorSpec(name=name, dtype=_wire_dtype(dtype), shape=tuple(shape[1:]))]


def _wire_dtype(dtype: Any) -> str:
    as_tf = tf.as_dtype(dtype)
    return wire.BYTES if as_tf == tf.string else as_tf.name


def gpu_memory_in_use() -> float:
    """Bytes of GPU memory TensorFlow holds in this process (its one visible GPU: each
    worker sees only its own), 0 when it cannot tell."""
    try:
        return float(tf.config.experimental.get_memory_info("GPU:0")["current"])
    except (ValueError, RuntimeError):  # no GPU, or a TensorFlow build without the figure
        return 0.0
