"""Processing after inference for detection models with Object Detection API-style outputs
(``detection_boxes``, ``detection_scores``, ``detection_classes``, ``num_detections``).
No TensorFlow here (numpy on the batch's outputs).

Each row keeps its real detections (the first ``num_detections``) that score at least
``min_score``, best first. The batch's answer pads the rows to the model's detection
count; each request's answer is trimmed (:meth:`Detections.finish`) to the most
detections any of its rows has, with ``count`` saying how many each row has:

* ``boxes``: float32 [rows, k, 4], [ymin, xmin, ymax, xmax], normalized or in pixels;
* ``scores``: float32 [rows, k]; ``classes``: int32 [rows, k] (-1 past ``count``);
* ``labels``: str [rows, k] with a labels file (line n names class n; "" past ``count``);
* ``count``: int32 [rows].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from queueing.wire import STR
from workers.config import PoolConfig
from workers.errors import ConfigError
from workers.postprocess import read_labels
from workers.spec import TensorSpec

BOXES, SCORES, CLASSES, NUM = (
    "detection_boxes",
    "detection_scores",
    "detection_classes",
    "num_detections",
)


class Detections:
    """Trim, threshold, label and scale the detections of a batch."""

    def __init__(
        self,
        *,
        min_score: float = 0.0,
        labels: Sequence[str] = (),
        pixels_of: str | None = None,
        has_count: bool = True,
    ) -> None:
        self.min_score = min_score
        self.labels = np.array(["", *labels], dtype=str) if labels else None
        self.pixels_of = pixels_of  # the image input whose height and width scale the boxes
        self.has_count = has_count
        self.output_names = ["boxes", "scores", "classes", "count"] + (["labels"] if labels else [])

    @classmethod
    def from_config(
        cls, config: PoolConfig, outputs: Sequence[str], inputs: Sequence[TensorSpec]
    ) -> Detections:
        """Built for a model with ``outputs`` and ``inputs``; raises :class:`ConfigError`
        if they are not a detector's."""
        missing = sorted({BOXES, SCORES, CLASSES} - set(outputs))
        if missing:
            raise ConfigError(
                f"postprocess = 'detections' needs the outputs {BOXES}, {SCORES}, {CLASSES}"
                f" (and {NUM}); the model has {list(outputs)}, missing {missing}"
            )
        pixels_of = None
        if config.box_units == "pixels":
            images = [s for s in inputs if len(s.shape) == 3]
            if config.image_input:
                images = [s for s in inputs if s.name == config.image_input]
            if len(images) != 1:
                raise ConfigError("box_units = 'pixels' needs the image input: set image_input")
            pixels_of = images[0].name
        labels = read_labels(config.labels_file) if config.labels_file else []
        return cls(min_score=config.min_score, labels=labels, pixels_of=pixels_of,
                   has_count=NUM in outputs)  # fmt: skip

    def __call__(
        self, outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        boxes = np.asarray(outputs[BOXES], dtype=np.float32)
        scores = np.asarray(outputs[SCORES], dtype=np.float32)
        classes = np.asarray(outputs[CLASSES])
        rows, n = scores.shape
        if self.has_count:
            real = np.asarray(outputs[NUM]).reshape(rows).astype(np.int64)
        else:
            real = np.full(rows, n)
        keep = (np.arange(n)[np.newaxis] < real[:, np.newaxis]) & (scores >= self.min_score)
        # Kept detections first, best first; ties in the model's order.
        order = np.lexsort((np.arange(n)[np.newaxis].repeat(rows, 0), -scores, ~keep), axis=-1)
        keep = np.take_along_axis(keep, order, axis=-1)
        boxes = np.take_along_axis(boxes, order[..., np.newaxis], axis=1) * keep[..., np.newaxis]
        if self.pixels_of is not None and inputs is not None:
            height, width = inputs[self.pixels_of].shape[1:3]
            boxes = boxes * np.array([height, width, height, width], dtype=np.float32)
        result = {
            "boxes": boxes.astype(np.float32),
            "scores": np.where(keep, np.take_along_axis(scores, order, axis=-1), 0.0).astype(
                np.float32
            ),
            "classes": np.where(
                keep, np.rint(np.take_along_axis(classes, order, axis=-1)), -1
            ).astype(np.int32),
            "count": keep.sum(axis=-1).astype(np.int32),
        }
        if self.labels is not None:
            index = np.where((result["classes"] >= 1) & (result["classes"] < len(self.labels)),
                             result["classes"], 0)  # fmt: skip
            result["labels"] = self.labels[index]
        return result

    def finish(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request's answer: rows trimmed to the most detections any of them has."""
        k = int(outputs["count"].max(initial=0))
        return {name: value if name == "count" else value[:, :k] for name, value in outputs.items()}

    def output_specs(self, model_outputs: Sequence[TensorSpec]) -> list[TensorSpec]:
        """The answers' specs (see the module docstring): the detection axis is free, as
        each answer is trimmed to its own rows' most detections."""
        specs = {
            "boxes": ("float32", (None, 4)),
            "scores": ("float32", (None,)),
            "classes": ("int32", (None,)),
            "count": ("int32", ()),
            "labels": (STR, (None,)),
        }
        return [TensorSpec(name, *specs[name]) for name in self.output_names]
