"""A video frame pipeline through the pool, paced like a live camera; prints what it saw.

    python scripts/video_frames.py                        # synthetic 640x480 frames, 30 fps
    python scripts/video_frames.py --video clip.mp4       # a file, read with OpenCV
    python scripts/video_frames.py --fps 60 --encode jpeg --seconds 20
    python scripts/video_frames.py --redis-url redis://host:6379/0 --model NAME

Without ``--redis-url`` it starts a private redis-server and a pool serving a small
convolutional classifier of 112x112 frames, with ``preprocess = "image"`` (each frame is
resized and scaled in the worker) and ``postprocess = "argmax"``. Frames go through
``Client.stream``: results come back in order, at most ``--window`` frames in flight, and a
frame still queued ``--deadline-ms`` after it was sent is dropped by the pool, never run.

The source keeps the camera's pace: a frame is due every 1/fps seconds, and when the
pipeline has fallen more than one frame behind, the frames it missed are skipped (a camera
does not wait). Printed: frames sent, achieved fps, latency percentiles from capture to
result, and the dropped frames (skipped at the source, expired in the queue).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from queueing import Client
from queueing.errors import DeadlineExceeded, RequestError
from workers.bench import build_model
from workers.cli import redis_url_or_embedded
from workers.config import PoolConfig
from workers.placement import Slot, cpu_count
from workers.supervisor import Supervisor


@dataclass
class Tally:
    """What the pipeline saw."""

    captured: list[float] = field(default_factory=list)  # capture times of frames sent
    skipped: int = 0  # frames the source dropped because the pipeline was behind
    latencies_ms: list[float] = field(default_factory=list)
    expired: int = 0
    failed: int = 0


def synthetic_frames(width: int, height: int) -> Iterator[np.ndarray]:
    """Moving gradients with noise, different from one frame to the next: a second of them
    made up front and cycled, so that making frames never slows the source down."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width]
    ring = []
    for t in range(30):
        base = (xs + ys + 8 * t) % 256
        noise = rng.integers(0, 16, (height, width, 1))
        ring.append(np.repeat((base[..., None] + noise) % 256, 3, axis=2).astype(np.uint8))
    for t in range(sys.maxsize):
        yield ring[t % len(ring)]


def video_frames(path: str) -> tuple[Iterator[np.ndarray], float]:
    """The frames of a video file (RGB uint8) and its frame rate."""
    import cv2

    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise SystemExit(f"cannot open video {path}")
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0

    def frames() -> Iterator[np.ndarray]:
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    return
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        finally:
            capture.release()

    return frames(), fps


def paced(
    frames: Iterator[np.ndarray], fps: float, seconds: float, tally: Tally, encode: str
) -> Iterator[np.ndarray | bytes]:
    """``frames`` at ``fps`` for ``seconds``, skipping the frames the consumer missed."""
    interval = 1 / fps
    start = time.perf_counter()
    due = start
    for frame in frames:
        now = time.perf_counter()
        if now - start >= seconds:
            return
        if now > due + interval:  # frames were missed while the pipeline was busy: skip them
            missed = int((now - due) / interval)
            tally.skipped += missed
            due += missed * interval
        if now < due:
            time.sleep(due - now)
        tally.captured.append(max(due, now))
        due += interval
        yield frame if encode == "raw" else _jpeg(frame)


def _jpeg(frame: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


def run(client: Client, model: str, frames: Iterator[np.ndarray], args: argparse.Namespace,
        fps: float) -> Tally:  # fmt: skip
    tally = Tally()
    source = paced(frames, fps, args.seconds, tally, args.encode)
    outcomes = client.stream(model, source, window=args.window, deadline_ms=args.deadline_ms)
    for frame, outcome in enumerate(outcomes):  # in order: frame i was captured i-th
        if isinstance(outcome, DeadlineExceeded):
            tally.expired += 1
        elif isinstance(outcome, RequestError):
            tally.failed += 1
            print(f"frame failed: {outcome}", file=sys.stderr)
        else:
            tally.latencies_ms.append((time.perf_counter() - tally.captured[frame]) * 1000)
    return tally


def report(tally: Tally, fps: float, seconds: float) -> str:
    sent = len(tally.captured)
    span = (tally.captured[-1] - tally.captured[0]) if sent > 1 else 0.0
    answered = len(tally.latencies_ms)
    lines = [
        f"target: {fps:.1f} fps for {seconds:.0f}s",
        f"frames sent: {sent}, answered: {answered},"
        f" achieved: {(sent - 1) / span if span else 0:.1f} fps sent,"
        f" {answered / max(span, 1e-9):.1f} fps answered",
        f"dropped: {tally.skipped} skipped at the source (pipeline behind),"
        f" {tally.expired} expired in the queue (deadline), {tally.failed} failed",
    ]
    if tally.latencies_ms:
        q = statistics.quantiles(tally.latencies_ms, n=100, method="inclusive")
        lines.append(
            f"latency capture->result: p50 {q[49]:.1f} ms, p90 {q[89]:.1f} ms,"
            f" p99 {q[98]:.1f} ms, max {max(tally.latencies_ms):.1f} ms"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def private_pool(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """A private redis-server and a pool of the frame classifier: (url, model name)."""
    with tempfile.TemporaryDirectory() as tmp, redis_url_or_embedded(None) as url:
        config = PoolConfig(
            model=build_model("framenet", tmp),
            name="framenet",
            redis_url=url,
            log_level="WARNING",
            max_batch_size=8,
            max_latency_ms=2.0,
            preprocess="image",
            image_scale=1 / 255,
            postprocess="argmax",
        )
        supervisor = Supervisor(config, slots=[Slot(0, None, cpu_count(), 1)])
        supervisor.start()
        try:
            if not supervisor.wait_ready(timeout=300):
                raise SystemExit("the pool did not start")
            yield url, "framenet"
        finally:
            supervisor.drain()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", help="a video file (default: synthetic frames)")
    parser.add_argument("--fps", type=float, help="frames per second (default: the file's; 30)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to run")
    parser.add_argument("--width", type=int, default=640, help="synthetic frame width")
    parser.add_argument("--height", type=int, default=480, help="synthetic frame height")
    parser.add_argument("--window", type=int, default=8, help="frames in flight")
    parser.add_argument(
        "--deadline-ms", type=float, default=200.0, help="drop frames queued longer"
    )
    parser.add_argument("--encode", choices=["raw", "jpeg"], default="raw",
                        help="send uint8 pixels, or JPEG bytes (OpenCV)")  # fmt: skip
    parser.add_argument("--redis-url", help="an existing pool's Redis (default: start one)")
    parser.add_argument("--model", help="with --redis-url: the model to send frames to")
    args = parser.parse_args(argv)
    if args.redis_url and not args.model:
        parser.error("--redis-url needs --model")

    if args.video:
        frames, file_fps = video_frames(args.video)
    else:
        frames, file_fps = synthetic_frames(args.width, args.height), 30.0
    fps = args.fps or file_fps
    pool = (
        contextlib.nullcontext((args.redis_url, args.model))
        if args.redis_url
        else private_pool(args)
    )
    with pool as (url, model), Client(url) as client:
        tally = run(client, model, frames, args, fps)
    print(report(tally, fps, args.seconds))
    return 0 if tally.latencies_ms else 1


if __name__ == "__main__":
    sys.exit(main())
