"""``tfpool inspect MODEL``: what a model takes and gives, the batches it allows, whether its
rows are independent, and a ``Client.predict`` call that fits it. Like
``saved_model_cli show``, but answering "what do I send". Imports TensorFlow (it loads the
model, exactly as a worker would)."""

from __future__ import annotations

from collections.abc import Sequence

from queueing import wire
from workers.batcher import default_buckets
from workers.config import PoolConfig
from workers.spec import TensorSpec

#: Rows in the example call (or the fixed batch, if the model has one).
EXAMPLE_ROWS = 2
#: The size the example gives a free axis other than the batch axis.
EXAMPLE_FREE = 8


def inspect_model(config: PoolConfig) -> str:
    """The report, as ``tfpool inspect`` prints it."""
    from workers.model import load_configured
    from workers.process import preload
    from workers.rows import RowsNotIndependent, check_independent

    preload(config.preload)
    model = load_configured(config)
    limit = model.batch_limit
    buckets = [limit] if limit else default_buckets(config.max_batch_size)
    try:
        model.warm_up(buckets)
        check_independent(model.source, model, model.inputs, buckets)
        rows = (
            f"yes (checked on batches of {_sizes(buckets)} rows)"
            if max(buckets) > 1
            else "yes (one row per batch: nothing to mix)"
        )
    except RowsNotIndependent as e:
        rows = f"NO: {e}".replace(f"{model.source}: ", "")
    if limit:
        batch = (
            f"fixed at {limit} by the model's signature: batches of at most"
            f" {min(limit, config.max_batch_size)} row(s), each padded to {limit}"
        )
    else:
        batch = (
            f"any size: requests share batches of up to max_batch_size = {config.max_batch_size}"
        )
    example_rows = limit or EXAMPLE_ROWS
    lines = [
        f"model: {model.source} ({model.kind})",
        "inputs:",
        *(f"  {s.name}: {s.describe()}" for s in model.inputs),
        "outputs:",
        *(f"  {s.name}: {_describe_output(s)}" for s in model.outputs),
        f"batch: {batch}",
        f"rows independent: {rows}",
        "example:",
        *(f"  {line}" for line in example_call(config.name, model.inputs, example_rows)),
        f"  # result: {_result(model.outputs, example_rows)}",
    ]
    return "\n".join(lines)


def example_call(name: str, inputs: Sequence[TensorSpec], rows: int) -> list[str]:
    """Python lines that send ``rows`` rows of the right dtypes and shapes."""
    arrays = [f"{s.name!r}: {_example_array(s, rows)}" for s in inputs]
    sent = arrays[0].split(": ", 1)[1] if len(arrays) == 1 else "{" + ", ".join(arrays) + "}"
    return [
        "import numpy as np",
        "from queueing import Client",
        "with Client(REDIS_URL) as client:",
        f"    result = client.predict({name!r}, {sent})",
    ]


def _example_array(spec: TensorSpec, rows: int) -> str:
    shape = tuple(EXAMPLE_FREE if d is None else d for d in (rows, *spec.shape))
    if spec.dtype in (wire.BYTES, wire.STR):
        return f"np.full({shape}, b'...', dtype=object)"
    return f"np.zeros({shape}, np.{spec.dtype})"


def _describe_output(spec: TensorSpec) -> str:
    if spec.batch == 0 and not spec.shape:  # rank 0 (see workers.model.output_specs)
        return f"{spec.dtype} [] (a scalar: no rows)"
    return spec.describe()


def _result(outputs: Sequence[TensorSpec], rows: int) -> str:
    """What ``client.predict`` returns for ``rows`` rows: one array, or a dict of them."""
    described = [
        f"{s.dtype} [{', '.join('*' if d is None else str(d) for d in (rows, *s.shape))}]"
        if s.batch != 0 or s.shape
        else f"{s.dtype} []"
        for s in outputs
    ]
    if len(outputs) == 1:
        return f"an array, {described[0]}"
    return (
        "{" + ", ".join(f"{s.name!r}: {d}" for s, d in zip(outputs, described, strict=True)) + "}"
    )


def _sizes(buckets: Sequence[int]) -> str:
    return ", ".join(str(b) for b in buckets)
