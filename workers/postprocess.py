"""Processing after inference, on the whole batch: argmax or top-k, with class labels.
No TensorFlow here (numpy on the batch's output)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from queueing.wire import STR
from workers.config import PoolConfig
from workers.errors import ConfigError
from workers.spec import TensorSpec


class TopK:
    """Turns a batch of class scores ``[rows, ..., classes]`` into the best classes per row,
    best first, ties to the lower index (as ``tf.math.top_k``).

    argmax: ``{"index": int32 [rows, ...], "score": [rows, ...], "label": str}``;
    top-k: ``{"indices": int32 [rows, ..., k], "scores": ..., "labels": ...}``.
    The labels come only with a labels file.
    """

    def __init__(self, *, k: int, argmax: bool, output: str, labels: Sequence[str] = ()) -> None:
        self.k = 1 if argmax else k
        self.argmax = argmax
        self.output = output
        self.labels = np.array(list(labels), dtype=str) if labels else None
        names = ("index", "score", "label") if argmax else ("indices", "scores", "labels")
        self.output_names = list(names if labels else names[:2])

    @classmethod
    def from_config(cls, config: PoolConfig, model_outputs: Sequence[str]) -> TopK:
        """Built for a model with ``model_outputs``; raises :class:`ConfigError` if the
        configuration does not fit the model."""
        output = config.postprocess_output
        if not output:
            if len(model_outputs) != 1:
                raise ConfigError(
                    f"the model has outputs {list(model_outputs)}: set postprocess_output"
                )
            output = model_outputs[0]
        elif output not in model_outputs:
            raise ConfigError(
                f"postprocess_output {output!r} is not one of the model's {list(model_outputs)}"
            )
        labels: list[str] = []
        if config.labels_file:
            labels = read_labels(config.labels_file)
        return cls(k=config.top_k, argmax=config.postprocess == "argmax", output=output,
                   labels=labels)  # fmt: skip

    def check(self, classes: int) -> None:
        """Raise :class:`ConfigError` unless the model's output has a fitting class count."""
        if self.k > classes:
            raise ConfigError(f"top_k is {self.k} but the model has {classes} classes")
        if self.labels is not None and len(self.labels) != classes:
            raise ConfigError(
                f"the labels file has {len(self.labels)} labels for {classes} classes"
            )

    def __call__(
        self, outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """The batch's best classes (``inputs``, the batch's, are not needed)."""
        scores = outputs[self.output]
        if scores.ndim < 2:
            raise ValueError(f"output {self.output!r} has no class axis: shape {scores.shape}")
        classes = scores.shape[-1]
        if self.k == 1:
            best = np.argmax(scores, axis=-1)[..., np.newaxis]
        elif self.k * 8 < classes:
            # Partition first: sorting all the classes of every row costs more.
            top = np.argpartition(-scores, self.k - 1, axis=-1)[..., : self.k]
            # Among the k, best first; equal scores in index order, as a full sort gives.
            order = np.lexsort((top, -np.take_along_axis(scores, top, axis=-1)), axis=-1)
            best = np.take_along_axis(top, order, axis=-1)
            best = self._ties_to_lower_index(scores, best)
        else:
            best = np.argsort(-scores, axis=-1, kind="stable")[..., : self.k]
        chosen = np.take_along_axis(scores, best, axis=-1)
        index = best.astype(np.int32)
        if self.argmax:
            index, chosen = index[..., 0], chosen[..., 0]
        result = dict(zip(self.output_names[:2], (index, chosen), strict=True))
        if self.labels is not None:
            result[self.output_names[2]] = self.labels[index]
        return result

    def finish(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request's answer: as the batch's rows give it."""
        return outputs

    def output_specs(self, model_outputs: Sequence[TensorSpec]) -> list[TensorSpec]:
        """The answers' specs, from the model's (empty if the scored output's is unknown)."""
        scores = next((s for s in model_outputs if s.name == self.output), None)
        if scores is None or not scores.shape:
            return []
        shape = scores.shape[:-1] if self.argmax else (*scores.shape[:-1], self.k)
        dtypes = ("int32", scores.dtype, STR)
        return [
            TensorSpec(name=name, dtype=dtype, shape=shape, batch=scores.batch)
            for name, dtype in zip(self.output_names, dtypes, strict=False)
        ]

    def _ties_to_lower_index(self, scores: np.ndarray, best: np.ndarray) -> np.ndarray:
        """argpartition may keep a higher-index class tied with the k-th score in place of
        a lower-index one; redo such rows with a full stable sort (ties are rare)."""
        kth = np.take_along_axis(scores, best[..., -1:], axis=-1)
        tied = (scores == kth).sum(axis=-1) > (
            np.take_along_axis(scores, best, axis=-1) == kth
        ).sum(axis=-1)
        if tied.any():
            best = best.copy()
            best[tied] = np.argsort(-scores[tied], axis=-1, kind="stable")[..., : self.k]
        return best


def read_labels(path: str) -> list[str]:
    """One label per line; blank lines at the end are ignored, blank lines inside count."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read labels_file {path}: {e}") from e
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ConfigError(f"labels_file {path} has no labels")
    return [line.strip() for line in lines]
