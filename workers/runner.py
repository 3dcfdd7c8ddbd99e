"""Running batches: load the model (and its pre- and post-processing) once; then, per
batch, assemble the rows, pad them to the bucket, run the model, and split the outputs back
to their requests. No Redis here, and no TensorFlow but the model's own.

A batch the model fails on is re-run request by request, so that only the request at fault
gets the error.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from queueing import wire
from queueing.errors import ModelError
from workers.batcher import Batch, Batcher
from workers.config import PoolConfig
from workers.messages import Answer, AnswerMaker, InHand, WorkerStats
from workers.metrics import Recorder
from workers.spec import TensorSpec

if TYPE_CHECKING:
    from workers.detections import Detections
    from workers.model import LoadedModel
    from workers.postprocess import TopK
    from workers.preprocess import ImagePreprocessor
    from workers.tracing import BatchTracer

log = logging.getLogger(__name__)

#: What runs a batch: input arrays by name -> output arrays by name.
BatchFunction = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class Postprocess(Protocol):
    """Processing after inference: on the batch's outputs (and inputs), then on each
    request's merged outputs."""

    def __call__(
        self, outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]: ...

    def finish(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class Served:
    """The model as this worker serves it: loaded and warmed, with its pre- and
    post-processing, and the outputs its answers carry."""

    model: LoadedModel
    preprocess: ImagePreprocessor | None
    postprocess: TopK | Detections | None
    output_names: list[str]
    batcher: Batcher[InHand]

    def describe_inputs(self) -> str:
        """The inputs as producers send them (an image input as the images it takes)."""
        pre = self.preprocess
        return ", ".join(
            pre.describe()
            if pre is not None and s.name == pre.name
            else f"{s.name}: {s.describe()}"
            for s in self.model.inputs
        )

    def output_specs(self) -> list[TensorSpec]:
        """The outputs as answers carry them (after any post-processing), in
        ``output_names`` order; an output whose spec is not known is left out."""
        if self.postprocess is not None:
            return self.postprocess.output_specs(self.model.outputs)
        by_name = {s.name: s for s in self.model.outputs}
        return [by_name[name] for name in self.output_names if name in by_name]


def load(
    config: PoolConfig, batcher: Batcher[InHand], on_warming: Callable[[], None] | None = None
) -> Served:
    """Load the model; choose the batches it allows (``batcher``, unless its signature fixes
    the batch or batching is off); warm it up on every bucket and check that its rows are
    independent; set up its pre- and post-processing. ``on_warming``: called once loaded,
    as warming up starts."""
    from workers.model import load_configured
    from workers.rows import check_independent

    started = time.monotonic()
    model = load_configured(config)
    batcher = batcher_for(config, model.batch_limit, batcher)
    if on_warming is not None:
        on_warming()
    if config.batching == "off":
        model.warm_up([1], check_rows=False)
    else:
        model.warm_up(batcher.buckets)
        check_independent(model.source, model, model.inputs, batcher.buckets)
    output_names = model.output_names
    preprocess = None
    if config.preprocess == "image":
        from workers.preprocess import ImagePreprocessor

        preprocess = ImagePreprocessor(config, model.inputs)
        preprocess.warm_up()
    postprocess: TopK | Detections | None = None
    if config.postprocess == "detections":
        from workers.detections import Detections

        postprocess = Detections.from_config(config, model.output_names, model.inputs)
        output_names = postprocess.output_names
    elif config.postprocess:
        from workers.postprocess import TopK

        postprocess = TopK.from_config(config, model.output_names)
        scores = model(model.example(batcher.bucket_for(1)))[postprocess.output]
        postprocess.check(scores.shape[-1] if scores.ndim > 1 else 0)
        output_names = postprocess.output_names
    log.info("loaded %s in %.1fs; warmed batch sizes %s", model.source,
             time.monotonic() - started, list(batcher.buckets))  # fmt: skip
    return Served(model, preprocess, postprocess, output_names, batcher)


def batcher_for(
    config: PoolConfig, batch_limit: int | None, batcher: Batcher[InHand]
) -> Batcher[InHand]:
    """The batcher the model allows: batches of exactly ``batch_limit`` rows when its
    signature fixes the batch; one unpadded request per batch when batching is off;
    else ``batcher``."""
    if batch_limit is not None:
        if batch_limit < config.max_batch_size or config.buckets:
            log.warning(
                "the model's signature fixes the batch at %d rows: batches of at most %d"
                " rows, padded to %d (max_batch_size is %d)",
                batch_limit, min(batch_limit, config.max_batch_size), batch_limit,
                config.max_batch_size,
            )  # fmt: skip
        return Batcher(
            max_rows=min(batch_limit, config.max_batch_size),
            max_latency_s=config.max_latency_ms / 1000,
            buckets=[batch_limit],
        )
    if config.batching == "off":
        log.warning("batching is off: each request runs in a model call of its own")
        # No company to wait for, no padding, and a request is never split.
        return Batcher(max_rows=config.max_rows, max_latency_s=0.0, pad=False)
    return batcher


class Runner:
    """Runs batches through the model and makes the answers of the requests they complete.
    Used by the main thread only."""

    def __init__(
        self,
        *,
        model: BatchFunction,
        inputs: Sequence[TensorSpec],
        output_names: Sequence[str],
        bucket_for: Callable[[int], int],
        stats: WorkerStats,
        answers: AnswerMaker,
        metrics: Recorder,
        postprocess: Postprocess | None = None,
        tracer: BatchTracer | None = None,
    ) -> None:
        self.model = model
        self.inputs = list(inputs)
        self.output_names = list(output_names)
        # One output, and no post-processing: sent as an array rather than a dict.
        self.single_output = len(self.output_names) == 1 and postprocess is None
        self.bucket_for = bucket_for
        self.stats = stats
        self.answers = answers
        self.metrics = metrics
        self.postprocess = postprocess
        self.tracer = tracer  # None unless trace_exporter is set

    def run(self, batch: Batch[InHand]) -> list[Answer]:
        """Run one batch; return the answers of the requests it completed."""
        started = time.monotonic()
        try:
            self._keep_outputs(batch, self._infer(assemble(batch, self.inputs)))
        except Exception as e:
            log.warning("batch of %d failed (%s); running its requests one by one", batch.rows, e)
            self._run_parts_alone(batch)
        computed = time.monotonic()
        waits = [started - part.item.arrival for part in batch.parts if part.start == 0]
        self.metrics.batch_done(batch.rows, computed - started, waits)
        self.stats.batches += 1
        self.stats.rows += batch.rows
        answers = [
            self._finish(part.item) for part in batch.parts if part.item.rows_done == part.item.rows
        ]
        if self.tracer is not None:
            self._trace(batch, started, computed)
        return answers

    def _trace(self, batch: Batch[InHand], started: float, computed: float) -> None:
        from workers.tracing import Traced

        traced = [
            Traced(p.item.traceparent, p.item.arrival, p.rows, p.start == 0)
            for p in batch.parts
            if p.item.traceparent is not None
        ]
        if traced and self.tracer is not None:
            self.tracer.batch(
                traced,
                rows=batch.rows,
                padded_rows=batch.padded_rows,
                started=started,
                computed=computed,
                finished=time.monotonic(),
            )

    def _infer(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model, then the post-processing, on one batch."""
        started = time.perf_counter()
        try:
            outputs = self.model(arrays)
            return outputs if self.postprocess is None else self.postprocess(outputs, arrays)
        finally:
            self.stats.model_s += time.perf_counter() - started

    def _keep_outputs(self, batch: Batch[InHand], outputs: dict[str, np.ndarray]) -> None:
        """Each part's rows of the outputs, to its request."""
        whole = batch.parts[0].item.rows
        if len(batch.parts) == 1 and batch.rows == batch.padded_rows == whole:
            # A whole request, unpadded: its outputs as they are (with batching off, a model
            # that mixes rows may answer in any shape).
            part = batch.parts[0]
            part.item.output_chunks.append((part.start, outputs))
            part.item.rows_done += part.rows
            return
        offset = 0
        for part in batch.parts:
            rows = part.rows
            chunk = {k: v[offset : offset + rows] for k, v in outputs.items()}
            part.item.output_chunks.append((part.start, chunk))
            part.item.rows_done += rows
            offset += rows

    def _run_parts_alone(self, batch: Batch[InHand]) -> None:
        for part in batch.parts:
            single = Batch(parts=[part], rows=part.rows, padded_rows=self.bucket_for(part.rows))
            try:
                self._keep_outputs(single, self._infer(assemble(single, self.inputs)))
            except Exception as e:
                part.item.error = ModelError(f"model failed: {describe_model_error(e)}")
                part.item.rows_done += part.rows

    def _finish(self, request: InHand) -> Answer:
        if request.error is not None:
            return self.answers.error(request, request.error)
        chunks = request.output_chunks
        chunks.sort(key=lambda chunk: chunk[0])
        if len(chunks) == 1:
            merged = chunks[0][1]
        else:
            merged = {
                name: np.concatenate([outputs[name] for _, outputs in chunks])
                for name in self.output_names
            }
        if self.postprocess is not None:
            merged = self.postprocess.finish(merged)
        if request.unbatched:  # (an output with batching off may have other rows than 1)
            merged = {
                name: value[0] if value.ndim and len(value) == 1 else value
                for name, value in merged.items()
            }
        outputs: wire.Outputs = merged[self.output_names[0]] if self.single_output else merged
        return self.answers.result(request, outputs)


def assemble(batch: Batch[InHand], spec: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """One array per input: the batch's rows in order, padded to its bucket."""
    if len(batch.parts) == 1 and batch.padded_rows == batch.rows:
        part = batch.parts[0]
        return {s.name: part.item.arrays[s.name][part.start : part.stop] for s in spec}
    arrays = {}
    for s in spec:
        first = batch.parts[0].item.arrays[s.name]
        out = np.empty((batch.padded_rows, *first.shape[1:]), dtype=first.dtype)
        offset = 0
        for part in batch.parts:
            out[offset : offset + part.rows] = part.item.arrays[s.name][part.start : part.stop]
            offset += part.rows
        # Padding repeats the last row: valid input for any model (zeros may not be, for
        # a model of strings), and its outputs are dropped.
        out[offset:] = out[offset - 1]
        arrays[s.name] = out
    return arrays


def describe_model_error(error: BaseException) -> str:
    """One line for a model's exception. TensorFlow's messages run to a page of graph
    trace; keep their first line and the Python exception underneath, if one is named."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    summary = f"{type(error).__name__}: {lines[0] if lines else ''}"
    cause = next((line for line in reversed(lines) if _PYTHON_ERROR.match(line)), None)
    if cause is not None and cause not in summary:
        summary += f" ({cause})"
    return summary[:500]


_PYTHON_ERROR = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): \S")
