"""Connecting to Redis: one server, or a Redis Cluster.

The URL says which. ``redis+cluster://host:port`` (or ``rediss+cluster://``) names any node
of a Redis Cluster, and every tfpool process that gets it uses redis-py's cluster client,
which learns the topology from that node and follows it (MOVED, failovers). Any other URL is
one Redis, reached with the plain client exactly as before: the cluster client costs
nothing unless asked for. ``cluster=True`` (the option ``cluster``, ``--cluster``,
``TFPOOL_CLUSTER``) turns a plain URL into the cluster form, so that the mode travels with
the URL to every process and thread of a pool.

What a cluster changes for tfpool, and where that is handled:

* every Lua script and MULTI/EXEC must touch keys of one hash slot: a model's keys share the
  tag ``{model}``, a reply stream its producer's, a kept result its request's
  (:mod:`queueing.keys`); the worker posts replies and acks in two steps
  (:mod:`workers.writer`);
* replication is asynchronous: a master that dies may take with it writes it had answered
  OK. A write tfpool cannot afford to lose (a queued request, a posted answer before its
  ack) is followed by ``WAIT`` for a replica (:func:`durable_pipeline`), on the same
  connection, as WAIT only counts that connection's writes.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.cluster

#: URL schemes that name a Redis Cluster, and the plain scheme each stands for.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

#: How long a durable write waits for a replica to confirm it. Normally a millisecond or
#: two; the timeout only runs out when the replica is gone, and the topology is then read
#: again (a master left without replicas waits for none).
WAIT_REPLICA_MS = 1000

#: What a call to Redis may raise: redis-py's errors, and the cluster client's own
#: (a slot no node covers, mid-failover), which do not derive from them.
REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)

#: Error replies that mean "the cluster is moving; ask again shortly" when they reach us
#: through a plain connection to one node (the cluster client handles them itself).
_MOVING = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN")

#: Options of the plain client the cluster client does not take.
_PLAIN_ONLY = ("single_connection_client", "db")


def is_cluster(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def as_cluster_url(url: str, cluster: bool | None = None) -> str:
    """``url`` in the cluster form when ``cluster`` says so (None: when ``TFPOOL_CLUSTER``
    says so); unchanged otherwise, or when it already is."""
    if cluster is None:
        cluster = os.environ.get("TFPOOL_CLUSTER", "").strip().lower() in ("1", "true", "yes", "on")
    if not cluster or is_cluster(url):
        return url
    scheme, sep, rest = url.partition("://")
    if scheme.lower() not in ("redis", "rediss") or not sep:
        raise ValueError(f"a Redis Cluster is reached with redis:// or rediss://, not {url!r}")
    return f"{scheme.lower()}+cluster://{rest}"


def plain_url(url: str) -> str:
    """``url`` with its scheme as redis-py takes it (``redis+cluster`` -> ``redis``)."""
    scheme, sep, rest = url.partition("://")
    return f"{CLUSTER_SCHEMES.get(scheme.lower(), scheme)}{sep}{rest}"


def connect(url: str, **options: Any) -> redis.Redis:
    """A client for ``url``: redis-py's plain client, or its cluster client for a cluster
    URL (typed as the plain one: it has the same command methods, and callers should not
    care which they hold). A cluster URL may name several nodes,
    ``redis+cluster://a:6379,b:6379``: the client starts from whichever answers, so a
    process (re)started while one of them is down still joins."""
    if not is_cluster(url):
        return redis.Redis.from_url(url, **options)
    first, others = _startup(url)
    nodes = [redis.cluster.ClusterNode(host, port) for host, port in others]  # type: ignore[no-untyped-call]
    client = redis.cluster.RedisCluster.from_url(first, startup_nodes=nodes, **_cluster(options))
    return cast(redis.Redis, client)


def connect_async(url: str, **options: Any) -> aioredis.Redis:
    """:func:`connect` for asyncio."""
    if not is_cluster(url):
        return aioredis.Redis.from_url(url, **options)
    first, others = _startup(url)
    nodes = [aiocluster.ClusterNode(host, port) for host, port in others]
    client = aiocluster.RedisCluster.from_url(first, startup_nodes=nodes, **_cluster(options))
    return cast(aioredis.Redis, client)


def first_node_url(url: str) -> str:
    """The plain URL of the first node a cluster URL names (the URL itself otherwise)."""
    return _startup(url)[0]


def _startup(url: str) -> tuple[str, list[tuple[str, int]]]:
    """A cluster URL's first node, as a plain URL with its options, and the other nodes it
    names (``host:port``, comma-separated)."""
    parts = urlsplit(plain_url(url))
    auth, at, hosts = parts.netloc.rpartition("@")
    first, *others = hosts.split(",")
    nodes = []
    for other in others:
        host, _, port = other.rpartition(":")
        nodes.append((host or other, int(port) if port.isdigit() else 6379))
    return urlunsplit(parts._replace(netloc=f"{auth}{at}{first}")), nodes


def clustered(conn: Any) -> bool:
    """Whether ``conn`` (from :func:`connect` or :func:`connect_async`) is a cluster client."""
    return isinstance(conn, (redis.cluster.RedisCluster, aiocluster.RedisCluster))


def _cluster(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in _PLAIN_ONLY}


def moving(error: BaseException) -> bool:
    """Whether ``error`` says a cluster slot moved or has no master for now (a failover
    under way): to try again after :func:`refresh`, never a failure for good."""
    if isinstance(error, (redis.exceptions.ClusterError, redis.exceptions.AskError,
                          redis.exceptions.TryAgainError,
                          redis.exceptions.RedisClusterException)):  # fmt: skip
        return True
    return isinstance(error, redis.ResponseError) and reply_text(error).startswith(_MOVING)


def reply_text(error: BaseException) -> str:
    """The error reply Redis sent, without what redis-py puts in front of a pipelined
    command's ("Command # 2 (WAIT 1 1000) of pipeline caused error: ")."""
    text = str(error)
    _, marker, reply = text.partition("of pipeline caused error: ")
    return reply if marker else text


def unblocked(error: BaseException) -> bool:
    """Whether ``error`` is what a blocked command (``XREADGROUP BLOCK``, ``WAIT``) gets
    when its master turns replica in a failover ("UNBLOCKED force unblock from blocking
    operation, instance state changed"). Unlike a MOVED, the commands before it in a
    pipeline may have run: not to be sent again blindly, but Redis unavailable for now."""
    return isinstance(error, redis.ResponseError) and reply_text(error).startswith("UNBLOCKED")


def node_name(conn: redis.Redis, key: str) -> str:
    """The name (``host:port``) of the node that serves ``key``; ``""`` on one Redis."""
    if not clustered(conn):
        return ""
    cluster: Any = conn  # redis-py leaves the cluster client's node lookups untyped
    return str(cluster.get_node_from_key(key).name)


# --- writes that must survive a failover -------------------------------------------------


def durable_pipeline(conn: redis.Redis, key: str, *, transaction: bool = False) -> Any:
    """A pipeline on the one connection that serves ``key``, and how many replicas a WAIT
    at its end should ask for: ``(pipeline, replicas)``. On one Redis, ``conn``'s own
    pipeline and 0 (no WAIT: nothing changes). On a cluster, a pipeline straight to the
    master of ``key``'s slot (a MOVED there raises, see :func:`refresh`), and 1 when that
    master has a replica."""
    if not clustered(conn):
        return conn.pipeline(transaction=transaction), 0
    cluster: Any = conn  # redis-py leaves the cluster client's node lookups untyped
    node = cluster.get_node_from_key(key)
    if node.redis_connection is None:  # not yet connected: the cluster client makes it
        cluster.get_redis_connection(node)
    slot = cluster.keyslot(key)
    holders = cluster.nodes_manager.slots_cache.get(slot, [])
    plain = cast(redis.Redis, node.redis_connection)
    return plain.pipeline(transaction=transaction), min(1, len(holders) - 1)


class NodeClients:
    """Plain asyncio clients to single nodes of a cluster, by node, for durable writes:
    the asyncio cluster client does not lend out one connection for a write and its WAIT."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.url = plain_url(url)
        self.options = _cluster(options)
        self._clients: dict[str, aioredis.Redis] = {}

    def pipeline(self, conn: Any, key: str) -> tuple[Any, int]:
        """As :func:`durable_pipeline`, for ``conn`` from :func:`connect_async`."""
        if not clustered(conn):
            return conn.pipeline(transaction=False), 0
        node = conn.get_node_from_key(key)
        holders = conn.nodes_manager.slots_cache.get(conn.keyslot(key), [])
        client = self._clients.get(node.name)
        if client is None:
            parts = urlsplit(first_node_url(self.url))
            auth = parts.netloc.rpartition("@")[0]
            netloc = f"{auth}@{node.host}:{node.port}" if auth else f"{node.host}:{node.port}"
            client = aioredis.Redis.from_url(
                urlunsplit(parts._replace(netloc=netloc)), **self.options
            )
            self._clients[node.name] = client
        return client.pipeline(transaction=False), min(1, len(holders) - 1)

    async def aclose(self) -> None:
        """Close every client."""
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


def refresh(conn: Any) -> None:
    """Read the cluster's topology again (after a MOVED, a dead node, a replica that did not
    answer a WAIT). Nothing on one Redis."""
    if isinstance(conn, redis.cluster.RedisCluster):
        # (Should it fail, the next try reads it again.)
        with contextlib.suppress(*REDIS_ERRORS):
            conn.nodes_manager.initialize()


async def refresh_async(conn: Any) -> None:
    """:func:`refresh` for asyncio."""
    if isinstance(conn, aiocluster.RedisCluster):
        with contextlib.suppress(*REDIS_ERRORS):
            await conn.nodes_manager.initialize()


class NotDurable(redis.ConnectionError):
    """A write Redis took but no replica confirmed within :data:`WAIT_REPLICA_MS`: a
    failover now could lose it. A ConnectionError, so that callers treat it as Redis being
    unavailable for now."""


def check_wait(replies: list[Any], replicas: int) -> None:
    """Raise :class:`NotDurable` when the WAIT that ended a durable pipeline (its last
    reply) counted fewer than ``replicas`` replicas."""
    if replicas and int(replies[-1]) < replicas:
        raise NotDurable(f"no replica confirmed the write within {WAIT_REPLICA_MS} ms")
