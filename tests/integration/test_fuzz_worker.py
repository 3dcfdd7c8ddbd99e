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
#: How much the worker's resident memory may grow over the run: allocator noise, not 400
#: entries' worth of leaks (the README quotes the figures this test prints).
RSS_SLACK_MB = 16


def _body(**fields: Any) -> bytes:
    good = {"v": 1, "model": "fuzzed", "deadline_ms": None, "keep_s": 0,
            "inputs": ["float32", [8], np.ones(8, np.float32).tobytes()]}  # fmt: skip
    good.update(fields)
    return msgpack.packb(good, use_bin_type=True)  # type: ignore[no-any-return]


def _hostile(rng: np.random.Generator, i: int) -> tuple[dict[bytes, bytes], str]:
    """A random entry of a random kind, and what the pool must make of it: an error kind,
    "ok", "kept" (an error kept under its id) or "dead"."""
    rid = f"fuzz-{i}".encode()
    kind = int(rng.integers(0, 14))
    if kind == 0:  # garbage
        garbage = rng.bytes(int(rng.integers(0, 300)))
        return {b"id": rid, b"reply": REPLY.encode(), b"body": garbage}, "InvalidInput"
    if kind == 1:  # no body
        return {b"id": rid, b"reply": REPLY.encode()}, "InvalidInput"
    if kind == 2:  # no id
        body = _body() if rng.random() < 0.5 else rng.bytes(int(rng.integers(0, 50)))
        return {b"reply": REPLY.encode(), b"body": body}, "dead"
    if kind == 3:  # an id that is not UTF-8
        bad_id = b"\xff" + rng.bytes(int(rng.integers(0, 12))) + rid
        return {b"id": bad_id, b"reply": REPLY.encode(), b"body": _body()}, "dead"
    if kind == 4:  # no reply address: the error is kept under its id instead
        body = _body(keep_s=int(rng.integers(30, 120)), inputs=["int64", [8], b"\0" * 64])
        return {b"id": rid, b"body": body}, "kept"
    if kind == 5:  # NaN, infinities, denormals, extremes: valid floats, answered
        specials = np.array([np.nan, np.inf, -np.inf, 1e-45, -0.0, 3.4e38, 1.0], np.float32)
        rows = rng.choice(specials, size=(int(rng.integers(1, 5)), 8))
        body = _body(inputs=["float32", list(rows.shape), rows.tobytes()])
        return {b"id": rid, b"reply": REPLY.encode(), b"body": body}, "ok"
    return {b"id": rid, b"reply": REPLY.encode(), b"body": _bad_body(rng, kind)}, "InvalidInput"


def _bad_body(rng: np.random.Generator, kind: int) -> bytes:
    """A well-formed envelope whose contents the pool must refuse (InvalidInput)."""

    def pick(options: list[Any]) -> Any:
        return options[int(rng.integers(0, len(options)))]

    rows = int(rng.integers(1, 5))
    name = "".join(pick(list("abcXYZ_-09é")) for _ in range(int(rng.integers(1, 9))))
    if kind == 6:  # a huge declared shape, some of them empty (0 x huge)
        shape = pick([[2**31, 2**31], [0, 2**40, 2**40], [int(rng.integers(2**27, 2**40)), 8]])
        return _body(inputs=["float32", shape, b""])
    if kind == 7:  # bytes that do not match the shape
        size = pick([0, 1, rows * 32 - 1, rows * 32 + 4])
        return _body(inputs=["float32", [rows, 8], b"\0" * size])
    if kind == 8:  # a dtype off the allow-list
        dtype = pick(["object", "O", "V4", "U4", "S8", "float128", ">f4", name])
        return _body(inputs=[dtype, [2], b"\0" * 8])
    if kind == 9:  # an allowed dtype the model does not take (and cannot widen to)
        dtype = np.dtype(pick(["int32", "int64", "uint64", "float64"]))
        return _body(inputs=[dtype.name, [rows, 8], b"\0" * rows * 8 * dtype.itemsize])
    if kind == 10:  # the wrong rank or width
        shape = pick([[2, 4], [8, 1], [1, 1, 8], [], [rows, 2, 4], [rows, 9]])
        return _body(inputs=["float32", shape, b"\0" * 4 * int(np.prod(shape))])
    if kind == 11:  # not this queue's model
        return _body(model=pick(["other", "", name]))
    if kind == 12:  # wrong types: one field or several
        fields = {"v": pick(["1", 2, None, 0]), "deadline_ms": pick(["soon", -1, 1.5, True]),
                  "keep_s": pick([-1, "x", 1.5])}  # fmt: skip
        chosen = [f for f in fields if rng.random() < 0.5] or ["deadline_ms"]
        return _body(**{f: fields[f] for f in chosen})
    # 13: an input name the model does not have, or bytes / str items where it takes floats
    if rng.random() < 0.5:
        return _body(inputs={pick(["y", "", "X", name + "!"]): ["float32", [8], b"\0" * 32]})
    items = pick([[b"a", b"b", b"c"], ["a", 1, b"c"], ["x", "y", "z"]])
    return _body(inputs=[pick(["bytes", "str"]), [3], items])


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
    # A heartbeat written after the last request was answered: its RSS is current.
    fresh = wait_until(
        lambda: [b for b in heartbeats(redis_url, "fuzzed") if int(b["requests"]) >= ENTRIES],
        what="a heartbeat after the run",
    )
    rss_after = float(fresh[0]["rss_mb"])
    print(
        f"\nfuzz: {ENTRIES} hostile entries (random kinds and contents): answered on the reply"
        f" list {dict(Counter(answers.values()))}, {len(kept_expected)} InvalidInput kept by id,"
        f" {len(dead)} dead-lettered; worker RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
    )
    # What the README promises: memory flat (allocator noise aside), not a leak per entry.
    assert rss_after <= rss_before + RSS_SLACK_MB
