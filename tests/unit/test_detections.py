"""Object Detection API-style outputs: trimmed, thresholded, sorted, labelled, scaled."""

from __future__ import annotations

import numpy as np

from queueing.wire import dtype_name
from workers.detections import Detections


def outputs() -> dict[str, np.ndarray]:
    """Two rows of four candidates; row 0 has 3 real detections, row 1 has 1."""
    boxes = np.tile(np.array([0.1, 0.2, 0.5, 0.6], np.float32), (2, 4, 1))
    boxes[0, 1] = [0.0, 0.0, 1.0, 1.0]
    return {
        "detection_boxes": boxes,
        "detection_scores": np.array([[0.5, 0.9, 0.2, 0.99], [0.7, 0.1, 0.0, 0.0]], np.float32),
        "detection_classes": np.array([[3, 1, 2, 1], [2, 2, 0, 0]], np.float32),
        "num_detections": np.array([3, 1], np.float32),
    }


def test_real_detections_above_min_score_best_first_and_trimmed() -> None:
    post = Detections(min_score=0.3, labels=["cat", "dog", "owl"])
    result = post.finish(post(outputs()))
    assert result["count"].tolist() == [2, 1]  # 0.99 is past num_detections; 0.2 < 0.3
    assert result["scores"].shape == (2, 2)  # trimmed to the most any row has
    np.testing.assert_allclose(result["scores"], [[0.9, 0.5], [0.7, 0.0]])
    assert result["classes"].tolist() == [[1, 3], [2, -1]]
    assert result["labels"].tolist() == [["cat", "owl"], ["dog", ""]]
    np.testing.assert_allclose(result["boxes"][0, 0], [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(result["boxes"][1, 1], [0, 0, 0, 0])


def test_boxes_in_pixels_of_the_input_image() -> None:
    post = Detections(pixels_of="images")
    images = np.zeros((2, 100, 200, 3), np.uint8)
    result = post.finish(post(outputs(), {"images": images}))
    np.testing.assert_allclose(result["boxes"][0, 0], [0, 0, 100, 200])
    assert post.output_names == ["boxes", "scores", "classes", "count"]


def test_a_row_without_detections() -> None:
    post = Detections(min_score=0.95)
    result = post.finish(post(outputs()))
    assert result["count"].tolist() == [0, 0]
    assert result["boxes"].shape == (2, 0, 4)


def test_output_specs_are_what_the_answers_carry() -> None:
    """The specs a worker registers (the gateway's metadata); the detection axis is free."""
    post = Detections(labels=["cat", "dog", "owl"])
    answer = post.finish(post(outputs()))
    specs = post.output_specs([])
    assert [s.name for s in specs] == list(answer)
    for spec in specs:
        got = answer[spec.name]
        assert spec.dtype == dtype_name(got)
        assert len(spec.shape) == got.ndim - 1
        assert all(d is None or d == n for d, n in zip(spec.shape, got.shape[1:], strict=True))
