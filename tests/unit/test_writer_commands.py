"""What the writer sends for a round of answers, and which refusals it retries."""

from __future__ import annotations

import numpy as np
import redis

from queueing import keys
from workers.messages import Answer
from workers.writer import encode, passing, redis_commands


def test_a_round_posts_every_answer_before_any_ack() -> None:
    answers = [
        Answer(b"1-0", "a", "tfpool:reply:p", 0, outputs=np.ones(2, np.float32)),
        Answer(b"1-1", "b", "tfpool:reply:p", 60, outputs=np.zeros(2, np.float32)),
        Answer(b"1-2", "c", "tfpool:reply:q", 0, outputs=np.ones(1, np.float32), suspect=True),
    ]
    commands = redis_commands(answers, [encode(a) for a in answers], model="m", result_ttl_s=9)
    names = [c[0] for c in commands]
    assert names[-2:] == ["XACK", "XDEL"]
    assert commands[-2][3:] == (b"1-0", b"1-1", b"1-2")
    replies = [c for c in commands if c[0] == "XADD"]
    # One entry per reply stream and round, a field per result.
    assert [(c[1], c[3::2]) for c in replies] == [
        ("tfpool:reply:p", (b"0", b"1")),
        ("tfpool:reply:q", (b"0",)),
    ]
    assert replies[0][4] == encode(answers[0])
    assert [c[1] for c in commands if c[0] == "EXPIRE" and c[2] == 9] == [
        "tfpool:reply:p",
        "tfpool:reply:q",
    ]
    assert ("RPUSH", keys.kept_result("b")) == commands[names.index("RPUSH")][:2]
    assert names.index("HDEL") < names.index("XACK")


def test_refusals_for_now_are_retried_and_others_are_not() -> None:
    for error in (
        redis.ConnectionError("down"),
        redis.exceptions.BusyLoadingError("loading"),
        redis.TimeoutError("slow"),
        redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"),
        redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
        redis.ResponseError("MISCONF Redis is configured to save RDB snapshots, but..."),
        redis.exceptions.ExecAbortError("Transaction discarded because of previous errors."),
        # A failover turned our master into a replica under a blocked WAIT (pipelined).
        redis.ResponseError(
            "Command # 2 (WAIT 1 1000) of pipeline caused error: UNBLOCKED force unblock"
            " from blocking operation, instance state changed (master -> replica?)"
        ),
    ):
        assert passing(error), error
    assert not passing(redis.ResponseError("WRONGTYPE Operation against a key"))
