"""How the worker shows itself in Redis: it registers its model (whose info tells producers
the model is served), keeps its clock in step with Redis's, and, on its heartbeat thread,
publishes its state and renews its claim on the entries it holds.

The heartbeat is not only for show: without the renewal, another worker would take over
the requests of a long batch while it runs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import cast

import psutil
import redis
from redis.typing import EncodableT, FieldT

from queueing import connection, keys, liveness
from workers.claims import ShardClaims
from workers.config import PoolConfig
from workers.messages import WorkerStats
from workers.metrics import Recorder, Snapshot, Window
from workers.shared import HeldEntries, StreamClock

log = logging.getLogger(__name__)


class Presence:
    """Registration, clock sync and the heartbeat thread (:meth:`run`) of one worker."""

    def __init__(
        self,
        config: PoolConfig,
        conn: redis.Redis,
        *,
        worker_id: str,
        slot: int,
        device: str | None,
        settings: Mapping[FieldT, EncodableT],
        model_info: Mapping[FieldT, EncodableT],
        stats: WorkerStats,
        held: HeldEntries,
        claims: ShardClaims,
        clock: StreamClock,
        stopping: threading.Event,
        stop: Callable[[], None],
        metrics: Recorder,
        details: Callable[[], Mapping[FieldT, EncodableT]] | None = None,
    ) -> None:
        self.config = config
        self.redis = conn
        self.worker_id = worker_id
        self.slot = slot
        self.device = device
        self.settings = dict(settings)  # what the worker set TensorFlow's thread pools to
        self.model_info = dict(model_info)
        self.shard_names = keys.shard_names(config.name, config.shards)
        self.stats = stats
        self.held = held
        self.claims = claims
        self.clock = clock
        self.stopping = stopping
        self.stop = stop  # when the supervisor is gone
        self.metrics = metrics
        self._window = Window()
        self.details = details  # more heartbeat fields (the versions served)
        self._parent_pid = os.getppid()
        self._started = time.time()
        self._process = psutil.Process()

    def register(self) -> None:
        """Create the streams (one per shard of the model's queue) and their group if
        needed; publish the model's info, whose presence tells producers that the model is
        served here, in the model's hash and (for the enqueue script's cap) each shard's."""
        for name in self.shard_names:
            try:
                self.redis.xgroup_create(keys.stream(name), keys.GROUP, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        self._retire_old_shards()
        self._write_info()
        self.redis.sadd(keys.MODELS, self.config.name)

    def _retire_old_shards(self) -> None:
        """If the model's queue was split otherwise before (another ``shards``), the old
        shards' registrations go, so that producers stop queueing there (they learn the
        new count within ``queueing.enqueue.SHARDS_REFRESH_S``; meanwhile a request to a
        retired shard fails with UnknownModel, not waits unread). Requests already in
        them are not read by this pool: said in the log (the README says to drain first)."""
        field = self.redis.hget(keys.model_info(self.config.name), keys.FIELD_SHARDS)
        if not field or int(cast(bytes, field)) == len(self.shard_names):
            return
        old = keys.shard_names(self.config.name, int(cast(bytes, field)))
        for name in set(old) - set(self.shard_names):
            self.redis.delete(keys.model_info(name))
            left = self.redis.xlen(keys.stream(name))
            if left:
                log.warning("model %s: %d requests wait in %s, a shard of the queue's old"
                            " layout (shards = %d), which this pool does not read",
                            self.config.name, left, keys.stream(name), len(old))  # fmt: skip

    def update_info(self, info: Mapping[FieldT, EncodableT]) -> None:
        """New model info (the versions served changed): kept for re-registering, and
        written now (a failure is logged; the heartbeat registers again if it is gone)."""
        self.model_info = dict(info)
        try:
            self._write_info()
        except redis.RedisError as e:
            log.warning("updating the model's info: %s", e)

    def _write_info(self) -> None:
        # Shard 0's hash is the model's own; on a cluster the others live in other slots.
        info = {**self.model_info, keys.FIELD_SHARDS: len(self.shard_names)}
        for name in self.shard_names:
            key = keys.model_info(name)
            # The specs of versions not served (retired, or left by a pool before this
            # one) go. Every worker of the model writes this hash, each what it serves, and
            # the last write stands, as for "versions": a worker still loading a version
            # takes its spec out until it has loaded it too and writes again. (Not atomic:
            # a write of another worker between these commands may lose a version's spec
            # until the next write; the gateway then uses the default version's.)
            stale = [field for field in map(_text, self.redis.hkeys(key))
                     if keys.is_version_field(field) and field not in info]  # fmt: skip
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(key, mapping=info)
            if stale:
                pipe.hdel(key, *stale)
            pipe.execute()

    def register_quietly(self) -> None:
        """:meth:`register`, logging a failure (then pausing, as the caller will retry)."""
        try:
            self.register()
        except redis.RedisError as e:
            log.warning("registering: %s", e)
            self.stopping.wait(0.5)

    def sync_clock(self) -> None:
        """Learn the offset of Redis's clock, the clock of stream entry ids, from ours."""
        before = time.monotonic()
        seconds, micros = self.redis.time()
        after = time.monotonic()
        self.clock.set_redis_time(seconds + micros / 1e6, before, after)

    def run(self) -> None:
        """The heartbeat thread: heartbeat, renew the claims on what we hold, keep the clock
        offset fresh, and stop if the supervisor is gone (an orphan worker would serve on
        unsupervised)."""
        interval = min(self.config.heartbeat_s, self.config.claim_idle_ms / 3000 or 1.0)
        self._process.cpu_percent(None)  # starts the CPU measurement
        while not self.stopping.wait(interval):
            if os.getppid() != self._parent_pid:
                log.error("supervisor (pid %d) is gone; draining", self._parent_pid)
                self.stop()
                return
            try:
                self.claims.renew(self.redis, self.held.snapshot())
                self.heartbeat("ready")
                self.sync_clock()
                if not self.redis.exists(keys.model_info(self.config.name)):
                    log.warning("the model's registration is gone from Redis; registering again")
                    self.register()
            except connection.REDIS_ERRORS as e:
                log.warning("heartbeat: %s", e)
            except Exception:  # a bug here must not end the thread: the worker would
                # serve on while it looks dead, and its claims would lapse
                log.exception("heartbeat failed; trying again")

    def heartbeat(self, state: str) -> None:
        """Publish our state and counts, with a TTL of three heartbeats."""
        key = keys.worker_heartbeat(self.worker_id)
        stats = self.stats
        fields: dict[FieldT, EncodableT] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slot": self.slot,
            "device": self.device or "cpu",
            "model": self.config.name,
            "state": "draining" if self.stopping.is_set() and state == "ready" else state,
            "batches": stats.batches,
            "requests": stats.requests,
            "rows": stats.rows,
            "errors": stats.errors,
            "model_s": round(stats.model_s, 3),
            "rss_mb": round(self._process.memory_info().rss / 2**20, 1),
            "cpu_percent": self._process.cpu_percent(None),
            "window": json.dumps(self._window_figures()),
            "started": self._started,
            "updated": time.time(),
            **self.settings,
            **(self.details() if self.details is not None else {}),
        }
        ttl_s = max(1, int(self.config.heartbeat_s * 3 + 0.999))
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, ttl_s)
        if fields["state"] == "ready":  # what a producer that times out is told
            redis_now = time.monotonic() + self.clock.offset
            stamp = liveness.heartbeat_fields(redis_now, ttl_s)
            pipe.hset(keys.last_alive(self.config.name), mapping=stamp)  # type: ignore[arg-type]
        pipe.execute()

    def _window_figures(self) -> dict[str, object]:
        """This slot's last minute (workers.metrics.Window), for ``tfpool status`` and the
        drain estimate; and the GPU memory gauge, on a GPU."""
        if self.device is not None:
            from workers.model import gpu_memory_in_use

            self.metrics.gpu_memory(gpu_memory_in_use())
        return self._window.figures(Snapshot.read(self.metrics.layout, self.metrics.cells))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
