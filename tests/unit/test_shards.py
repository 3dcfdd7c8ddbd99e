"""The pure parts of sharded queues: shard names and slots, where a round's requests go,
and how a worker names and acks entries of several streams."""

from __future__ import annotations

import numpy as np
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from queueing import keys
from queueing.enqueue import Placement, ShardTable
from workers import shards
from workers.messages import Answer, AnswerMaker, InHand, WorkerStats
from workers.writer import encode, round_commands


def _part(name: str, count: int) -> int:
    return key_slot(keys.stream(name).encode()) * count // REDIS_CLUSTER_HASH_SLOTS


def test_one_shard_is_the_models_own_keys() -> None:
    assert keys.shard_names("resnet", 1) == ("resnet",)
    assert keys.shard_names("resnet@4", 3)[0] == "resnet"


def test_shards_fall_in_distinct_equal_parts_of_the_slots() -> None:
    for model in ("mlp", "resnet", "a", "detector-v2"):
        for count in (2, 3, 4, 6):
            names = keys.shard_names(model, count)
            assert len(set(names)) == count
            assert sorted(_part(n, count) for n in names) == list(range(count)), (model, count)
            # Every key of one shard shares its slot (one Lua script, one MULTI/EXEC).
            for name in names:
                of_shard = (keys.stream(name), keys.model_info(name),
                            keys.dead_letters(name), keys.attempts(name))  # fmt: skip
                assert len({key_slot(k.encode()) for k in of_shard}) == 1


def test_rounds_take_the_shards_in_turn_and_the_refused_try_the_next() -> None:
    table = ShardTable(clock=lambda: 0.0)
    names = table.learn("m", b"3")
    orders = [table.order(names) for _ in range(3)]
    assert {order[0] for order in orders} == set(names)
    assert all(sorted(order) == sorted(names) for order in orders)
    assert table.cached("m@canary") == names
    assert ShardTable().learn("m", None) == ("m",)  # no pool wrote a count: one shard

    placement = Placement(["a", "b", "c"], 5)
    assert placement.step() == ("a", [0, 1, 2, 3, 4])
    placement.placed([b"1-0", 0, b"1-1", 0, 0])  # "a" had room for two
    assert placement.step() == ("b", [1, 3, 4])
    placement.placed([0, 0, 0])  # "b" is full
    assert placement.step() == ("c", [1, 3, 4])
    placement.placed([b"2-0", 0, b"2-1"])
    assert placement.step() is None  # no shard left: request 3 is QueueFull
    assert placement.entries == [b"1-0", b"2-0", b"1-1", 0, b"2-1"]


def test_a_workers_entry_ids_name_their_shard() -> None:
    entries = [(b"5-0", {b"id": b"x"})]
    assert shards.qualify(entries, 0) == entries
    ((qualified, _),) = shards.qualify(entries, 2)
    assert shards.split(qualified) == (2, b"5-0")
    assert shards.split(b"5-0") == (0, b"5-0")
    assert shards.by_shard([b"5-0", b"5-0#2", b"6-0#2"]) == {0: [b"5-0"], 2: [b"5-0", b"6-0"]}


def test_acks_go_to_each_shards_stream_in_its_slot() -> None:
    make = AnswerMaker(WorkerStats())

    def answered(entry_id: bytes, request_id: str) -> Answer:
        request = InHand(entry_id=entry_id, request_id=request_id, reply="r", keep_s=0,
                         arrays={}, rows=1, unbatched=False, group=(), arrival=0.0,
                         deadline=None)  # fmt: skip
        return make.result(request, np.zeros(1, np.float32))

    answers = [answered(b"5-0", "a"), answered(b"5-0#2", "b"), answered(b"7-0#1", "c")]
    _, acks = round_commands(answers, [encode(a) for a in answers], model="m",
                             result_ttl_s=9, shard_count=3)  # fmt: skip
    names = keys.shard_names("m", 3)
    xacks = [c for c in acks if c[0] == "XACK"]
    assert xacks == [("XACK", keys.stream(names[0]), keys.GROUP, b"5-0"),
                     ("XACK", keys.stream(names[1]), keys.GROUP, b"7-0"),
                     ("XACK", keys.stream(names[2]), keys.GROUP, b"5-0")]  # fmt: skip
