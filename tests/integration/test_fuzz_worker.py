"""Hostile entries written straight into a live pool's stream, between good requests."""

from __future__ import annotations

from collections import Counter
from typing import Any, cast

import msgpack
import numpy as np
import redis

from queueing import Client, keys, wire
from tests.integration import models
from tests.integration.conftest import PoolFactory
from tests.integration.helpers import heartbeats, read_results
from tests.waiting import wait_until

#: Hostile entries per run; the README quotes it.
ENTRIES = 400
REPLY = "tfpool:reply:fuzz"


def _body(**fields: Any) -> bytes:
    good = {"v": 1, "model": "fuzzed", "deadline_ms": None, "keep_s": 0,
            "inputs": ["float32", [8], np.ones(8, np.float32).tobytes()]}  # fmt: skip
    good.update(fields)
    return msgpack.packb(good, use_bin_type=True)  # type: ignore[no-any-return]


def _hostile(rng: np.random.Generator, i: int) -> tuple[dict[bytes, bytes], str]:
    """An entry and what the pool must make of it: an error kind, "ok" or "dead"."""
    rid = f"fuzz-{i}".encode()
    kind = i % 15
    if kind == 0:
        return {
            b"id": rid,
            b"reply": REPLY.encode(),
            b"body": rng.bytes(int(rng.integers(0, 300))),
        }, "InvalidInput"
    if kind == 1:
        return {b"id": rid, b"reply": REPLY.encode()}, "InvalidInput"  # no body
    if kind == 2:
        return {b"reply": REPLY.encode(), b"body": _body()}, "dead"  # no id
    if kind == 13:  # no reply address: the error is kept under the id instead
        # int64 for a float32 model: not widened (that would lose precision), so refused.
        return {b"id": rid, b"body": _body(keep_s=60, inputs=["int64", [8], b"\0" * 64])}, "kept"
    if kind == 3:
        return {b"id": b"\xff\xfe" + rid, b"reply": REPLY.encode(), b"body": _body()}, "dead"
    bad_bodies = {
        4: _body(inputs=["float32", [2**31, 2**31], b""]),  # huge declared shape
        5: _body(inputs=["float32", [8], b"\0" * 31]),  # bytes do not match the shape
        6: _body(inputs=["object", [1], b"\0" * 8]),  # object dtype
        7: _body(inputs=["V4", [2], b"\0" * 8]),  # void dtype
        8: _body(inputs=["int64", [8], b"\0" * 64]),  # wrong dtype for the model
        9: _body(inputs=["float32", [1, 1, 8], b"\0" * 32]),  # wrong rank
        10: _body(model="other"),  # not this queue's model
        11: _body(v="1", deadline_ms="soon", keep_s=-1),  # wrong types in every field
        12: _body(inputs={"y": ["float32", [8], b"\0" * 32]}),  # unknown input name
    }
    if kind in bad_bodies:
        return {b"id": rid, b"reply": REPLY.encode(), b"body": bad_bodies[kind]}, "InvalidInput"
    nan = np.array([np.nan, np.inf, -np.inf, 1, 2, 3, 4, 5], np.float32)  # valid floats
    return {b"id": rid, b"reply": REPLY.encode(),
            b"body": _body(inputs=["float32", [8], nan.tobytes()])}, "ok"  # fmt: skip


def test_hostile_entries_get_typed_errors_and_the_requests_around_them_are_answered(
    start_pool: PoolFactory, mlp_path: str, redis_url: str, redis_client: redis.Redis
) -> None:
    supervisor = start_pool(mlp_path, name="fuzzed", max_batch_size=16, heartbeat_s=0.25)
    rss_before = float(wait_until(lambda: heartbeats(redis_url, "fuzzed"))[0]["rss_mb"])
    rng = np.random.default_rng(9)
    expected: dict[str, str] = {}
    dead_expected = 0
    kept_expected: list[str] = []
    x = rng.standard_normal((ENTRIES, 8)).astype(np.float32)
    with Client(redis_url) as client:
        futures = []
        for i in range(ENTRIES):
            fields, outcome = _hostile(rng, i)
            redis_client.xadd(keys.stream("fuzzed"), cast(Any, fields))
            if outcome == "dead":
                dead_expected += 1
            elif outcome == "kept":
                kept_expected.append(f"fuzz-{i}")
            else:
                expected[f"fuzz-{i}"] = outcome
            futures.append(client.submit("fuzzed", x[i]))  # a good request after each
        got = np.stack([np.asarray(client.wait(f, timeout=60)) for f in futures])
    want = next(iter(models.keras_outputs(mlp_path, x).values()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    answers: dict[str, str] = {}
    results = read_results(redis_client, REPLY, len(expected))
    assert len(results) == len(expected), f"{len(expected) - len(results)} never answered"
    for result in results:
        assert result.request_id not in answers  # exactly one answer each
        answers[result.request_id] = type(result.error).__name__ if result.error else "ok"
    assert answers == expected
    for request_id in kept_expected:  # no reply list: fetched by id, as any process could
        kept = cast(list[bytes], redis_client.lrange(keys.kept_result(request_id), 0, -1))
        assert len(kept) == 1
        result = wire.decode_result(kept[0])
        assert type(result.error).__name__ == "InvalidInput"
    posted = cast(list[Any], redis_client.xrange(REPLY))
    assert sum(len(fields) for _, fields in posted) == len(expected)  # and nothing else
    dead = cast(list[Any], redis_client.xrange(keys.dead_letters("fuzzed")))
    assert len(dead) == dead_expected
    assert all(fields[b"reason"] == b"unreadable request id" for _, fields in dead)
    # Nothing left behind, nobody died, memory did not run away.
    wait_until(lambda: redis_client.xlen(keys.stream("fuzzed")) == 0, what="stream drained")
    assert not [e for e in supervisor.events if e[0] == "crash"]
    rss_after = float(heartbeats(redis_url, "fuzzed")[0]["rss_mb"])
    print(
        f"\nfuzz: {ENTRIES} hostile entries: {dict(Counter(expected.values()))},"
        f" {dead_expected} dead-lettered, {len(kept_expected)} kept by id;"
        f" worker RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
    )
    assert rss_after < rss_before + 200
