"""Which URLs name a Redis Cluster, and what the cluster client is given."""

from __future__ import annotations

import pytest
import redis

from queueing import connection, enqueue
from queueing.errors import Unavailable
from workers.config import PoolConfig
from workers.errors import ConfigError


def test_the_cluster_option_and_the_url_form_say_the_same() -> None:
    assert not connection.is_cluster("redis://a:6379/0")
    assert connection.as_cluster_url("redis://a:6379", True) == "redis+cluster://a:6379"
    assert connection.as_cluster_url("rediss://a:6379", True) == "rediss+cluster://a:6379"
    assert connection.as_cluster_url("redis://a:6379", False) == "redis://a:6379"
    assert connection.as_cluster_url("redis+cluster://a:1", False) == "redis+cluster://a:1"
    with pytest.raises(ValueError, match="unix"):
        connection.as_cluster_url("unix:///tmp/redis.sock", True)
    config = PoolConfig(model="m.keras", redis_url="redis://a:6379", cluster=True)
    assert config.redis_url == "redis+cluster://a:6379"
    assert PoolConfig(model="m.keras", redis_url="redis+cluster://a:6379").cluster
    assert PoolConfig.load(env={"TFPOOL_CLUSTER": "1", "TFPOOL_REDIS_URL": "redis://a:1",
                                "TFPOOL_MODEL": "m.keras"}).cluster  # fmt: skip
    with pytest.raises(ConfigError, match="cluster needs redis_url"):
        PoolConfig(model="m.keras", cluster=True)


def test_a_cluster_url_may_name_several_nodes_to_start_from() -> None:
    first, others = connection._startup("redis+cluster://u:pw@a:7000,b:7001,c/0?x=1")
    assert first == "redis://u:pw@a:7000/0?x=1"  # credentials and options for every node
    assert others == [("b", 7001), ("c", 6379)]
    assert connection.first_node_url("redis://one:6379/0") == "redis://one:6379/0"


def test_a_cluster_on_the_move_is_told_from_a_refusal_for_good() -> None:
    for error in (
        redis.ResponseError("MOVED 3999 127.0.0.1:7001"),
        redis.ResponseError("CLUSTERDOWN The cluster is down"),
        redis.exceptions.TryAgainError("TRYAGAIN"),
        redis.exceptions.SlotNotCoveredError("no node"),
    ):
        assert connection.moving(error), error
    assert not connection.moving(redis.ResponseError("CROSSSLOT Keys in request don't hash"))
    assert not connection.moving(redis.ResponseError("WRONGTYPE Operation against a key"))


def test_a_failover_under_a_blocked_command_is_redis_unavailable_for_now() -> None:
    text = "UNBLOCKED force unblock from blocking operation, instance state changed"
    for error in (
        redis.ResponseError(text),
        redis.ResponseError(f"Command # 2 (WAIT 1 1000) of pipeline caused error: {text}"),
    ):
        assert connection.unblocked(error)
        typed = enqueue.as_request_error(error, "m", "redis://x")
        assert isinstance(typed, Unavailable)
    assert not connection.unblocked(redis.ResponseError("WRONGTYPE Operation against a key"))


def test_a_script_round_is_tried_again_only_where_nothing_ran() -> None:
    tries = enqueue.ScriptTries("return 1")
    assert tries.body is None  # EVALSHA
    tries.after(redis.exceptions.NoScriptError("Command # 1 (EVALSHA ...) of pipeline caused"
                                               " error: No matching script"))  # fmt: skip
    assert tries.body == "return 1"  # then EVAL, once
    tries.after(redis.ResponseError("MOVED 3999 127.0.0.1:6381"))
    tries.after(redis.ResponseError("Command # 1 (EVAL ...) of pipeline caused error: ASK 1 x"))
    with pytest.raises(redis.ResponseError, match="MOVED"):
        tries.after(redis.ResponseError("MOVED 3999 127.0.0.1:6381"))  # the third move
    # A WAIT unblocked by a failover: the script ran; not sent again (Unavailable).
    with pytest.raises(redis.ResponseError, match="UNBLOCKED"):
        enqueue.ScriptTries("x").after(redis.ResponseError("UNBLOCKED force unblock"))
    second = enqueue.ScriptTries("x")
    second.after(redis.exceptions.NoScriptError("No matching script"))
    with pytest.raises(redis.exceptions.NoScriptError):
        second.after(redis.exceptions.NoScriptError("No matching script"))
