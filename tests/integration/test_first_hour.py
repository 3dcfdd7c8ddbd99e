"""The failures a new user meets first, through the ``tfpool`` command as they run it:
each says what is wrong on one line, exits with its documented code, and never hangs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO, cast

import numpy as np
import psutil
import pytest
import redis

from queueing import AsyncClient, Client, RequestTimeout, liveness
from queueing.score import Progress, score
from tests.integration import models
from tests.integration.conftest import PoolFactory
from tests.integration.helpers import TFPOOL, URL_LINE, heartbeats, redis_is_up, start_serve
from tests.integration.poison import FAIL, build_poison_model
from tests.waiting import wait_until
from workers.embedded_redis import RedisServer, free_port


def _tfpool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TFPOOL, *args], capture_output=True, text=True, timeout=timeout)


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def mlp_pool(start_pool: PoolFactory, mlp_path: str) -> str:
    start_pool(mlp_path, name="first-hour")
    return "first-hour"


# --- a pool that stopped -------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own: status sees only this test's models."""
    with RedisServer() as server:
        yield server


def test_a_stopped_pool_is_named_in_timeouts_and_status(
    start_pool: PoolFactory, mlp_path: str, own_redis: RedisServer, tmp_path: Path
) -> None:
    url = own_redis.url
    supervisor = start_pool(mlp_path, name="gone", url=url, heartbeat_s=0.5)
    live = _tfpool("status", "--json", "--redis-url", url)
    assert live.returncode == 0, live.stderr
    report = json.loads(live.stdout)
    (worker,) = report["workers"]
    assert isinstance(worker["pid"], int) and isinstance(worker["rss_mb"], float)
    assert isinstance(worker["batches"], int) and worker["state"] == "ready"
    (model,) = report["models"]
    assert model["live_workers"] == 1 and isinstance(model["waiting"], int)
    # Issue 15's figures beside issue 12's and 13's: the last minute, the Redis settings.
    assert isinstance(json.loads(worker["window"]), dict)
    assert {"requests_per_s", "mean_batch", "queue_wait_p99_s", "oldest_waiting_s"} <= set(model)
    assert report["redis"]["maxmemory_policy"] == "noeviction"

    supervisor.drain()
    conn = redis.Redis.from_url(url)
    wait_until(lambda: not liveness.read(conn, "gone").live, timeout=30, what="a stale pool")
    conn.close()
    stale = r"no live worker has served 'gone' since \d\d:\d\d:\d\d \(\d+ s ago\)"
    x = np.zeros((1, 8), np.float32)
    with Client(url) as client, pytest.raises(RequestTimeout) as error:
        client.predict("gone", x, timeout=0.5)
    assert re.search(f"within 0.5s: {stale}; 1 request waiting$", str(error.value))

    async def predict_async() -> None:
        async with AsyncClient(url) as client:
            await client.predict("gone", x, timeout=0.5)

    with pytest.raises(RequestTimeout) as error:
        asyncio.run(predict_async())
    assert re.search(f"{stale}; 2 requests waiting$", str(error.value))

    np.save(tmp_path / "x.npy", x)
    predict = _tfpool("predict", "--model", "gone", "--input", str(tmp_path / "x.npy"),
                      "--timeout", "0.5", "--redis-url", url)  # fmt: skip
    assert predict.returncode == 5
    assert re.fullmatch(
        f"tfpool predict: RequestTimeout: no result for request \\S+ within 0.5s: {stale};"
        " 3 requests waiting",
        _one_line(predict.stderr),
    )

    status = _tfpool("status", "--redis-url", url)
    assert status.returncode == 1
    assert _one_line(status.stderr) == "tfpool status: no live worker for 'gone'"
    header, row = status.stdout.splitlines()[-2:]
    assert header.split()[:4] == ["MODEL", "LIVE", "LAST", "SEEN"]
    assert re.match(r"gone\s+0\s+\d\d:\d\d:\d\d \(\d+ s ago\)\s+3\s", row), row
    assert all(column in header for column in ("REQ/S", "WAIT p50/p99 ms", "OLDEST s", "DRAIN s"))
    assert re.search(r"\s0\.0\s+-\s+-\s+\d+\.\d\s+inf\s", row), row  # no rate: no drain time
    stopped = json.loads(_tfpool("status", "--json", "--redis-url", url).stdout)
    (model,) = stopped["models"]
    assert model["waiting"] == 3 and model["oldest_waiting_s"] > 0
    assert model["estimated_drain_s"] is None  # a backlog and nobody answering: no estimate

    # Scoring into a dead pool says so at once, then waits (a pool may come): Ctrl-C ends it.
    run = subprocess.Popen(
        [*TFPOOL, "score", "--model", "gone", str(tmp_path / "x.npy"), str(tmp_path / "y.npy"),
         "--redis-url", url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    warning = cast(IO[str], run.stderr).readline()
    assert re.search(f"WARNING queueing.score: {stale}; 3 requests waiting: scoring waits", warning)
    run.send_signal(signal.SIGINT)
    run.communicate(timeout=60)
    assert run.returncode == 130


# --- scoring ---------------------------------------------------------------------------------


def test_scoring_stops_at_once_when_the_first_chunk_fails_whole(
    mlp_pool: str, redis_url: str, tmp_path: Path
) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1000, 8)))  # float64: numpy's default
    done = _tfpool("score", "--model", mlp_pool, str(tmp_path / "x.npy"),
                   str(tmp_path / "y.npy"), "--redis-url", redis_url)  # fmt: skip
    assert done.returncode == 2
    assert _one_line(done.stderr) == (
        "tfpool score: InvalidInput: every row of the first chunk (rows 0-999) failed the same"
        " way, so scoring stopped with nothing written: input 'x': expected float32 [*, 8],"
        " got float64 [1, 8]"
    )
    assert os.listdir(tmp_path) == ["x.npy"]  # no output, no errors file, no progress record

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not decoded by this pool")
    done = _tfpool("score", "--model", mlp_pool, str(photos), str(tmp_path / "classes.npz"),
                   "--redis-url", redis_url)  # fmt: skip
    assert done.returncode == 2
    assert "got bytes [1]; this pool does not decode images: serve it with preprocess" in (
        _one_line(done.stderr)
    )
    assert sorted(os.listdir(tmp_path)) == ["photos", "x.npy"]


def test_failed_rows_exit_1_unless_allowed(
    start_pool: PoolFactory, model_dir: Path, redis_url: str, tmp_path: Path
) -> None:
    start_pool(build_poison_model(model_dir), name="first-hour-bad",
               preload=["tests.integration.poison"])  # fmt: skip
    x = np.zeros((100, 4), np.float32)
    x[57, 1] = FAIL
    np.save(tmp_path / "x.npy", x)
    common = ["score", "--model", "first-hour-bad", str(tmp_path / "x.npy"),
              "--redis-url", redis_url, "--chunk-rows", "10"]  # fmt: skip
    strict = _tfpool(*common, str(tmp_path / "strict.npy"))
    assert strict.returncode == 1
    assert "; 1 failed rows, see" in strict.stdout
    # (Above it, on stderr: the progress lines of a run that is not on a terminal.)
    assert strict.stderr.splitlines()[-1] == (
        f"tfpool score: 1 of 100 rows failed, more than --allow-failed-rows 0 allows; see"
        f" {tmp_path / 'strict.npy'}.errors.tsv"
    )
    for allowance in ("1", "0.01"):
        allowed = _tfpool(*common, str(tmp_path / f"allowed-{allowance}.npy"),
                          "--allow-failed-rows", allowance)  # fmt: skip
        assert allowed.returncode == 0, allowed.stderr
    assert np.isnan(np.load(tmp_path / "strict.npy")[57]).all()


class _CtrlCAfter(Progress):
    def update(self, rows: int) -> None:
        super().update(rows)
        if self.done >= 1200:
            raise KeyboardInterrupt


def test_a_resumed_run_counts_every_row_and_a_changed_chunk_size_is_one_line(
    mlp_pool: str, mlp_path: str, redis_url: str, tmp_path: Path
) -> None:
    x = np.random.default_rng(8).standard_normal((3000, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    paths = [str(tmp_path / "x.npy"), str(tmp_path / "y.npz")]  # one output, into a .npz
    with Client(redis_url) as client, pytest.raises(KeyboardInterrupt):
        score(client, mlp_pool, *paths, chunk_rows=100, progress=_CtrlCAfter)
    command = ["score", "--model", mlp_pool, *paths, "--redis-url", redis_url]
    changed = _tfpool(*command, "--chunk-rows", "200")
    assert changed.returncode == 2
    assert _one_line(changed.stderr).startswith(
        f"tfpool score: {paths[1]}.progress.json is from a different run (other input, model"
        " or chunk size); delete it"
    )
    resumed = _tfpool(*command, "--chunk-rows", "100")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith(
        "scored 3,000 of 3,000 rows (1,800 in this run, 1,200 before) in"
    )
    assert resumed.stdout.rstrip().endswith("; 0 failed rows")
    want = next(iter(models.keras_outputs(mlp_path, x).items()))
    with np.load(paths[1]) as got:  # .npz as asked, its member named as the model's output
        assert got.files == [want[0]]
        np.testing.assert_allclose(got[want[0]], want[1], rtol=1e-5, atol=1e-6)


def test_predict_writes_the_format_its_output_names(
    mlp_pool: str, mlp_path: str, redis_url: str, tmp_path: Path
) -> None:
    x = np.ones((2, 8), np.float32)
    np.save(tmp_path / "x.npy", x)
    done = _tfpool("predict", "--model", mlp_pool, "--input", str(tmp_path / "x.npy"),
                   "--output", str(tmp_path / "y.npz"), "--redis-url", redis_url)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["x.npy", "y.npz"]
    name, want = next(iter(models.keras_outputs(mlp_path, x).items()))
    with np.load(tmp_path / "y.npz") as got:
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)

    (tmp_path / "cat.jpg").write_bytes(b"\xff\xd8\xff\xe0 a JPEG")
    jpeg = _tfpool("predict", "--model", mlp_pool, "--input", str(tmp_path / "cat.jpg"),
                   "--redis-url", redis_url)  # fmt: skip
    assert jpeg.returncode == 2
    assert _one_line(jpeg.stderr).endswith(
        "got bytes []; this pool does not decode images: serve it with preprocess ="
        ' "image" (--preprocess image) to send JPEG/PNG files, or send arrays'
    )


@pytest.mark.parametrize("content", [b"", b"x,y\n1,2\n"], ids=["empty", "text"])
def test_an_input_that_is_not_a_numpy_file_is_one_line_for_predict_and_score(
    content: bytes, redis_url: str, tmp_path: Path
) -> None:
    """numpy itself would say "No data left in file" (a traceback) or take the file for a
    pickle ("This file contains pickled (object) data"): neither says what is wrong."""
    bad = tmp_path / "rows.npy"
    bad.write_bytes(content)
    for args in (("predict", "--model", "m", "--input", str(bad)),
                 ("score", "--model", "m", str(bad), str(tmp_path / "out.npy"))):  # fmt: skip
        done = _tfpool(*args, "--redis-url", redis_url)
        assert done.returncode == 2, done.stderr
        assert _one_line(done.stderr) == (
            f"tfpool {args[0]}: {bad}: not a numpy file (.npy or .npz, as np.save / np.savez"
            " write them), nor an image (.jpg, .jpeg, .png, .gif, .bmp) or a folder of them"
        )
    assert sorted(os.listdir(tmp_path)) == ["rows.npy"]


# --- serve -----------------------------------------------------------------------------------


def test_serve_waits_for_redis_without_starting_workers(mlp_path: str) -> None:
    port = free_port(outside_ephemeral=True)
    url = f"redis://127.0.0.1:{port}/0"
    serve = start_serve("--model", mlp_path, "--name", "late", "--redis-url", url,
                        "--workers", "1", "--heartbeat-s", "0.5")  # fmt: skip
    try:
        err = cast(IO[str], serve.stderr)
        tries = [err.readline(), err.readline()]
        for line in tries:
            assert re.search(
                f"WARNING workers.supervisor: cannot reach Redis at {re.escape(url)} \\(Error 111"
                r" .*\); trying again in \d+s, no worker started$",
                line.rstrip(),
            ), line
        assert psutil.Process(serve.pid).children() == []
        with RedisServer(port=port):
            wait_until(lambda: heartbeats(url, "late"), timeout=120, what="a ready worker")
            line = cast(IO[str], serve.stdout).readline()
            assert line.startswith(f"tfpool: serving model 'late' from {mlp_path} on {url}")
            serve.send_signal(signal.SIGTERM)
            assert serve.wait(timeout=60) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
        serve.communicate(timeout=30)


def test_a_killed_serve_takes_its_private_redis_with_it(mlp_path: str) -> None:
    serve = start_serve("--model", mlp_path, "--name", "killed", "--workers", "1",
                        "--heartbeat-s", "0.5")  # fmt: skip
    try:
        match = URL_LINE.search(cast(IO[str], serve.stdout).readline())
        assert match is not None
        url = match.group(1)
        (beat,) = wait_until(lambda: heartbeats(url, "killed"), timeout=120, what="a worker")
        worker = psutil.Process(int(beat["pid"]))
        serve.kill()  # SIGKILL: no handler, no cleanup of its own
        serve.wait(timeout=30)
        wait_until(lambda: not redis_is_up(url), timeout=30, what="the private Redis to stop")
        wait_until(lambda: not _running(worker), timeout=60, what="the orphaned worker to exit")
    finally:
        if serve.poll() is None:
            serve.kill()
        serve.communicate(timeout=30)


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- status, demo ----------------------------------------------------------------------------


def test_status_into_a_closed_pipe_is_quiet(redis_url: str) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # `tfpool status | head`, once head has had enough
    try:
        done = subprocess.run([*TFPOOL, "status", "--redis-url", redis_url], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
    finally:
        os.close(write_end)
    assert done.returncode == 141
    assert done.stderr == ""


def test_demo_on_a_users_redis_is_quiet_and_leaves_nothing_behind() -> None:
    with RedisServer() as server:
        done = _tfpool("demo", "--redis-url", server.url, "--requests", "100", timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.startswith("tfpool demo: no GPU found: 1 CPU worker; starting...\n")
        assert "100 correct" in done.stdout
        for noise in ("cuInit", "I0000", "E0000", "absl::InitializeLog", "oneDNN"):
            assert noise not in done.stderr, done.stderr
        conn = redis.Redis.from_url(server.url)
        # All but the epoch marker, which every tfpool process on this Redis shares.
        assert conn.keys("*") == [b"tfpool:epoch"]
        conn.close()
