"""A model repository served by a real pool: several models in one worker, versions pinned
by number and label, and new versions rolled out under continuous traffic with no failed
request (README: "Model repository")."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import cast

import keras
import numpy as np
import pytest
import redis

from queueing import Client, UnknownModel, keys
from queueing.client import RequestFuture
from queueing.score import Progress, VersionChanged, score
from tests.integration.helpers import heartbeats
from tests.waiting import wait_until
from workers.repository import READY_MARKER
from workers.supervisor import Supervisor

#: What start_pool (tests/integration/conftest.py) returns.
PoolFactory = Callable[..., Supervisor]

WIDTH = 4


def weights(model: str, version: int) -> tuple[np.ndarray, np.ndarray]:
    """A version's own kernel and bias: every version of every model answers differently."""
    rng = np.random.default_rng(zlib.crc32(f"{model}/{version}".encode()))
    return (
        rng.normal(size=(WIDTH, 3)).astype(np.float32),
        rng.normal(size=3).astype(np.float32),
    )


def expected(model: str, version: int, x: np.ndarray) -> np.ndarray:
    kernel, bias = weights(model, version)
    result: np.ndarray = x @ kernel + bias
    return result


def build_version(folder: Path, model: str, version: int) -> Path:
    """A one-layer Keras model, saved as ``folder/model.keras``."""
    folder.mkdir(parents=True)
    inputs = keras.Input((WIDTH,), name="x")
    dense = keras.layers.Dense(3)
    net = keras.Model(inputs, dense(inputs))
    dense.set_weights(list(weights(model, version)))
    net.save(str(folder / "model.keras"))
    return folder


def drop_version(repo: Path, staging: Path, model: str, version: int) -> None:
    """Build a version beside the repository, then move it in whole (one rename)."""
    built = build_version(staging / f"{model}-{version}", model, version)
    os.rename(built, repo / model / str(version))


def versions_line(url: str, model: str) -> str:
    beats = heartbeats(url, model)
    return beats[0].get("versions", "") if beats else ""


def spec_fields(url: str, model: str) -> set[str]:
    """The fields of the model's info hash that hold one version's spec."""
    conn = redis.Redis.from_url(url)
    try:
        fields = [f.decode() for f in cast(list[bytes], conn.hkeys(keys.model_info(model)))]
        return {f for f in fields if keys.is_version_field(f)}
    finally:
        conn.close()


class Traffic:
    """Threads that submit one-row requests without pause, and keep every (submitted at,
    input, future) to check afterwards."""

    def __init__(self, client: Client, model: str, threads: int = 3) -> None:
        self.client = client
        self.model = model
        self.sent: list[tuple[float, np.ndarray, RequestFuture]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self.stop.is_set():
            x = rng.normal(size=(1, WIDTH)).astype(np.float32)
            sent_at = time.monotonic()
            future = self.client.submit(self.model, x)
            with self.lock:
                self.sent.append((sent_at, x, future))
            future.result(timeout=60)  # one request in flight per thread: steady traffic

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def first_answer_from(self, version: int) -> float | None:
        """When a request answered by ``version`` was first seen answered (None: not yet)."""
        with self.lock:
            sent = list(self.sent)
        for _, _, future in sent:
            if future.done() and future.exception() is None and future.model_version == version:
                return time.monotonic()
        return None


def answered_by(traffic: Traffic, version: int) -> Callable[[], float | None]:
    return lambda: traffic.first_answer_from(version)


def test_new_versions_roll_out_under_traffic_without_a_failed_request(
    tmp_path: Path, start_pool: PoolFactory, redis_url: str, client: Client
) -> None:
    repo, staging = tmp_path / "repo", tmp_path / "staging"
    (repo / "m").mkdir(parents=True)
    build_version(repo / "m" / "1", "m", 1)
    start_pool("", model_repo=str(repo), poll_s=0.2, max_latency_ms=2)
    settled: dict[int, float] = {}
    with Traffic(client, "m") as traffic:
        wait_until(lambda: traffic.first_answer_from(1), timeout=60, what="version 1 answers")
        for version in (2, 3, 4):
            drop_version(repo, staging, "m", version)
            settled[version] = wait_until(
                answered_by(traffic, version), timeout=120, what=f"an answer from version {version}"
            )
        sent = list(traffic.sent)
    wait_until(lambda: all(f.done() for _, _, f in sent), timeout=60, what="every answer")
    failed = [f.exception() for _, _, f in sent if f.exception() is not None]
    assert failed == [], failed[:3]
    by_version: dict[int, int] = {}
    for sent_at, x, future in sent:
        made_by = future.model_version
        assert made_by is not None and made_by in (1, 2, 3, 4)
        by_version[made_by] = by_version.get(made_by, 0) + 1
        np.testing.assert_allclose(future.result(), expected("m", made_by, x), rtol=1e-5, atol=1e-5)
        # Once a version's first answer was seen, one worker reads every later request
        # after its switch: no later request is answered by an older version.
        newest_settled = max((v for v, at in settled.items() if at <= sent_at), default=1)
        assert made_by >= newest_settled, (sent_at, made_by, newest_settled)
    assert set(by_version) == {1, 2, 3, 4}, by_version
    # The old versions drained and were unloaded: only the newest is left.
    wait_until(lambda: versions_line(redis_url, "m") == "4 ready", timeout=30, what="unloads")

    # A broken version (a file that is not a model) leaves version 4 serving, and shows.
    broken = staging / "m-5"
    broken.mkdir()
    (broken / "model.keras").write_bytes(b"not a model at all")
    os.rename(broken, repo / "m" / "5")
    wait_until(lambda: "5 failed" in versions_line(redis_url, "m"), timeout=60, what="failure")
    assert versions_line(redis_url, "m").startswith("4 ready")
    x = np.ones((2, WIDTH), np.float32)
    future = client.submit("m", x)
    np.testing.assert_allclose(future.result(timeout=30), expected("m", 4, x), rtol=1e-5)
    assert future.model_version == 4


def test_several_models_in_one_worker_pinned_by_number_and_label(
    tmp_path: Path, start_pool: PoolFactory, redis_url: str, client: Client
) -> None:
    repo = tmp_path / "repo"
    for name, version in (("a", 1), ("a", 2), ("b", 1), ("c", 3)):
        build_version(repo / name / str(version), name, version)
    models = {"a": {"version_policy": "all", "labels": {"stable": 1, "canary": 2}}}
    start_pool("", model_repo=str(repo), models=models, workers=1, poll_s=0.5)

    # Three models, one worker process, answering concurrently.
    rng = np.random.default_rng(0)
    sent: list[tuple[str, int, np.ndarray, RequestFuture]] = []
    for i in range(60):
        name, version = [("a", 1), ("b", 1), ("c", 3)][i % 3]
        x = rng.normal(size=(1 + i % 4, WIDTH)).astype(np.float32)
        sent.append((name, version, x, client.submit(name, x)))
    for name, version, x, future in sent:
        np.testing.assert_allclose(
            future.result(timeout=60), expected(name, version, x), rtol=1e-5, atol=1e-5
        )
        assert future.model_version == version
    assert len({beat["pid"] for m in "abc" for beat in heartbeats(redis_url, m)}) == 1

    # Pinned by number, by label; the default is the "stable" label.
    x = np.ones((1, WIDTH), np.float32)
    for address, version in (("a@2", 2), ("a@canary", 2), ("a@stable", 1), ("a", 1), ("a@1", 1)):
        future = client.submit(address, x)
        np.testing.assert_allclose(future.result(timeout=30), expected("a", version, x), rtol=1e-5)
        assert future.model_version == version, address
    kept = client.submit("a@canary", x, keep=True)
    kept.result(timeout=30)
    assert client.result_version(kept.request_id) == 2  # a kept result keeps its version
    with pytest.raises(UnknownModel, match=r"version '7' is not served; served versions: 1, 2"):
        client.predict("a@7", x, timeout=30)

    # Each served version's inputs and outputs are in the model's info hash.
    assert spec_fields(redis_url, "a") == {
        f"{field}@{version}"
        for field in ("inputs", "outputs", "output_specs")
        for version in (1, 2)
    }

    # Removing a version's folder unloads it once its requests are answered, and takes its
    # fields out of the info hash.
    shutil.rmtree(repo / "a" / "1")
    wait_until(lambda: versions_line(redis_url, "a") == "2 ready", timeout=60, what="unload")
    assert spec_fields(redis_url, "a") == {"inputs@2", "outputs@2", "output_specs@2"}
    with pytest.raises(UnknownModel, match="served versions: 2"):
        client.predict("a@1", x, timeout=30)
    future = client.submit("a", x)  # "stable" names a version gone: the newest serves
    np.testing.assert_allclose(future.result(timeout=30), expected("a", 2, x), rtol=1e-5)
    assert future.model_version == 2


class _StopAfter(Progress):
    """Ctrl-C once ``limit`` rows are done."""

    limit = 0

    def update(self, rows: int) -> None:
        super().update(rows)
        if self.done >= self.limit:
            raise KeyboardInterrupt


def test_scoring_records_the_version_and_will_not_resume_across_a_new_one(
    tmp_path: Path, start_pool: PoolFactory, client: Client
) -> None:
    repo = tmp_path / "repo"
    build_version(repo / "s" / "1", "s", 1)
    start_pool("", model_repo=str(repo), poll_s=0.2)
    x = np.random.default_rng(5).normal(size=(600, WIDTH)).astype(np.float32)
    paths = (str(tmp_path / "x.npy"), str(tmp_path / "y.npy"))
    np.save(paths[0], x)
    _StopAfter.limit = 200
    with pytest.raises(KeyboardInterrupt):
        score(client, "s", *paths, chunk_rows=50, progress=_StopAfter)
    record = json.loads(Path(paths[1] + ".progress.json").read_text())
    assert record["model_versions"] == [1]

    version_2 = build_version(tmp_path / "staging" / "2", "s", 2)
    (version_2 / READY_MARKER).touch()
    os.rename(version_2, repo / "s" / "2")
    probe = np.zeros((1, WIDTH), np.float32)
    wait_until(lambda: _version_of(client, "s", probe) == 2, timeout=60, what="version 2")
    with pytest.raises(VersionChanged, match="version 1 of 's', this one by version 2"):
        score(client, "s", *paths, chunk_rows=50)
    summary = score(client, "s", *paths, chunk_rows=50, allow_version_change=True)
    assert summary.model_versions == (1, 2)
    y = np.load(paths[1])
    done_before = sorted(record["done"])
    for chunk in range(12):
        rows = slice(chunk * 50, chunk * 50 + 50)
        maker = 1 if chunk in done_before else 2
        np.testing.assert_allclose(y[rows], expected("s", maker, x[rows]), rtol=1e-5, atol=1e-5)


def _version_of(client: Client, model: str, x: np.ndarray) -> int | None:
    future = client.submit(model, x)
    future.result(timeout=30)
    return future.model_version
