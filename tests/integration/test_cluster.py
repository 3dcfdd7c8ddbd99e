"""tfpool on a real Redis Cluster (3 masters, 3 replicas on free ports): models spread over
the masters, failovers under load that lose nothing, and several hosts (supervisors)
sharing one consumer group, one of them killed whole."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import psutil
import pytest

from queueing import AsyncClient, Client, RequestError, RequestTimeout, connection, keys
from tests.integration import models
from tests.integration.conftest import PoolFactory
from tests.integration.helpers import start_serve, stop_process
from tests.waiting import wait_until
from workers.embedded_cluster import LocalCluster
from workers.status import collect

#: Short, so that a host killed whole is taken over soon (the test waits on it).
CLAIM_IDLE_MS = 3000


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(masters=3, replicas=1, node_timeout_ms=2000) as started:
        yield started


@pytest.fixture(scope="module")
def spread(cluster: LocalCluster, start_pool: PoolFactory, mlp_path: str) -> list[str]:
    """Three models, named so that their queues live on three different masters, each
    served by a pool of one worker."""
    names: dict[int, str] = {}
    for i in range(100):
        name = f"mlp{i}"
        names.setdefault(cluster.master_of(keys.stream(name)).port, name)
        if len(names) == 3:
            break
    for name in names.values():
        start_pool(mlp_path, name=name, url=cluster.url, max_batch_size=16, max_latency_ms=5,
                   claim_idle_ms=CLAIM_IDLE_MS)  # fmt: skip
    return list(names.values())


def _rows(seed: int, rows: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 8)).astype(np.float32)


def test_models_on_three_masters_answer_as_the_model_does(
    cluster: LocalCluster, spread: list[str], mlp_path: str
) -> None:
    assert len({cluster.master_of(keys.stream(n)).port for n in spread}) == 3
    x = _rows(1, rows=5)
    want = next(iter(models.keras_outputs(mlp_path, x).values()))
    # A plain URL and cluster=True, as a user would write it.
    plain = cluster.url.replace("redis+cluster://", "redis://")
    with Client(plain, cluster=True) as client:
        for name in spread:
            got = client.predict(name, x, timeout=60)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
        kept = client.submit(spread[0], x, keep=True)
        client.wait(kept, timeout=60)
    with Client(cluster.url) as other:  # another process would do the same
        np.testing.assert_allclose(np.asarray(other.result(kept.request_id, timeout=30)),
                                   want, rtol=1e-5, atol=1e-6)  # fmt: skip

    async def from_asyncio() -> list[np.ndarray]:
        async with AsyncClient(plain, cluster=True) as client:
            return [await client.predict(name, x, timeout=60) for name in spread]  # type: ignore[misc]

    for got in asyncio.run(from_asyncio()):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)

    conn = connection.connect(cluster.url, socket_timeout=10)
    try:
        status = collect(conn)  # what `tfpool status --cluster` prints
    finally:
        conn.close()
    assert {m.name for m in status.models} >= set(spread)
    assert not set(status.models_without_workers) & set(spread)


@pytest.fixture(scope="module")
def sharded(cluster: LocalCluster, start_pool: PoolFactory, mlp_path: str) -> str:
    """A model whose queue is in three shards, served by a pool of one worker."""
    name = "mlpsharded"
    start_pool(mlp_path, name=name, url=cluster.url, shards=3, max_batch_size=16,
               max_latency_ms=5, claim_idle_ms=CLAIM_IDLE_MS)  # fmt: skip
    return name


def test_a_sharded_queue_spreads_over_the_masters_and_answers_as_the_model_does(
    cluster: LocalCluster, sharded: str, mlp_path: str
) -> None:
    """One model, its queue in three shards: one per master, each with its own keys (one
    slot per Lua script and MULTI/EXEC), every shard carrying requests, all read."""
    name = sharded
    shards = keys.shard_names(name, 3)
    assert len({cluster.master_of(keys.stream(s)).port for s in shards}) == 3
    rows = [_rows(seed) for seed in range(60)]
    want = next(iter(models.keras_outputs(mlp_path, np.concatenate(rows)).values()))
    with Client(cluster.url) as client:
        rounds = [client.submit_many(name, rows[i : i + 10]) for i in range(0, 60, 10)]
        got = [client.wait(f, timeout=60) for futures in rounds for f in futures]
    np.testing.assert_allclose(np.concatenate([np.asarray(g) for g in got]), want,
                               rtol=1e-5, atol=1e-6)  # fmt: skip

    async def from_tasks() -> list[object]:
        async with AsyncClient(cluster.url) as client:
            return list(await asyncio.gather(*(client.predict(name, row) for row in rows)))

    from_async = asyncio.run(from_tasks())
    np.testing.assert_allclose(np.concatenate([np.asarray(g) for g in from_async]), want,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    conn = connection.connect(cluster.url, socket_timeout=10)
    try:
        for shard in shards:  # each carried some (answered entries are deleted)
            info = conn.xinfo_stream(keys.stream(shard))
            assert info["last-generated-id"] not in (b"0-0", "0-0"), shard
        status = collect(conn)
    finally:
        conn.close()
    (model,) = [m for m in status.models if m.name == name]
    assert [q.stream for q in model.shards] == [keys.stream(s) for s in shards]
    assert model.live_workers == 1


@dataclass
class Load:
    """A producer thread sending one-row requests in small batches until stopped, and what
    became of every request."""

    url: str
    model: str
    sent: list[tuple[Future[object], np.ndarray]] = field(default_factory=list)
    refused: int = 0  # submit raised a typed error (Unavailable mid-failover): never queued
    stop: threading.Event = field(default_factory=threading.Event)
    #: Anything else submit raised: a producer would see it, so it fails the test.
    failure: BaseException | None = None

    def run(self, client: Client) -> None:
        seed = 0
        while not self.stop.is_set():
            batch = [_rows(seed + i) for i in range(8)]
            seed += 8
            try:
                futures = client.submit_many(self.model, batch)
            except RequestError:
                self.refused += len(batch)
                continue
            except BaseException as e:
                self.failure = e
                raise
            self.sent += list(zip(futures, batch, strict=True))

    def flowing(self, count: int) -> bool:
        """At least ``count`` answers are in (raises what stopped the producer, if so)."""
        if self.failure is not None:
            raise AssertionError(f"submit raised {self.failure!r}") from self.failure
        return self.answered() >= count

    def answered(self) -> int:
        return sum(1 for f, _ in self.sent if f.done() and f.exception() is None)


def _outcome(
    load: Load, client: Client, mlp_path: str, timeout: float
) -> tuple[int, int, int, int]:
    """(answered right, typed errors, lost, wrong) over every request sent."""
    errors = lost = 0
    got: list[np.ndarray] = []
    asked: list[np.ndarray] = []
    for future, x in load.sent:
        try:
            got.append(np.asarray(client.wait(future, timeout=timeout)))  # type: ignore[arg-type]
        except RequestTimeout:
            lost += 1
            continue
        except RequestError:
            errors += 1
            continue
        asked.append(x)
    if not got:
        return 0, errors + load.refused, lost, 0
    want = next(iter(models.keras_outputs(mlp_path, np.concatenate(asked)).values()))
    close = np.isclose(np.concatenate(got), want, rtol=1e-5, atol=1e-6).all(axis=1)
    return len(got), errors + load.refused, lost, int((~close).sum())


def _under_load(
    cluster: LocalCluster, model: str, mlp_path: str, hit: str, shard: str | None = None
) -> tuple[int, int, int, int]:
    """Run a load on ``model``; once answers flow, fail its queue's master over (``hit``:
    "failover" or "kill"; the master of ``shard``, one of its queue's shards, if given);
    keep the load on until answers flow again; then count."""
    load = Load(cluster.url, model)
    with Client(cluster.url) as client:
        producer = threading.Thread(target=load.run, args=(client,), daemon=True)
        producer.start()
        try:
            wait_until(lambda: load.flowing(50), timeout=120, what="answers before")
            master = cluster.master_of(keys.stream(shard or model))
            if hit == "failover":
                cluster.failover(master)
            else:
                cluster.kill(master)
            after = load.answered()
            wait_until(lambda: load.flowing(after + 100), timeout=120, what="answers after")
        finally:
            load.stop.set()
            producer.join(timeout=30)
        return _outcome(load, client, mlp_path, timeout=120)


def test_two_hosts_share_one_group_and_one_killed_whole_loses_nothing(
    cluster: LocalCluster, start_pool: PoolFactory, mlp_path: str
) -> None:
    name = "shared"
    # Small batches: a worker reads at most two batches ahead, so a burst outruns one host
    # and the other reads the rest (tiny batches of this model would not, at 16 rows).
    start_pool(mlp_path, name=name, url=cluster.url, max_batch_size=2, max_latency_ms=1,
               claim_idle_ms=CLAIM_IDLE_MS)  # fmt: skip
    other = start_serve(
        "--model", mlp_path, "--name", name, "--redis-url", cluster.url, "--workers", "1",
        "--intra-op-threads", "1", "--max-batch-size", "2", "--max-latency-ms", "1",
        "--claim-idle-ms", str(CLAIM_IDLE_MS), new_session=True,
    )  # fmt: skip
    try:
        conn = connection.connect(cluster.url, socket_timeout=10)

        def per_host() -> dict[bool, int]:
            """Requests served by the workers of the other host (True) and of this one."""
            children = {p.pid for p in psutil.Process(other.pid).children(recursive=True)}
            counts = {True: 0, False: 0}
            for w in collect(conn).workers:
                if w.get("model") == name and w.get("state") == "ready":
                    counts[int(w["pid"]) in children] += int(w["requests"])
            return counts

        wait_until(lambda: sum(1 for w in collect(conn).workers
                               if w.get("model") == name and w.get("state") == "ready") == 2,
                   timeout=180, what="both hosts ready")  # fmt: skip
        # Both hosts serve: one consumer group, work goes to whoever reads first.
        with Client(cluster.url) as client:
            futures = [client.submit_many(name, [_rows(i) for i in range(8)]) for _ in range(60)]
            for batch in futures:
                for future in batch:
                    client.wait(future, timeout=60)

        def both_served() -> dict[bool, int] | None:
            counts = per_host()  # heartbeats publish counts every heartbeat_s
            return counts if counts[True] + counts[False] >= 480 else None

        counts = wait_until(both_served, timeout=30, what="the hosts' counts")
        print(f"per host: this one {counts[False]}, the other {counts[True]} requests")
        assert counts[True] > 0 and counts[False] > 0

        # The other host dies whole (supervisor and workers) under load: this one takes its
        # requests over after claim_idle_ms and answers every one, none twice.
        load = Load(cluster.url, name)
        with Client(cluster.url) as client:
            producer = threading.Thread(target=load.run, args=(client,), daemon=True)
            producer.start()
            try:
                wait_until(lambda: load.flowing(100), timeout=60, what="answers")
                os.killpg(other.pid, signal.SIGKILL)
                other.wait(timeout=30)
                after = load.answered()
                wait_until(lambda: load.flowing(after + 100), timeout=60, what="answers")
            finally:
                load.stop.set()
                producer.join(timeout=30)
            # Every request is answered within claim_idle_ms plus a margin of the kill.
            answered, errors, lost, wrong = _outcome(
                load, client, mlp_path, timeout=CLAIM_IDLE_MS / 1000 + 30
            )
            duplicates = client.duplicates_ignored
        print(f"host killed: sent {len(load.sent)}, answered {answered}, errors {errors},"
              f" lost {lost}, wrong {wrong}, repeats dropped {duplicates}")  # fmt: skip
        assert (lost, wrong, errors) == (0, 0, 0)
        assert answered == len(load.sent)
    finally:
        stop_process(other)


def test_a_failover_under_one_shard_of_a_sharded_queue_loses_nothing(
    cluster: LocalCluster, sharded: str, mlp_path: str
) -> None:
    """The master of shard 1 fails over under load: producers and the worker (one reader
    per shard) follow it; the other shards go on meanwhile."""
    shard = keys.shard_names(sharded, 3)[1]
    answered, errors, lost, wrong = _under_load(cluster, sharded, mlp_path, "failover", shard)
    print(f"sharded failover: answered {answered}, typed errors {errors}, lost {lost},"
          f" wrong {wrong}")  # fmt: skip
    assert lost == 0
    assert wrong == 0
    assert answered >= 150


@pytest.mark.parametrize("hit", ["failover", "kill"])  # kill last: it leaves a node down
def test_a_master_failover_under_load_loses_nothing(
    cluster: LocalCluster, spread: list[str], mlp_path: str, hit: str
) -> None:
    model = spread[0]
    answered, errors, lost, wrong = _under_load(cluster, model, mlp_path, hit)
    print(f"{hit}: answered {answered}, typed errors {errors}, lost {lost}, wrong {wrong}")
    assert lost == 0
    assert wrong == 0
    assert answered >= 150
