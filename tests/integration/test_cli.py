"""The ``tfpool`` command as a user runs it: real subprocesses, real signals."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import IO, cast

import numpy as np

from tests.integration import models
from tests.integration.helpers import TFPOOL, URL_LINE, heartbeats, redis_is_up
from tests.waiting import wait_until


def test_demo_prints_results_and_stops_its_private_redis() -> None:
    done = subprocess.run(
        [*TFPOOL, "demo", "--requests", "300"], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "one row      -> [" in done.stdout
    assert "300 one-row requests in" in done.stdout
    assert "300 correct" in done.stdout
    assert "tfpool demo: done" in done.stdout
    match = URL_LINE.search(done.stdout)
    assert match is not None, done.stdout
    assert not redis_is_up(match.group(1))


def test_serve_on_private_redis_then_predict_then_sigterm_drains(
    mlp_path: str, tmp_path: Path
) -> None:
    serve = subprocess.Popen(
        [*TFPOOL, "serve", "--model", mlp_path, "--name", "cli-mlp", "--workers", "1",
         "--max-batch-size", "4", "--heartbeat-s", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = cast(IO[str], serve.stdout).readline()
        match = URL_LINE.search(line)
        assert match is not None, line
        url = match.group(1)
        wait_until(lambda: heartbeats(url, "cli-mlp"), timeout=120, what="a ready worker")

        x = np.random.default_rng(5).standard_normal((6, 8)).astype(np.float32)
        np.save(tmp_path / "x.npy", x)
        predicted = subprocess.run(
            [*TFPOOL, "predict", "--model", "cli-mlp", "--input", str(tmp_path / "x.npy"),
             "--output", str(tmp_path / "y.npy"), "--redis-url", url],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert predicted.returncode == 0, predicted.stderr
        want = next(iter(models.keras_outputs(mlp_path, x).values()))
        np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-5, atol=1e-6)

        typo = subprocess.run(
            [*TFPOOL, "predict", "--model", "cli-mpl", "--input", str(tmp_path / "x.npy"),
             "--redis-url", url],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert typo.returncode == 2
        assert "UnknownModel: no pool serves model 'cli-mpl'" in typo.stderr

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
        assert not redis_is_up(url)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        for pipe in (serve.stdout, serve.stderr):
            if pipe is not None:
                pipe.close()


def test_bad_configuration_is_a_clear_error() -> None:
    done = subprocess.run(
        [*TFPOOL, "serve", "--model", "m.keras", "--max-batch-size", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "max_batch_size must be >= 1" in done.stderr


def test_a_missing_model_is_a_one_line_error_before_any_worker_starts(redis_url: str) -> None:
    done = subprocess.run(
        [*TFPOOL, "serve", "--model", "/nonexistent/model.keras", "--redis-url", redis_url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert (
        done.stderr == "tfpool serve: model /nonexistent/model.keras: no such file or directory\n"
    )
    assert done.stdout == ""


def test_unloadable_model_stops_the_pool_with_exit_code_3(redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "not-a-model.txt"
    path.write_text("not a model")
    done = subprocess.run(
        [*TFPOOL, "serve", "--model", str(path), "--redis-url", redis_url, "--workers", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]
    assert "could not load the model" in done.stderr
    assert "serving model" not in done.stdout  # it never served
