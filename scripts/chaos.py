"""Chaos run: break things under load and count what the clients saw.

    python scripts/chaos.py                          # SIGKILL workers (5 kills)
    python scripts/chaos.py --redis-restart aof      # restart a Redis with AOF on, 3 times
    python scripts/chaos.py --redis-restart none     # ... without persistence (RequestLost)
    python scripts/chaos.py --redis-oom              # Redis at maxmemory (noeviction), 3 times
    python scripts/chaos.py --drop-connections       # producers behind a proxy that cuts
                                                     # 1 reply in 20 (and stalls a few)
    python scripts/chaos.py --requests 20000 --kills 10 --redis-url redis://...

Producer threads send one-row requests to the demo MLP in small pipelined chunks while the
fault strikes every time another share of the requests is answered. Each request ends as
one of: answered (checked against numpy), a typed error (by type: Unavailable while Redis
is down, RedisOutOfMemory while it is full, RequestLost when it lost its data...), or
*lost*: never resolved, the producer only saw its own timeout. Exits 1 if anything was
lost or wrong, or if a request was failed as lost by a Redis that kept it (AOF).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from queueing import Client, RequestError, RequestFuture, RequestTimeout, connection, keys

try:
    from scripts.flaky_proxy import FlakyProxy
except ModuleNotFoundError:  # `python scripts/chaos.py`: this folder is on sys.path
    from flaky_proxy import FlakyProxy  # type: ignore[import-not-found,no-redef]
from workers.cli import redis_url_or_embedded
from workers.config import PoolConfig
from workers.demo import DemoWeights, build_demo_model
from workers.embedded_cluster import LocalCluster
from workers.embedded_redis import RedisServer, free_port
from workers.placement import Slot
from workers.supervisor import Supervisor

#: How long the proxy of --drop-connections holds a stalled reply: past the clients'
#: socket timeouts (2 s here), so that they give up on the connection and retry.
STALL_S = 4.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", help="Redis URL, for worker kills only (default: private)")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--kills", type=int, default=5, help="worker SIGKILLs (default mode)")
    parser.add_argument(
        "--redis-restart",
        choices=["aof", "none"],
        help="restart Redis under load, with AOF on or without persistence",
    )
    parser.add_argument(
        "--redis-oom", action="store_true", help="put Redis at maxmemory (noeviction) under load"
    )
    parser.add_argument(
        "--drop-connections",
        action="store_true",
        help="producers behind a proxy that drops and stalls replies",
    )
    parser.add_argument(
        "--cluster-failover",
        choices=["manual", "kill"],
        help="a private Redis Cluster (3 masters, 3 replicas); under load, fail the master of"
        " the queue over (CLUSTER FAILOVER on its replica) or SIGKILL it",
    )
    parser.add_argument("--faults", type=int, default=3, help="restarts / OOM spells / failovers")
    parser.add_argument("--fault-s", type=float, default=3.0, help="how long each lasts")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--producers", type=int, default=4)
    args = parser.parse_args()  # fmt: skip
    mode = (
        f"redis-restart-{args.redis_restart}" if args.redis_restart
        else f"cluster-{args.cluster_failover}" if args.cluster_failover
        else "redis-oom" if args.redis_oom
        else "drop-connections" if args.drop_connections
        else "kills"
    )  # fmt: skip
    if mode != "kills" and args.redis_url:
        parser.error("Redis faults need the private redis-server (no --redis-url)")

    weights = DemoWeights.random()
    x = np.random.default_rng(0).standard_normal((args.requests, 16)).astype(np.float32)
    want = weights.forward(x)
    with tempfile.TemporaryDirectory() as tmp, _redis(args, mode) as (server, cluster, url):
        config = PoolConfig(model=build_demo_model(tmp, weights), name="chaos", redis_url=url,
                            max_batch_size=16, claim_idle_ms=1000, log_level="ERROR")  # fmt: skip
        supervisor = Supervisor(config, slots=[Slot(i, None, 1, 1) for i in range(args.workers)])
        supervisor.start()
        if not supervisor.wait_ready():
            print("workers did not start", file=sys.stderr)
            return 1
        until = threading.Event()
        monitor = threading.Thread(target=supervisor.monitor, args=(until,), daemon=True)
        monitor.start()
        proxy = FlakyProxy(server.port, drop=0.05, stall=0.002, stall_s=STALL_S) if (
            mode == "drop-connections" and server is not None
        ) else None  # fmt: skip
        run = Run(x, want)
        try:
            started = time.perf_counter()
            fault = _fault(mode, server, cluster, supervisor, args)
            faults = run.go(proxy.url if proxy else url, fault, args)
            elapsed = time.perf_counter() - started
        finally:
            if proxy is not None:
                proxy.close()
            until.set()
            monitor.join()
            supervisor.drain()
        conn = connection.connect(url)
        dead: int = conn.xlen(keys.dead_letters("chaos"))
        conn.close()

    typed = sum(run.typed.values())
    print(f"mode                   {mode}")
    print(f"requests sent          {args.requests}")
    print(f"answered               {run.answered} ({run.correct} correct)")
    print(f"typed errors           {typed} {dict(sorted(run.typed.items()))}")
    print(f"lost (never resolved)  {run.lost}")
    print(f"duplicates suppressed  {run.duplicates}")
    print(f"dead-lettered          {dead}")
    if proxy is not None:
        faults = (f"{proxy.stats.dropped} replies cut with their connection, "
                  f"{proxy.stats.stalled} stalled {STALL_S:g}s, of {proxy.stats.connections} "
                  "connections")  # fmt: skip
    print(f"faults                 {faults}")
    print(f"elapsed                {elapsed:.1f}s")
    accounted = run.answered + typed + run.lost == args.requests
    false_lost = mode == "redis-restart-aof" and run.typed["RequestLost"] > 0
    ok = accounted and run.lost == 0 and run.correct == run.answered and not false_lost
    if mode == "kills":
        ok = ok and typed == 0
    return 0 if ok else 1


@contextlib.contextmanager
def _redis(
    args: argparse.Namespace, mode: str
) -> Iterator[tuple[RedisServer | None, LocalCluster | None, str]]:
    if mode == "kills":
        with redis_url_or_embedded(args.redis_url) as url:
            yield None, None, url
        return
    if mode.startswith("cluster-"):
        with LocalCluster(masters=3, replicas=1) as cluster:
            yield None, cluster, cluster.url
        return
    # A fixed port below the ephemeral range, for a server that restarts on it.
    server = RedisServer(port=free_port(outside_ephemeral=True),
                         appendonly=args.redis_restart == "aof")  # fmt: skip
    with server:
        yield server, None, server.url


def _fault(
    mode: str,
    server: RedisServer | None,
    cluster: LocalCluster | None,
    supervisor: Supervisor,
    args: argparse.Namespace,
) -> Callable[[int], str]:
    """What to do at the k-th fault; returns a word for the summary."""
    killed: list[int] = []

    def kill(k: int) -> str:
        pids = supervisor.serving_pids()
        while len(pids) < len(supervisor.handles) or set(pids) & set(killed):
            time.sleep(0.05)  # wait for the last victim's successor to be serving
            pids = supervisor.serving_pids()
        killed.append(pids[k % len(pids)])
        os.kill(killed[-1], signal.SIGKILL)
        return "worker SIGKILLs"

    def restart(k: int) -> str:
        assert server is not None
        server.stop(keep_data=True)
        time.sleep(args.fault_s)  # the outage
        server.start(timeout=60)
        return f"Redis restarts ({args.redis_restart}), {args.fault_s:g}s down"

    def oom(k: int) -> str:
        assert server is not None
        conn = connection.connect(server.url)
        try:
            conn.config_set("maxmemory", 1)  # every write that may grow memory is refused
            time.sleep(args.fault_s)
            conn.config_set("maxmemory", 0)
        finally:
            conn.close()
        return f"OOM spells (maxmemory, noeviction) of {args.fault_s:g}s"

    def failover(k: int) -> str:
        assert cluster is not None
        master = cluster.master_of(keys.stream("chaos"))
        if mode == "cluster-kill":
            # The queue's master first; after that its slot's new master has no replica
            # left, so each later kill takes another master that still has one.
            if k > 1:
                master = next(m for m in cluster.masters_with_replicas() if m is not master)
            cluster.kill(master)
            return "masters SIGKILLed (a replica promoted)"
        cluster.failover(master)
        return "CLUSTER FAILOVERs of the queue's master"

    if mode.startswith("cluster-"):
        return failover
    return {"kills": kill, "redis-oom": oom}.get(mode, restart)


class Run:
    """Producers and their tally. The counters are written by the producer threads under
    ``lock``; the driver only reads them."""

    def __init__(self, x: np.ndarray, want: np.ndarray) -> None:
        self.x = x
        self.want = want
        self.lock = threading.Lock()
        self.answered = 0
        self.correct = 0
        self.lost = 0
        self.duplicates = 0
        self.typed: Counter[str] = Counter()

    def go(self, url: str, fault: Callable[[int], str], args: argparse.Namespace) -> str:
        """Run the producers to the end, striking ``args.faults`` (or kills) times."""
        if args.drop_connections:
            count = 0  # the proxy is the fault, all along
        elif args.cluster_failover == "kill":
            count = min(args.faults, 2)  # a third kill would leave a slot with no copy
        elif args.redis_restart or args.redis_oom or args.cluster_failover:
            count = args.faults
        else:
            count = args.kills
        what = "none"
        with ThreadPoolExecutor(args.producers) as pool:
            running = [
                pool.submit(self.produce, url, i, args.producers) for i in range(args.producers)
            ]
            for k in range(1, count + 1):
                threshold = k * len(self.x) // (count + 1)
                while self.answered < threshold and not all(r.done() for r in running):
                    time.sleep(0.01)
                what = f"{k} {fault(k)}"
            for r in running:
                r.result()
        return what

    def produce(self, url: str, index: int, producers: int) -> None:
        with Client(url, socket_timeout_s=2) as client:
            for start in range(index * 20, len(self.x), 20 * producers):
                rows = range(start, min(start + 20, len(self.x)))
                try:
                    futures = client.submit_many("chaos", [self.x[i] for i in rows])
                except RequestError as e:  # nothing queued: Unavailable, RedisOutOfMemory
                    with self.lock:
                        self.typed[type(e).__name__] += len(rows)
                    time.sleep(0.05)
                    continue
                for i, future in zip(rows, futures, strict=True):
                    self._settle(i, client, future)
            with self.lock:
                self.duplicates += client.duplicates_ignored

    def _settle(self, i: int, client: Client, future: RequestFuture) -> None:
        try:
            out = np.asarray(client.wait(future, timeout=120))
        except RequestTimeout:
            with self.lock:
                self.lost += 1
            return
        except RequestError as e:
            with self.lock:
                self.typed[type(e).__name__] += 1
            return
        with self.lock:
            self.answered += 1
            self.correct += bool(np.allclose(out, self.want[i], atol=1e-4))


if __name__ == "__main__":
    sys.exit(main())
