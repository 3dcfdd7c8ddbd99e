"""A TF1 frozen graph (a binary GraphDef ``.pb``): imported into a ``wrap_function`` and
pruned to the tensors ``graph_inputs`` and ``graph_outputs`` name. Imports TensorFlow:
worker-only."""

from __future__ import annotations

from collections.abc import Mapping

import tensorflow as tf

from workers.errors import ModelLoadError, first_line
from workers.model import LoadedModel, output_specs, spec_of


def load_frozen_graph(
    path: str, *, inputs: Mapping[str, str], outputs: Mapping[str, str]
) -> LoadedModel:
    """``inputs`` / ``outputs``: the names requests and results use -> tensor names
    (``{"x": "x:0"}``)."""
    if not inputs or not outputs:
        raise ModelLoadError(
            f"{path} is a frozen graph: name its tensors in [pool.graph_inputs] and"
            ' [pool.graph_outputs] (e.g. x = "x:0", probs = "probs:0")'
        )
    graph_def = tf.compat.v1.GraphDef()
    try:
        with open(path, "rb") as f:
            graph_def.ParseFromString(f.read())
    except Exception as e:  # protobuf's DecodeError, or an unreadable file
        raise ModelLoadError(f"cannot read {path} as a frozen GraphDef: {first_line(e)}") from e

    def imports() -> None:
        tf.compat.v1.import_graph_def(graph_def, name="")

    try:
        wrapped = tf.compat.v1.wrap_function(imports, [])
    except Exception as e:
        raise ModelLoadError(f"cannot import the graph of {path}: {first_line(e)}") from e
    graph = wrapped.graph
    names = sorted(inputs)
    feeds, fetches = [], {}
    try:
        for name in names:
            feeds.append(graph.get_tensor_by_name(inputs[name]))
        for name, tensor in outputs.items():
            fetches[name] = graph.get_tensor_by_name(tensor)
    except (KeyError, ValueError) as e:
        placeholders = [op.name + ":0" for op in graph.get_operations() if op.type == "Placeholder"]
        raise ModelLoadError(
            f"{path}: {first_line(e)} (the graph's placeholders: {placeholders})"
        ) from e
    specs = [spec_of(n, t.shape if t.shape.rank is not None else None, t.dtype)
             for n, t in zip(names, feeds, strict=True)]  # fmt: skip
    try:
        pruned = wrapped.prune(feeds=feeds, fetches=fetches)
    except Exception as e:
        raise ModelLoadError(
            f"{path}: cannot prune the graph to its outputs: {first_line(e)}"
        ) from e

    def run(*arrays: object) -> dict[str, tf.Tensor]:
        # A pruned function takes tensors only (its flat signature).
        return pruned(*(tf.convert_to_tensor(a) for a in arrays))  # type: ignore[no-any-return]

    run.wrapped = wrapped  # type: ignore[attr-defined]  # keeps the graph alive
    return LoadedModel(
        inputs=specs,
        output_names=sorted(outputs),
        function=run,
        source=path,
        outputs=output_specs({n: t for n, t in fetches.items()}),
        kind="TF1 frozen GraphDef",
    )
