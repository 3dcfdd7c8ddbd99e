"""What the model is given, batch by batch, read from a log the model itself writes:
warm-up of every bucket before ready, padding with copies of the last row, a failing batch
re-run request by request, expired requests never run, ``max_rows``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from queueing import Client, DeadlineExceeded, InvalidInput, ModelError
from tests.integration import models
from tests.integration.conftest import PoolFactory
from tests.integration.poison import BATCH_LOG, FAIL, MARKER, SLOW, build_poison_model
from workers.supervisor import Supervisor

MODEL = "batches"
MAX_ROWS = 6


@dataclass
class Pool:
    supervisor: Supervisor
    path: str
    log: Path
    #: The batches the model ran before the pool said it was ready.
    warm_up: list[list[list[float]]]

    def batches(self) -> list[list[list[float]]]:
        """Every batch the model has run so far, padding included, in order."""
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture(scope="module")
def pool(
    start_pool: PoolFactory, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Pool:
    path = build_poison_model(model_dir)
    log = tmp_path_factory.mktemp("batches") / "batches.jsonl"
    log.touch()
    os.environ[BATCH_LOG] = str(log)  # inherited by the worker this spawns, and only it
    try:
        supervisor = start_pool(
            path, name=MODEL, max_batch_size=4, max_latency_ms=20, max_rows=MAX_ROWS,
            preload=["tests.integration.poison"],
        )  # fmt: skip
    finally:
        del os.environ[BATCH_LOG]
    pool = Pool(supervisor, path, log, [])
    pool.warm_up = pool.batches()
    return pool


def _rows(*firsts: float) -> list[np.ndarray]:
    """One distinct row per value: [v, v + 0.125, v + 0.25, v + 0.375]."""
    return [np.array([v, v + 0.125, v + 0.25, v + 0.375], np.float32) for v in firsts]


def _want(pool: Pool, rows: list[np.ndarray]) -> np.ndarray:
    return next(iter(models.keras_outputs(pool.path, np.stack(rows)).values()))


def _busy(client: Client) -> None:
    """Hold the worker in a slow batch, so that what is submitted next waits together."""
    client.submit(MODEL, np.full(4, SLOW, np.float32))


def test_every_bucket_is_warmed_up_before_the_pool_is_ready(pool: Pool) -> None:
    sizes = sorted({len(batch) for batch in pool.warm_up})
    print(f"\nbatch sizes run before ready: {sizes}")
    assert {1, 2, 4} <= set(sizes)  # the buckets of max_batch_size 4


def test_a_batch_is_padded_to_its_bucket_with_copies_of_its_last_row(pool: Pool) -> None:
    rows = _rows(1.0, 2.0, 3.0)
    with Client(pool.supervisor.config.redis_url) as client:  # one request of 3 rows
        got = client.predict(MODEL, np.stack(rows), timeout=60)
    np.testing.assert_allclose(np.asarray(got), _want(pool, rows), rtol=1e-5, atol=1e-6)
    sent = [r.tolist() for r in rows]
    batch = next(b for b in pool.batches() if b[:3] == sent)  # the three, run together
    assert len(batch) == 4 and batch[3] == sent[2]  # padded to 4 with the last row


def test_a_failing_batch_is_rerun_request_by_request_and_only_the_culprit_fails(
    pool: Pool,
) -> None:
    good = _rows(11.0, 12.0, 13.0)
    culprit = np.full(4, FAIL, np.float32)
    with Client(pool.supervisor.config.redis_url) as client:
        _busy(client)
        futures = client.submit_many(MODEL, [good[0], culprit, good[1], good[2]])
        with pytest.raises(ModelError, match="FAIL marker"):
            client.wait(futures[1], timeout=60)
        got = [np.asarray(client.wait(f, timeout=60)) for f in (futures[0], futures[2], futures[3])]
    np.testing.assert_allclose(np.stack(got), _want(pool, good), rtol=1e-5, atol=1e-6)
    batches = pool.batches()
    sent = [r.tolist() for r in (good[0], culprit, good[1], good[2])]
    together = batches.index(sent)  # the batch the model failed on
    alone = batches[together + 1 :]
    for row in sent:  # then each request on its own
        assert [row] in alone, row


def test_a_request_past_its_deadline_is_never_run(pool: Pool) -> None:
    crashes_before = [e for e in pool.supervisor.events if e[0] == "crash"]
    with Client(pool.supervisor.config.redis_url) as client:
        _busy(client)  # 1.5 s: longer than the deadline below
        pill = client.submit(MODEL, np.full(4, MARKER, np.float32), deadline=0.3)
        with pytest.raises(DeadlineExceeded):
            client.wait(pill, timeout=60)
        # Had it run, the marker would have killed the worker (and been logged first).
        np.asarray(client.predict(MODEL, _rows(5.0)[0], timeout=60))
    assert not any(MARKER in row for batch in pool.batches() for row in batch)
    assert [e for e in pool.supervisor.events if e[0] == "crash"] == crashes_before


def test_max_rows_per_request(pool: Pool) -> None:
    rows = _rows(*range(21, 21 + MAX_ROWS))
    with Client(pool.supervisor.config.redis_url) as client:
        with pytest.raises(InvalidInput, match=f"{MAX_ROWS + 1} rows is over the limit"):
            client.predict(MODEL, np.stack([*rows, rows[0]]), timeout=60)
        got = client.predict(MODEL, np.stack(rows), timeout=60)  # at the limit: served
    np.testing.assert_allclose(np.asarray(got), _want(pool, rows), rtol=1e-5, atol=1e-6)
    # Split over batches of at most max_batch_size rows, in order: 4, then 2.
    batches, sent = pool.batches(), [r.tolist() for r in rows]
    assert sent[:4] in batches and sent[4:] in batches
