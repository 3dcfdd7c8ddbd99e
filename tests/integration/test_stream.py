"""Video-style streams: results in order, a bounded window, expired frames marked."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from queueing import Client, DeadlineExceeded
from tests.integration import models
from tests.integration.conftest import PoolFactory
from tests.integration.poison import SLOW, build_poison_model


def test_frames_come_back_in_order_under_concurrency(
    start_pool: PoolFactory, mlp_path: str, redis_url: str
) -> None:
    start_pool(mlp_path, name="frames", max_batch_size=8)
    rng = np.random.default_rng(3)
    videos = [rng.standard_normal((120, 8)).astype(np.float32) for _ in range(4)]

    def play(video: np.ndarray) -> np.ndarray:
        with Client(redis_url) as client:
            return np.stack([np.asarray(r) for r in client.stream("frames", iter(video),
                                                                  window=6)])  # fmt: skip

    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(play, videos))
    for video, got in zip(videos, outputs, strict=True):
        want = next(iter(models.keras_outputs(mlp_path, video).values()))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_window_bounds_frames_in_flight(
    start_pool: PoolFactory, mlp_path: str, redis_url: str
) -> None:
    start_pool(mlp_path, name="frames-window")
    taken = [0]
    consumed = [0]
    most_ahead = [0]
    lock = threading.Lock()

    def camera() -> Iterator[np.ndarray]:
        for _ in range(40):
            with lock:
                taken[0] += 1
                most_ahead[0] = max(most_ahead[0], taken[0] - consumed[0])
            yield np.zeros(8, np.float32)

    with Client(redis_url) as client:
        for _ in client.stream("frames-window", camera(), window=3):
            with lock:
                consumed[0] += 1
    assert consumed[0] == 40
    assert most_ahead[0] <= 3


def test_frames_past_their_deadline_are_marked_and_the_stream_goes_on(
    start_pool: PoolFactory, model_dir: Path, redis_url: str
) -> None:
    path = build_poison_model(model_dir)
    # One row per batch: a frame queued behind the slow one waits the whole 1.5 s.
    start_pool(path, name="frames-late", max_batch_size=1, preload=["tests.integration.poison"])
    frames = [np.full(4, SLOW, np.float32)] + [np.full(4, float(i), np.float32) for i in range(9)]
    with Client(redis_url) as client:
        results = list(client.stream("frames-late", frames, window=4, deadline_ms=300))
    assert len(results) == 10
    assert np.asarray(results[0]).shape == (2,)  # the slow frame itself was started in time
    assert all(isinstance(r, DeadlineExceeded) for r in results[1:4])  # queued behind it
    assert all(isinstance(r, np.ndarray) for r in results[4:])  # the stream went on


def test_window_must_be_positive(redis_url: str) -> None:
    with Client(redis_url) as client, pytest.raises(ValueError, match="window"):
        next(client.stream("frames", [np.zeros(8, np.float32)], window=0))


def test_a_result_comes_out_before_the_camera_has_its_next_frame(
    start_pool: PoolFactory, mlp_path: str, redis_url: str
) -> None:
    start_pool(mlp_path, name="frames-live")
    shown = [threading.Event() for _ in range(5)]
    waited_in_vain = []

    def camera() -> Iterator[np.ndarray]:
        for i in range(5):
            yield np.full(8, i, np.float32)
            # A live camera: the next frame comes only after this one's result is shown
            # (a stream that waits to fill its window would never see it).
            if not shown[i].wait(timeout=20):
                waited_in_vain.append(i)

    with Client(redis_url) as client:
        for i, result in enumerate(client.stream("frames-live", camera(), window=4)):
            assert isinstance(result, np.ndarray)
            shown[i].set()
    assert waited_in_vain == []
