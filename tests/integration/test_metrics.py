"""The supervisor's /metrics, /healthz and /readyz, scraped over HTTP from real pools and
parsed with prometheus_client's own parser."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, cast

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from queueing import Client, DeadLettered, DeadlineExceeded, InvalidInput, ModelError
from tests.integration.conftest import PoolFactory
from tests.integration.helpers import TFPOOL, heartbeats
from tests.integration.poison import FAIL, MARKER, build_poison_model
from tests.waiting import wait_until
from workers.config import PoolConfig
from workers.metrics import OUTCOMES
from workers.placement import Slot
from workers.supervisor import Supervisor

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(port: int, path: str) -> tuple[int, str]:
    """Status and body of GET ``path`` on the endpoint."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(port: int) -> Samples:
    status, text = get(port, "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def scrape_until(
    port: int, condition: Callable[[Samples], bool], *, what: str, timeout: float = 30
) -> Samples:
    """The first scrape that meets ``condition``."""

    def met() -> Samples | None:
        samples = scrape(port)
        return samples if condition(samples) else None

    return wait_until(met, timeout=timeout, what=what)


@pytest.fixture(scope="module")
def poison_path(model_dir: Path) -> str:
    return build_poison_model(model_dir)


def test_exact_counts_after_a_known_mix_and_a_worker_crash(
    start_pool: PoolFactory, poison_path: str, redis_url: str
) -> None:
    # One worker, so that the poison request's crash stops the whole pool for a while;
    # max_deliveries=1: its successor dead-letters it at once.
    supervisor = start_pool(poison_path, name="metered", max_batch_size=4, max_deliveries=1,
                            metrics_port=0, preload=["tests.integration.poison"])  # fmt: skip
    assert supervisor.metrics_server is not None
    port = supervisor.metrics_server.port
    m = {"model": "metered"}

    def answered(samples: Samples) -> float:
        return sum(value(samples, "tfpool_requests_total", outcome=o, **m) for o in OUTCOMES)

    rng = np.random.default_rng(15)
    good_rows = [1, 3, 2, 6, 1, 4, 2, 1, 5, 1]  # 6 and 5 rows: split over batches of 4
    with Client(redis_url) as c:
        futures = [c.submit("metered", rng.standard_normal((n, 4)).astype(np.float32))
                   for n in good_rows]  # fmt: skip
        for f in futures:
            c.wait(f, timeout=60)
        for _ in range(3):  # the model takes rows of 4
            with pytest.raises(InvalidInput):
                c.predict("metered", np.ones((2, 5), np.float32), timeout=60)
        for _ in range(2):
            with pytest.raises(DeadlineExceeded):
                c.predict("metered", np.ones(4, np.float32), deadline=0, timeout=60)
        with pytest.raises(ModelError):
            c.predict("metered", np.full(4, FAIL, np.float32), timeout=60)

        # A worker counts an answer once Redis has stored it: the client may see it first.
        before = scrape_until(port, lambda s: answered(s) == 16, what="16 answers counted")
        assert value(before, "tfpool_requests_total", outcome="ok", **m) == len(good_rows)
        assert value(before, "tfpool_requests_total", outcome="invalid_input", **m) == 3
        assert value(before, "tfpool_requests_total", outcome="deadline_exceeded", **m) == 2
        assert value(before, "tfpool_requests_total", outcome="model_error", **m) == 1
        assert value(before, "tfpool_requests_total", outcome="dead_lettered", **m) == 0
        assert value(before, "tfpool_worker_ready", slot="0", device="cpu", **m) == 1
        assert value(before, "tfpool_worker_restarts_total", slot="0", device="cpu", **m) == 0
        assert value(before, "tfpool_worker_rss_bytes", slot="0", device="cpu", **m) > 2**20

        # The poison request kills its worker; the successor dead-letters it.
        with pytest.raises(DeadLettered):
            c.predict("metered", np.full(4, MARKER, np.float32), timeout=180)
        after = scrape_until(
            port,
            lambda s: (
                value(s, "tfpool_worker_ready", slot="0", device="cpu", **m) == 1
                and answered(s) == 17
            ),
            timeout=180,
            what="the poison request counted, its worker's successor ready",
        )
    assert value(after, "tfpool_requests_total", outcome="dead_lettered", **m) == 1
    assert value(after, "tfpool_worker_restarts_total", slot="0", device="cpu", **m) == 1
    assert value(after, "tfpool_dead_letters", **m) == 1
    # What the crashed process counted is still counted: nothing went backwards.
    for key, was in before.items():
        if key[0].endswith(("_total", "_count", "_sum", "_bucket")):
            assert after[key] >= was, key

    # Histograms agree with the counters: one batch_rows and compute observation per batch,
    # one queue wait per request run (the good ones and the failing one; the invalid and
    # expired never ran, the poison's batch never finished), one latency per answer.
    batches = value(after, "tfpool_batches_total", **m)
    rows = value(after, "tfpool_rows_total", **m)
    assert rows == sum(good_rows) + 1
    assert batches >= 5  # 21 rows in batches of at most 4 rows, and the failing one
    assert value(after, "tfpool_batch_rows_count", **m) == batches
    assert value(after, "tfpool_batch_rows_sum", **m) == rows
    assert value(after, "tfpool_batch_rows_bucket", le="4.0", **m) == batches
    assert value(after, "tfpool_compute_seconds_count", **m) == batches
    assert value(after, "tfpool_queue_wait_seconds_count", **m) == len(good_rows) + 1
    assert value(after, "tfpool_request_seconds_count", **m) == 17
    assert value(after, "tfpool_request_seconds_bucket", le="+Inf", **m) == 17


def test_queue_gauges_follow_a_backlog(
    start_pool: PoolFactory, poison_path: str, redis_url: str
) -> None:
    supervisor = start_pool(poison_path, name="backlog", max_batch_size=4, metrics_port=0,
                            preload=["tests.integration.poison"])  # fmt: skip
    assert supervisor.metrics_server is not None
    port = supervisor.metrics_server.port
    m = {"model": "backlog"}
    x = np.ones(4, np.float32)
    with Client(redis_url) as c:
        c.predict("backlog", x, timeout=60)  # a measured rate for the drain estimate
        (pid,) = supervisor.serving_pids()
        os.kill(pid, signal.SIGSTOP)  # nothing is read while it is stopped
        try:
            futures = c.submit_many("backlog", [x] * 40)
            held = scrape(port)
            # A read the worker had already begun may still be served to it by Redis.
            pending = value(held, "tfpool_queue_pending", **m)
            assert pending <= 4
            assert value(held, "tfpool_queue_waiting", **m) == 40 - pending
            assert value(held, "tfpool_oldest_waiting_seconds", **m) >= 0
            # 40 requests at the last minute's rate (or +Inf once the stopped worker's
            # heartbeat has expired: a backlog nobody drains).
            assert value(held, "tfpool_estimated_drain_seconds", **m) > 0
            older = scrape_until(
                port,
                lambda s: value(s, "tfpool_oldest_waiting_seconds", **m) > 0,
                what="the oldest request to age",
            )
            assert value(older, "tfpool_queue_waiting", **m) == 40 - pending
        finally:
            os.kill(pid, signal.SIGCONT)
        for f in futures:
            c.wait(f, timeout=60)
    drained = scrape_until(
        port, lambda s: value(s, "tfpool_requests_total", outcome="ok", **m) == 41, what="41 ok"
    )
    assert value(drained, "tfpool_queue_waiting", **m) == 0
    assert value(drained, "tfpool_queue_pending", **m) == 0
    assert value(drained, "tfpool_oldest_waiting_seconds", **m) == 0
    assert value(drained, "tfpool_estimated_drain_seconds", **m) == 0

    # The README documents every metric served, and the dashboard queries only those.
    served = {f.name for f in text_string_to_metric_families(get(port, "/metrics")[1])}
    root = Path(__file__).parents[2]
    documented = set(re.findall(r"^\| `(tfpool_\w+)", (root / "README.md").read_text(), re.M))
    assert {_family(name) for name in documented} == served
    dashboard = (root / "configs" / "grafana-dashboard.json").read_text()
    queried = {_family(name) for name in re.findall(r"tfpool_\w+", dashboard)}
    assert queried and queried <= served


def _family(sample_name: str) -> str:
    """A family's name from one of its samples' (what the text parser names families)."""
    return re.sub(r"_(total|bucket|count|sum)$", "", sample_name)


def test_a_repository_pool_counts_and_queues_each_model_under_its_own_name(
    tmp_path: Path, start_pool: PoolFactory, mlp_path: str, redis_url: str
) -> None:
    # Two models in every worker process, two processes; one batches up to 4 rows, the
    # other up to 16: each model's histogram has its own bounds.
    repo = tmp_path / "shelf"
    for name in ("shelf-a", "shelf-b"):
        (repo / name / "1").mkdir(parents=True)
        shutil.copy(mlp_path, repo / name / "1")
    models = {"shelf-a": {"max_batch_size": 4}, "shelf-b": {"max_batch_size": 16}}
    supervisor = start_pool("", model_repo=str(repo), models=models, workers=2,
                            metrics_port=0)  # fmt: skip
    assert supervisor.metrics_server is not None
    port = supervisor.metrics_server.port
    a, b = {"model": "shelf-a"}, {"model": "shelf-b"}

    def answered(samples: Samples, m: dict[str, str]) -> float:
        return sum(value(samples, "tfpool_requests_total", outcome=o, **m) for o in OUTCOMES)

    # One request at a time: each runs in a batch of its own, so batches are known.
    rows = {"shelf-a": [1, 3, 2, 4, 1], "shelf-b": [2, 7, 16, 1]}
    rng = np.random.default_rng(3)
    with Client(redis_url) as c:
        for name, sizes in rows.items():
            for n in sizes:
                c.predict(name, rng.standard_normal((n, 8)).astype(np.float32), timeout=60)
        for _ in range(3):  # the models take rows of 8
            with pytest.raises(InvalidInput):
                c.predict("shelf-b", np.ones((2, 5), np.float32), timeout=60)
        counted = scrape_until(
            port, lambda s: answered(s, a) == 5 and answered(s, b) == 7, what="12 answers counted"
        )
        assert value(counted, "tfpool_requests_total", outcome="ok", **a) == 5
        assert value(counted, "tfpool_requests_total", outcome="invalid_input", **a) == 0
        assert value(counted, "tfpool_requests_total", outcome="ok", **b) == 4
        assert value(counted, "tfpool_requests_total", outcome="invalid_input", **b) == 3
        assert {dict(labels)["model"] for name, labels in counted
                if name == "tfpool_requests_total"} == {"shelf-a", "shelf-b"}  # fmt: skip
        for m, sizes in ((a, rows["shelf-a"]), (b, rows["shelf-b"])):
            assert value(counted, "tfpool_rows_total", **m) == sum(sizes)
            assert value(counted, "tfpool_batches_total", **m) == len(sizes)
            assert value(counted, "tfpool_batch_rows_count", **m) == len(sizes)
            assert value(counted, "tfpool_batch_rows_sum", **m) == sum(sizes)
            assert value(counted, "tfpool_compute_seconds_count", **m) == len(sizes)
            assert value(counted, "tfpool_queue_wait_seconds_count", **m) == len(sizes)
            assert value(counted, "tfpool_request_seconds_count", **m) == answered(counted, m)
        assert value(counted, "tfpool_batch_rows_bucket", le="4.0", **a) == 5
        assert ("tfpool_batch_rows_bucket", frozenset({**a, "le": "16.0"}.items())) not in counted
        assert value(counted, "tfpool_batch_rows_bucket", le="8.0", **b) == 3
        assert value(counted, "tfpool_batch_rows_bucket", le="16.0", **b) == 4
        # The worker gauges are per process, which serves both models: the pool's name.
        for slot in ("0", "1"):
            assert value(counted, "tfpool_worker_ready", model="shelf", slot=slot,
                         device="cpu") == 1  # fmt: skip

        # Each model's heartbeats carry its own last minute (what `tfpool status` shows).
        def window_counts(model: str) -> tuple[float, float]:
            windows = [json.loads(beat["window"]) for beat in heartbeats(redis_url, model)]
            return (sum(w["requests"]["ok"] for w in windows),
                    sum(w["requests"]["invalid_input"] for w in windows))  # fmt: skip

        wait_until(
            lambda: window_counts("shelf-a") == (5, 0) and window_counts("shelf-b") == (4, 3),
            what="each model's heartbeats to show its own answers",
        )

        # A backlog of one model shows in its queue gauges, none in the other's.
        pids = supervisor.serving_pids()
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)  # nothing is read or answered while they are
        try:
            x = np.ones((1, 8), np.float32)
            futures = c.submit_many("shelf-b", [x] * 10)
            held = scrape(port)
            # Reads the workers had already begun may still be served to them by Redis.
            queued = value(held, "tfpool_queue_waiting", **b)
            assert queued + value(held, "tfpool_queue_pending", **b) == 10
            assert value(held, "tfpool_estimated_drain_seconds", **b) > 0
            assert value(held, "tfpool_queue_waiting", **a) == 0
            assert value(held, "tfpool_queue_pending", **a) == 0
            assert value(held, "tfpool_estimated_drain_seconds", **a) == 0
            assert value(held, "tfpool_dead_letters", **a) == 0
            assert ("tfpool_queue_waiting", frozenset({"model": "shelf"}.items())) not in held
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        for f in futures:
            c.wait(f, timeout=60)
    drained = scrape_until(
        port, lambda s: value(s, "tfpool_requests_total", outcome="ok", **b) == 14, what="14 ok"
    )
    assert value(drained, "tfpool_queue_waiting", **b) == 0
    assert value(drained, "tfpool_requests_total", outcome="ok", **a) == 5


def test_readyz_follows_warm_up_and_drain_while_healthz_stays_up(
    mlp_path: str, redis_url: str
) -> None:
    config = PoolConfig(model=mlp_path, name="probed", redis_url=redis_url, workers=1)
    supervisor = Supervisor(config, slots=[Slot(0, None, 1, 1)])
    port = supervisor.serve_metrics(0)
    try:
        assert get(port, "/readyz")[0] == 503  # no worker yet
        assert get(port, "/healthz") == (200, "ok\n")
        supervisor.start()
        wait_until(lambda: get(port, "/readyz")[0] == 200, timeout=180, what="ready")
        assert get(port, "/healthz")[0] == 200
        # A stopped worker cannot finish its drain: the pool stays in it while we look.
        (pid,) = supervisor.serving_pids()
        os.kill(pid, signal.SIGSTOP)
        draining = threading.Thread(target=supervisor.drain)
        try:
            draining.start()
            wait_until(lambda: get(port, "/readyz")[0] == 503, what="not ready while draining")
            assert get(port, "/healthz")[0] == 200
            assert draining.is_alive()
        finally:
            os.kill(pid, signal.SIGCONT)
        draining.join(timeout=120)
        assert not draining.is_alive()
    finally:
        supervisor.kill()
        supervisor.close_metrics()
    with pytest.raises(urllib.error.URLError):  # the endpoint stops with the pool
        get(port, "/healthz")


def test_serve_with_metrics_port_zero_from_the_environment_logs_the_port_it_took(
    mlp_path: str, redis_url: str
) -> None:
    env = {**os.environ, "TFPOOL_METRICS_PORT": "0"}
    serve = subprocess.Popen(
        [*TFPOOL, "serve", "--model", mlp_path, "--name", "cli-metrics", "--workers", "1",
         "--redis-url", redis_url, "--metrics-host", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        stderr = cast(IO[str], serve.stderr)
        logged = None
        while logged is None:  # logged before any worker starts
            line = stderr.readline()
            assert line, "serve exited before logging its metrics port"
            logged = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
        port = int(logged.group(1))
        assert port > 0
        wait_until(lambda: get(port, "/readyz")[0] == 200, timeout=180, what="ready")
        samples = scrape(port)
        assert value(samples, "tfpool_worker_ready", model="cli-metrics", slot="0",
                     device="cpu") == 1  # fmt: skip
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
        serve.communicate(timeout=30)


def test_serve_on_a_metrics_port_in_use_is_one_line_and_exit_2(
    mlp_path: str, redis_url: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = subprocess.run(
            [*TFPOOL, "serve", "--model", mlp_path, "--name", "port-taken", "--workers", "1",
             "--redis-url", redis_url, "--metrics-host", "127.0.0.1",
             "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert serve.returncode == 2, serve.stderr
    assert f"metrics_port: cannot listen on 127.0.0.1:{port}" in serve.stderr
    assert "Traceback" not in serve.stderr
