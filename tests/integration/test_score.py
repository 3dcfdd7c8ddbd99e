"""Offline scoring: file to file, row for row, resumable, bad rows set aside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from queueing import Client
from queueing.score import Progress, score
from tests.integration import models
from tests.integration.conftest import PoolFactory
from tests.integration.helpers import TFPOOL, stop_process
from tests.integration.poison import FAIL, build_poison_model
from tests.waiting import wait_until


def test_scores_equal_the_model_row_for_row(
    start_pool: PoolFactory, mlp_path: str, redis_url: str, tmp_path: Path
) -> None:
    start_pool(mlp_path, name="scoring", max_batch_size=64)
    x = np.random.default_rng(1).standard_normal((5000, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    with Client(redis_url) as client:
        summary = score(client, "scoring", str(tmp_path / "x.npy"), str(tmp_path / "y.npy"),
                        chunk_rows=128, window=4)  # fmt: skip
    assert (summary.rows, summary.scored, summary.failed_rows) == (5000, 5000, 0)
    want = next(iter(models.keras_outputs(mlp_path, x).values()))
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-5, atol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["x.npy", "y.npy"]  # no sidecar, no errors file


class _CtrlCAfter(Progress):
    """A progress reporter that raises KeyboardInterrupt once ``limit`` rows are done:
    Ctrl-C at a known point of the run."""

    limit = 0

    def update(self, rows: int) -> None:
        super().update(rows)
        if self.done >= self.limit:
            raise KeyboardInterrupt


def test_an_interrupted_run_continues_and_ends_as_an_uninterrupted_one(
    start_pool: PoolFactory, mlp_path: str, redis_url: str, tmp_path: Path
) -> None:
    start_pool(mlp_path, name="scoring-resume", max_batch_size=64)
    x = np.random.default_rng(2).standard_normal((3000, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    paths = (str(tmp_path / "x.npy"), str(tmp_path / "y.npy"))
    _CtrlCAfter.limit = 1200
    with Client(redis_url) as client:
        with pytest.raises(KeyboardInterrupt):
            score(client, "scoring-resume", *paths, chunk_rows=100, progress=_CtrlCAfter)
        record = json.loads((tmp_path / "y.npy.progress.json").read_text())
        assert sorted(record["done"]) == list(range(12))  # recorded as it stopped
        summary = score(client, "scoring-resume", *paths, chunk_rows=100)
    assert summary.scored == 1800  # only what was left
    want = next(iter(models.keras_outputs(mlp_path, x).values()))
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "y.npy.progress.json").exists()


def test_ctrl_c_on_the_command_line_saves_progress_and_says_how_to_continue(
    start_pool: PoolFactory, mlp_path: str, redis_url: str, tmp_path: Path
) -> None:
    start_pool(mlp_path, name="scoring-sigint")
    np.save(tmp_path / "x.npy", np.zeros((100_000, 8), np.float32))
    # One row per request, one in flight: slow on purpose, so there is time to interrupt.
    command = [*TFPOOL, "score", "--model", "scoring-sigint", str(tmp_path / "x.npy"),
               str(tmp_path / "y.npy"), "--redis-url", redis_url, "--chunk-rows", "1",
               "--window", "1"]  # fmt: skip
    sidecar = tmp_path / "y.npy.progress.json"
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(sidecar.exists, timeout=120, what="the first progress record")
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "interrupted; run the same command again to continue" in err
    done = json.loads(sidecar.read_text())["done"]
    assert 0 < len(done) < 100_000


def test_a_bad_row_goes_to_the_errors_file_and_its_neighbours_are_scored(
    start_pool: PoolFactory, model_dir: Path, redis_url: str, tmp_path: Path
) -> None:
    path = build_poison_model(model_dir)
    start_pool(path, name="scoring-bad", max_batch_size=32, preload=["tests.integration.poison"])
    x = np.random.default_rng(3).standard_normal((400, 4)).astype(np.float32)
    x[123, 2] = FAIL
    np.save(tmp_path / "x.npy", x)
    with Client(redis_url) as client:
        summary = score(client, "scoring-bad", str(tmp_path / "x.npy"), str(tmp_path / "y.npy"),
                        chunk_rows=50)  # fmt: skip
    assert summary.failed_rows == 1
    errors = (tmp_path / "y.npy.errors.tsv").read_text().splitlines()
    assert len(errors) == 1
    assert errors[0].startswith("123\tModelError: model failed: InvalidArgumentError")
    assert "ValueError: a FAIL marker in the input" in errors[0]
    got = np.load(tmp_path / "y.npy")
    assert np.isnan(got[123]).all()
    good = np.delete(np.arange(400), 123)
    want = next(iter(models.keras_outputs(path, x[good]).values()))
    np.testing.assert_allclose(got[good], want, rtol=1e-5, atol=1e-6)


def test_named_inputs_from_npz_give_named_outputs_in_npz(
    start_pool: PoolFactory, twin_paths: tuple[str, str], redis_url: str, tmp_path: Path
) -> None:
    start_pool(twin_paths[0], name="scoring-twin")
    rng = np.random.default_rng(4)
    inputs = {"a": rng.standard_normal((700, 4)).astype(np.float32),
              "b": rng.standard_normal((700, 3)).astype(np.float32)}  # fmt: skip
    np.savez(tmp_path / "in.npz", a=inputs["a"], b=inputs["b"])
    with Client(redis_url) as client:
        score(client, "scoring-twin", str(tmp_path / "in.npz"), str(tmp_path / "out.npz"),
              chunk_rows=100)  # fmt: skip
    want = models.keras_outputs(twin_paths[0], inputs)
    with np.load(tmp_path / "out.npz") as got:
        assert sorted(got.files) == ["y", "z"]
        for name in ("y", "z"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "out.npz.parts").exists()


# `tfpool score` itself, in a child that samples its own anonymous resident memory (the
# heap: what the run holds). Pages of the memory-mapped input and output are file pages
# (page cache the kernel can drop at will), so VmHWM, which counts them, grows with the
# file even when the run holds nothing more.
_RSS_SCRIPT = """
import sys, threading
from workers.cli import main

def anon():
    status = open("/proc/self/status").read()
    return int(status.split("RssAnon:")[1].split()[0]) * 1024

peak, stop = [0], threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon())
        stop.wait(0.002)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
stop.set()
sampler.join()
print("peak-anon", code, peak[0], file=sys.stderr)
"""


def _score_peak_anon(redis_url: str, model: str, rows: int, tmp_path: Path) -> int:
    x = np.random.default_rng(rows).standard_normal((rows, 8)).astype(np.float32)
    np.save(tmp_path / f"x{rows}.npy", x)
    run = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, "score", "--model", model,
         str(tmp_path / f"x{rows}.npy"), str(tmp_path / f"y{rows}.npy"), "--redis-url",
         redis_url],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    _, code, peak = run.stderr.strip().splitlines()[-1].split()
    assert code == "0", run.stderr
    out = np.load(tmp_path / f"y{rows}.npy", mmap_mode="r")
    assert out.shape == (rows, 3) and bool(np.isfinite(out).all())
    return int(peak)


def test_scoring_memory_stays_flat_on_a_much_larger_file(
    start_pool: PoolFactory, mlp_path: str, redis_url: str, tmp_path: Path
) -> None:
    start_pool(mlp_path, name="scoring-rss", max_batch_size=64)
    small = _score_peak_anon(redis_url, "scoring-rss", 10_000, tmp_path)
    large = _score_peak_anon(redis_url, "scoring-rss", 1_000_000, tmp_path)
    size = (tmp_path / "x1000000.npy").stat().st_size  # 32 MB in, 12 MB out
    print(
        f"\nscore peak anonymous RSS: 10,000 rows {small / 2**20:.1f} MiB, "
        f"1,000,000 rows {large / 2**20:.1f} MiB (input {size / 2**20:.0f} MiB)"
    )
    # 100 times the rows, the same memory: a window of chunks (8 x 1,024 rows) and no
    # more. Holding the input, or the output, would add 12 to 32 MiB.
    assert large - small < 8 * 2**20 < size


def test_a_killed_run_resumes_where_its_progress_record_says(
    start_pool: PoolFactory, mlp_path: str, redis_url: str, tmp_path: Path
) -> None:
    start_pool(mlp_path, name="scoring-kill")
    # 10,000 one-request chunks, one in flight: some seconds, and progress is recorded
    # every 2 s (SAVE_EVERY_S), so the kill comes after a record and before the end.
    rows, chunk = 20_000, 2
    x = np.random.default_rng(9).standard_normal((rows, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    command = [*TFPOOL, "score", "--model", "scoring-kill", str(tmp_path / "x.npy"),
               str(tmp_path / "y.npy"), "--redis-url", redis_url, "--chunk-rows", str(chunk),
               "--window", "1"]  # fmt: skip
    sidecar = tmp_path / "y.npy.progress.json"

    def chunks_done() -> int:
        try:
            return len(json.loads(sidecar.read_text())["done"])
        except FileNotFoundError:
            return 0

    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: chunks_done() or run.poll() is not None, timeout=120,
                   what="a progress record")  # fmt: skip
        run.kill()  # SIGKILL: no handler runs, nothing is saved on the way out
    finally:
        stop_process(run)
    assert run.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    before = chunks_done() * chunk  # what the record says, as the kill left it
    assert 0 < before < rows
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    # Only the rows not recorded are sent again; the output is whole and right.
    assert f"({rows - before:,} in this run, {before:,} before)" in again.stdout, again.stdout
    want = next(iter(models.keras_outputs(mlp_path, x).values()))
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-5, atol=1e-6)
    assert not sidecar.exists()
