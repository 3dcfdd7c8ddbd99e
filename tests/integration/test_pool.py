"""The pool end to end: real Redis, real supervisor and worker processes, real models."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import msgpack
import numpy as np
import pytest
import redis

from queueing import (
    Client,
    DeadlineExceeded,
    InvalidInput,
    RequestTimeout,
    UnknownModel,
    keys,
)
from tests.integration import models
from tests.integration.conftest import PoolFactory
from tests.integration.helpers import read_results
from tests.waiting import wait_until

RNG = np.random.default_rng(0)


def _twin_inputs(rows: int | None) -> dict[str, np.ndarray]:
    shape_a, shape_b = ((4,), (3,)) if rows is None else ((rows, 4), (rows, 3))
    return {
        "a": RNG.standard_normal(shape_a).astype(np.float32),
        "b": RNG.standard_normal(shape_b).astype(np.float32),
    }


@pytest.fixture(scope="module")
def twin(start_pool: PoolFactory, twin_paths: tuple[str, str]) -> str:
    start_pool(twin_paths[0], name="twin", max_batch_size=8, max_latency_ms=20)
    return twin_paths[0]


@pytest.fixture(scope="module")
def ragged(start_pool: PoolFactory, saved_model_path: str) -> str:
    start_pool(saved_model_path, name="ragged", max_batch_size=8, max_latency_ms=10)
    return "ragged"


def test_keras_one_row_many_rows_and_no_batch_axis_match_the_model(
    twin: str, client: Client
) -> None:
    for rows in (1, 5, 13):  # 13 > max_batch_size: split over batches
        inputs = _twin_inputs(rows)
        got = client.predict("twin", inputs, timeout=60)
        want = models.keras_outputs(twin, inputs)
        assert isinstance(got, dict)
        assert sorted(got) == ["y", "z"]
        np.testing.assert_allclose(got["y"], want["y"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["z"], want["z"], rtol=1e-5, atol=1e-6)
        assert got["y"].shape == (rows, 2)

    single = _twin_inputs(None)
    got = client.predict("twin", single, timeout=60)
    want = models.keras_outputs(twin, {k: v[np.newaxis] for k, v in single.items()})
    assert isinstance(got, dict)
    assert got["y"].shape == (2,)
    np.testing.assert_allclose(got["y"], want["y"][0], rtol=1e-5, atol=1e-6)


def test_concurrent_mixed_shapes_from_many_threads(ragged: str, redis_url: str) -> None:
    """Requests of different widths and row counts, from 6 threads at once: each gets its
    own rows of every output, computed as the model computes them."""

    def producer(seed: int) -> int:
        rng = np.random.default_rng(seed)
        checked = 0
        with Client(redis_url) as c:
            cases = []
            for i in range(25):
                rows = int(rng.integers(1, 12))
                width = int(rng.integers(1, 4))
                a = rng.standard_normal((rows, width)).astype(np.float32)
                b = rng.standard_normal((rows, 3)).astype(np.float32)
                if i % 5 == 0:  # one row, no batch axis
                    a, b = a[0], b[0]
                cases.append((a, b, c.submit("ragged", {"a": a, "b": b})))
            for a, b, future in cases:
                got = c.wait(future, timeout=60)
                assert isinstance(got, dict)
                want = models.ragged_outputs(a, b)
                np.testing.assert_allclose(got["total"], want["total"], rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(got["scaled"], want["scaled"], rtol=1e-6)
                checked += 1
        return checked

    with ThreadPoolExecutor(6) as pool:
        assert sum(pool.map(producer, range(6))) == 150


def test_malformed_request_in_a_batch_fails_alone(
    ragged: str, client: Client, redis_client: redis.Redis
) -> None:
    good: list[dict[str, np.ndarray]] = [
        {"a": np.ones((2, 2), np.float32), "b": np.full((2, 3), i, np.float32)} for i in range(4)
    ]
    wrong_dtype: dict[str, np.ndarray] = {
        "a": np.ones((2, 2), np.int64),
        "b": np.ones((2, 3), np.float32),
    }
    futures = client.submit_many("ragged", [good[0], good[1], wrong_dtype, good[2], good[3]])

    # Garbage straight into the stream, between good requests, answered on our own list.
    reply = "tfpool:reply:test-garbage"
    redis_client.xadd(
        keys.stream("ragged"), {"id": "garbage-1", "reply": reply, "body": b"\xc1 not msgpack"}
    )
    more = client.submit_many("ragged", good)

    for i, future in enumerate([*futures[:2], *futures[3:]]):
        out = client.wait(future, timeout=60)
        assert isinstance(out, dict)
        np.testing.assert_allclose(out["scaled"], 2.0 * good[i]["b"])
    with pytest.raises(InvalidInput, match=r"input 'a': expected float32 \[\*, \*\], got int64"):
        client.wait(futures[2], timeout=60)
    for f in more:
        client.wait(f, timeout=60)

    (result,) = read_results(redis_client, reply, 1)
    assert result.request_id == "garbage-1"
    assert isinstance(result.error, InvalidInput)
    assert "not valid msgpack" in str(result.error)


def test_validation_messages_say_what_is_wrong(twin: str, client: Client) -> None:
    with pytest.raises(
        InvalidInput, match=r"input 'b': expected float32 \[\*, 3\], got float32 \[2, 5\]"
    ):
        client.predict("twin", {"a": np.ones((2, 4), np.float32), "b": np.ones((2, 5), np.float32)})
    with pytest.raises(InvalidInput, match="missing \\['b'\\]"):
        client.predict("twin", {"a": np.ones((2, 4), np.float32)})
    with pytest.raises(InvalidInput, match="send a dict"):
        client.predict("twin", np.ones((2, 4), np.float32))
    with pytest.raises(InvalidInput, match="disagree on the number of rows"):
        client.predict("twin", {"a": np.ones((2, 4), np.float32), "b": np.ones((3, 3), np.float32)})


def test_unreadable_entry_goes_to_dead_letters(ragged: str, redis_client: redis.Redis) -> None:
    before = redis_client.xlen(keys.dead_letters("ragged"))
    redis_client.xadd(keys.stream("ragged"), {"junk": "no id here"})
    wait_until(lambda: redis_client.xlen(keys.dead_letters("ragged")) > before, what="dead letter")
    entries = cast(Any, redis_client.xrange(keys.dead_letters("ragged")))
    assert entries[-1][1][b"reason"] == b"unreadable request id"
    assert entries[-1][1][b"junk"] == b"no id here"


def test_deadline_passed_before_inference_is_never_run(twin: str, client: Client) -> None:
    with pytest.raises(DeadlineExceeded, match="deadline passed"):
        client.predict("twin", _twin_inputs(2), deadline=0, timeout=60)
    # A generous deadline runs normally.
    out = client.predict("twin", _twin_inputs(2), deadline=30, timeout=60)
    assert isinstance(out, dict)


def test_kept_result_fetched_by_id_from_a_second_client(twin: str, redis_url: str) -> None:
    inputs = _twin_inputs(3)
    with Client(redis_url) as first:
        future = first.submit("twin", inputs, keep=True)
        request_id = future.request_id
        first.wait(future, timeout=60)
    with Client(redis_url) as second:
        got = second.result(request_id, timeout=30)
        again = second.result(request_id, timeout=30)  # any number of times
    assert isinstance(got, dict) and isinstance(again, dict)
    want = models.keras_outputs(twin, inputs)
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["y"], again["y"])


def test_result_of_unknown_id_times_out(redis_url: str) -> None:
    with Client(redis_url) as c, pytest.raises(RequestTimeout):
        c.result("no-such-request", timeout=0.3)


def test_unknown_model_is_an_error_at_once(twin: str, client: Client) -> None:
    with pytest.raises(UnknownModel, match="twni"):
        client.predict("twni", _twin_inputs(1))
    assert client.pending == 0


def test_submit_many_pipelines_and_keeps_order(twin: str, client: Client) -> None:
    batch = [_twin_inputs(1) for _ in range(200)]
    futures = client.submit_many("twin", batch)
    outs = [client.wait(f, timeout=60) for f in futures]
    stacked = {k: np.concatenate([b[k] for b in batch]) for k in ("a", "b")}
    want = models.keras_outputs(twin, stacked)
    got_y = np.concatenate([cast(dict[str, np.ndarray], o)["y"] for o in outs])
    np.testing.assert_allclose(got_y, want["y"], rtol=1e-5, atol=1e-6)


def test_h5_and_saved_model_signature(
    start_pool: PoolFactory, twin_paths: tuple[str, str], saved_model_path: str, client: Client
) -> None:
    start_pool(twin_paths[1], name="twin-h5")
    start_pool(saved_model_path, name="ragged-other", signature="other")
    inputs = _twin_inputs(4)
    got = client.predict("twin-h5", inputs, timeout=60)
    want = models.keras_outputs(twin_paths[0], inputs)
    assert isinstance(got, dict)
    np.testing.assert_allclose(got["z"], want["z"], rtol=1e-5, atol=1e-6)
    a, b = np.ones((2, 5), np.float32), np.ones((2, 3), np.float32)
    out = client.predict("ragged-other", {"a": a, "b": b}, timeout=60)
    assert isinstance(out, dict)
    np.testing.assert_allclose(out["total"], [[8.0], [8.0]])


def test_raw_msgpack_body_with_wrong_field_types(ragged: str, redis_client: redis.Redis) -> None:
    reply = "tfpool:reply:test-types"
    body = msgpack.packb({"v": 1, "model": "ragged", "inputs": {"a": ["float32", [1, 1], "str"]}})
    redis_client.xadd(keys.stream("ragged"), {"id": "types-1", "reply": reply, "body": body})
    (result,) = read_results(redis_client, reply, 1)
    assert isinstance(result.error, InvalidInput)
    assert "data must be bytes" in str(result.error)


def test_one_client_shared_by_many_threads(twin: str, client: Client) -> None:
    """The README's 'one per process; it is thread-safe': 8 threads, one Client, each
    thread's results its own."""
    inputs = [_twin_inputs(3) for _ in range(8 * 25)]

    def run(thread: int) -> list[Any]:
        mine = inputs[thread::8]
        futures = [client.submit("twin", x) for x in mine[:12]]
        futures += client.submit_many("twin", mine[12:])
        return [client.wait(f, timeout=60) for f in futures]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(8)))
    for thread, got in enumerate(results):
        assert len(got) == 25
        # Every result belongs to its own input: the model on the same rows, all at once.
        mine = inputs[thread::8]
        direct = models.keras_outputs(
            twin, {k: np.concatenate([x[k] for x in mine]) for k in ("a", "b")}
        )
        for name, array in direct.items():
            np.testing.assert_allclose(
                np.concatenate([r[name] for r in got]), array, rtol=1e-5, atol=1e-6
            )
    assert client.pending == 0 and client.duplicates_ignored == 0
