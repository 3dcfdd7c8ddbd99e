"""``tfpool demo``: a small model, a private Redis, a pool; requests in, results out.

The demo model is an MLP whose weights are drawn here with numpy, so the demo can check
every result against a numpy forward pass without importing TensorFlow itself.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from queueing import Client, connection, keys


@dataclass(frozen=True)
class DemoWeights:
    """Weights of the demo MLP: 16 inputs -> 32 (relu) -> 4."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    @classmethod
    def random(cls, seed: int = 0) -> DemoWeights:
        rng = np.random.default_rng(seed)
        return cls(
            w1=rng.standard_normal((16, 32)).astype(np.float32) / 4,
            b1=rng.standard_normal(32).astype(np.float32) / 10,
            w2=rng.standard_normal((32, 4)).astype(np.float32) / 4,
            b2=rng.standard_normal(4).astype(np.float32) / 10,
        )

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The model's output, computed with numpy."""
        hidden: np.ndarray = np.maximum(x @ self.w1 + self.b1, 0)
        out: np.ndarray = hidden @ self.w2 + self.b2
        return out


def _save_keras_mlp(path: str, weights: DemoWeights, debug: bool) -> None:
    from workers.quiet import native_stderr_silenced, quiet_tensorflow_logging

    quiet_tensorflow_logging(debug=debug)
    with native_stderr_silenced(enabled=not debug):
        import keras

    inputs = keras.Input((16,), name="x")
    hidden = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(4, name="y")(hidden)
    model = keras.Model(inputs, outputs)
    model.get_layer("hidden").set_weights([weights.w1, weights.b1])
    model.get_layer("y").set_weights([weights.w2, weights.b2])
    model.save(path)


def build_demo_model(directory: str, weights: DemoWeights, *, debug: bool = False) -> str:
    """Save the demo MLP as ``demo.keras`` in ``directory``, in a spawned child so that
    this process stays free of TensorFlow (whose start-up lines are kept quiet unless
    ``debug``). Returns the path."""
    path = str(Path(directory) / "demo.keras")
    child = multiprocessing.get_context("spawn").Process(
        target=_save_keras_mlp, args=(path, weights, debug)
    )
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"building the demo model failed (exit code {child.exitcode})")
    return path


def forget_model(redis_url: str, model: str, reply_lists: list[str]) -> None:
    """Remove every key the demo's pool and client left in a user's Redis: the model's
    queue, info and dead letters, its name in the list of models, its workers' last
    heartbeats, and the client's reply lists."""
    conn = connection.connect(redis_url, socket_timeout=10)
    try:
        beats = [
            key
            for key in conn.scan_iter(match=keys.WORKER_PATTERN, count=500)
            if conn.hget(key, "model") == model.encode()
        ]
        conn.delete(
            keys.stream(model), keys.model_info(model), keys.dead_letters(model),
            keys.attempts(model), keys.last_alive(model), *beats, *reply_lists,
        )  # fmt: skip
        conn.srem(keys.MODELS, model)
    finally:
        conn.close()


def run_requests(client: Client, model: str, weights: DemoWeights, *, requests: int) -> int:
    """Send the demo traffic, print what came back; return the number of wrong results."""
    rng = np.random.default_rng(1)
    wrong = 0

    one_row = rng.standard_normal(16).astype(np.float32)
    result = client.predict(model, one_row)
    assert isinstance(result, np.ndarray)
    print(f"one row      -> {np.array2string(result, precision=4)}")
    wrong += not np.allclose(result, weights.forward(one_row), atol=1e-4)

    rows = rng.standard_normal((3, 16)).astype(np.float32)
    result = client.predict(model, rows)
    assert isinstance(result, np.ndarray)
    print(f"three rows   -> shape {result.shape}, first {np.array2string(result[0], precision=4)}")
    wrong += not np.allclose(result, weights.forward(rows), atol=1e-4)

    batch = rng.standard_normal((requests, 16)).astype(np.float32)
    started = time.perf_counter()
    futures = client.submit_many(model, list(batch))
    results = [client.wait(f, timeout=120) for f in futures]
    elapsed = time.perf_counter() - started
    got = np.stack([np.asarray(r) for r in results])
    bad = int((~np.isclose(got, weights.forward(batch), atol=1e-4).all(axis=1)).sum())
    wrong += bad
    print(
        f"{requests} one-row requests in {elapsed:.2f}s: {requests / elapsed:,.0f} requests/s,"
        f" {requests - bad} correct"
    )
    return wrong
