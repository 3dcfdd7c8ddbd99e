"""``tfpool status``: every worker of every host, and each model's queue, from Redis alone.

Workers publish a heartbeat hash with a TTL, so a dead worker drops out of the list within
three heartbeats; the queue figures come from the streams themselves. Each heartbeat also
carries what its worker did in the last minute (``workers.metrics.Window``): rates and
quantiles here are computed from those buckets as Prometheus computes them from the
scraped ones, and the supervisor's ``/metrics`` reads its queue gauges through
``model_status``, so that the CLI and the dashboard show the same figures.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis

from queueing import connection, keys
from queueing.liveness import FIELD_LAST_SEEN, ago
from queueing.redis_state import SAFE_POLICY
from workers.metrics import Rates, drain_seconds

#: Heartbeat fields that stay text; the others are numbers (in ``--json`` too). ``window``
#: is the worker's last minute, as JSON (read by :func:`worker_rates`).
TEXT_FIELDS = frozenset(
    {
        "host",
        "device",
        "model",
        "state",
        "cuda_visible_devices",
        "memory_growth",
        "window",
        "versions",
        "labels",
    }
)


@dataclass(frozen=True)
class ShardQueue:
    """One shard of a model's queue (see ``queueing.keys.shard_names``): its stream and
    its figures, as in :class:`ModelStatus`."""

    shard: int
    stream: str
    waiting: int
    pending: int
    dead_letters: int
    consumers: int
    oldest_waiting_s: float = 0.0


@dataclass(frozen=True)
class ModelStatus:
    """One model's queue: ``waiting`` not yet read, ``pending`` read and not yet answered
    (held by a worker, or by a dead one until taken over), ``dead_letters`` set aside;
    ``live_workers`` whose heartbeat is current and who serve; ``last_seen``: when a
    worker last did (Unix seconds, Redis's clock; None if never recorded)."""

    name: str
    waiting: int
    pending: int
    dead_letters: int
    live_workers: int
    last_seen: float | None
    consumers: int
    max_queue: int
    inputs: str
    #: Age of the oldest request not yet read (0 when none waits).
    oldest_waiting_s: float = 0.0
    #: Requests answered per second by every worker of the model, over the last minute.
    requests_per_s: float = 0.0
    #: (waiting + pending) / requests_per_s: how long the backlog takes at today's pace.
    estimated_drain_s: float = 0.0
    #: Mean rows per batch, and queue wait quantiles (s), over the last minute.
    mean_batch: float | None = None
    queue_wait_p50_s: float | None = None
    queue_wait_p99_s: float | None = None
    #: Each shard of the queue; the figures above are their sums (the oldest, the max).
    shards: tuple[ShardQueue, ...] = ()


@dataclass(frozen=True)
class RedisStatus:
    """The Redis settings tfpool depends on (None: this user may not read them)."""

    maxmemory_policy: str | None
    maxmemory: int | None
    used_memory: int | None


@dataclass(frozen=True)
class PoolStatus:
    workers: list[dict[str, Any]]
    models: list[ModelStatus]
    now: float  # Redis's clock when read
    redis: RedisStatus | None = None

    def to_json(self) -> dict[str, Any]:
        models = [
            # JSON has no infinity: a drain time that cannot be estimated is null.
            {k: None if v == float("inf") else v for k, v in asdict(m).items()}
            for m in self.models
        ]
        return {
            "workers": self.workers,
            "models": models,
            "redis": None if self.redis is None else asdict(self.redis),
        }

    @property
    def models_without_workers(self) -> list[str]:
        """Models that no live worker serves: requests to them wait."""
        return [m.name for m in self.models if not m.live_workers]


def collect(conn: redis.Redis) -> PoolStatus:
    """Read the status of every pool on this Redis."""
    workers = heartbeats(conn)
    names = sorted(n.decode() for n in conn.smembers(keys.MODELS))  # type: ignore[union-attr]
    seconds, micros = conn.time()
    return PoolStatus(
        workers=workers,
        models=[model_status(conn, n, workers) for n in names],
        now=seconds + micros / 1e6,
        redis=_redis(conn),
    )


def heartbeats(conn: redis.Redis) -> list[dict[str, Any]]:
    """Every live worker's heartbeat, of every model and host."""
    workers = []
    for key in conn.scan_iter(match=keys.WORKER_PATTERN, count=500):
        fields: dict[bytes, bytes] = conn.hgetall(key)  # type: ignore[assignment]
        if fields:
            workers.append({k.decode(): _typed(k.decode(), v.decode()) for k, v in fields.items()})
    workers.sort(key=lambda w: (w.get("model", ""), w.get("host", ""), w.get("slot", 0)))
    return workers


def _redis(conn: redis.Redis) -> RedisStatus | None:
    try:
        info: dict[str, Any] = conn.info("memory")
    except redis.ResponseError:
        return None
    policy = info.get("maxmemory_policy")
    return RedisStatus(
        maxmemory_policy=None if policy is None else str(policy),
        maxmemory=_int(info.get("maxmemory")),
        used_memory=_int(info.get("used_memory")),
    )


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _typed(name: str, value: str) -> Any:
    """A heartbeat field as JSON would have it: numbers as numbers."""
    if name in TEXT_FIELDS:
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def worker_rates(workers: Sequence[dict[str, Any]], model: str | None = None) -> Rates:
    """The last minute of the workers given (of ``model`` only, if named), summed."""
    windows = [
        json.loads(w["window"])
        for w in workers
        if "window" in w and (model is None or w.get("model") == model)
    ]
    return Rates.of(windows)


def model_status(conn: redis.Redis, name: str, workers: Sequence[dict[str, Any]]) -> ModelStatus:
    """One model's queue, read now, and its workers' last minute (from ``workers``, the
    heartbeats of every host)."""
    # A heartbeat key exists only while its TTL runs: a ready one is a live worker.
    live_workers = sum(1 for w in workers if w.get("model") == name and w.get("state") == "ready")
    pipe = conn.pipeline(transaction=False)
    pipe.hgetall(keys.model_info(name))
    pipe.hget(keys.last_alive(name), FIELD_LAST_SEEN)
    clustered = connection.clustered(conn)
    if not clustered:  # a cluster's pipeline refuses TIME (no key, so no node)
        pipe.time()
    replies = pipe.execute()
    seconds, micros = conn.time() if clustered else replies.pop()
    info, last_seen = replies
    names = keys.shard_names(name, int(info.get(keys.FIELD_SHARDS.encode(), 1)))
    now = seconds + micros / 1e6
    shards = tuple(_shard_queue(conn, i, shard, now) for i, shard in enumerate(names))
    waiting = sum(s.waiting for s in shards)
    pending = sum(s.pending for s in shards)
    rates = worker_rates(workers, name)
    return ModelStatus(
        name=name,
        waiting=waiting,
        pending=pending,
        dead_letters=sum(s.dead_letters for s in shards),
        live_workers=live_workers,
        last_seen=None if last_seen is None else float(last_seen),
        consumers=max(s.consumers for s in shards),
        max_queue=int(info.get(b"max_queue", 0)),
        inputs=info.get(b"inputs", b"").decode(),
        oldest_waiting_s=max(s.oldest_waiting_s for s in shards),
        requests_per_s=rates.requests_per_s,
        estimated_drain_s=drain_seconds(waiting + pending, rates.requests_per_s),
        mean_batch=rates.mean_batch,
        queue_wait_p50_s=rates.queue_wait.quantile(0.5),
        queue_wait_p99_s=rates.queue_wait.quantile(0.99),
        shards=shards,
    )


def _shard_queue(conn: redis.Redis, shard: int, name: str, now: float) -> ShardQueue:
    """One shard's stream, read now (``now``: Redis's clock, Unix seconds)."""
    stream = keys.stream(name)
    pipe = conn.pipeline(transaction=False)
    pipe.xlen(stream)
    pipe.xlen(keys.dead_letters(name))
    length, dead = pipe.execute()
    pending, consumers, last_read = 0, 0, b"0-0"
    try:
        groups: list[dict[str, Any]] = conn.xinfo_groups(stream)
        for group in groups:
            if group["name"] in (keys.GROUP, keys.GROUP.encode()):
                pending, consumers = int(group["pending"]), int(group["consumers"])
                last_read = group["last-delivered-id"]
    except redis.ResponseError:  # no stream yet
        pass
    # Answered entries are deleted: what the stream holds is waiting or pending.
    waiting = max(0, int(length) - pending)
    oldest_waiting_s = 0.0
    if waiting:
        # The oldest entry not yet read is the first one after the group's last delivery;
        # its id is its arrival on Redis's clock, like ``now``.
        last = last_read.decode() if isinstance(last_read, bytes) else str(last_read)
        first: list[tuple[bytes, Any]] = conn.xrange(stream, min=f"({last}", count=1)  # type: ignore[assignment]
        if first:
            arrived_ms = int(first[0][0].split(b"-", 1)[0])
            oldest_waiting_s = max(0.0, now - arrived_ms / 1000)
    return ShardQueue(shard, stream, waiting, pending, int(dead), consumers, oldest_waiting_s)


def render(status: PoolStatus, *, now: float | None = None) -> str:
    """A plain-text report: a workers table, then a models table. Rates, batch sizes and
    queue waits are over the last minute (what ``rate(...[1m])`` shows on the dashboard)."""
    now = status.now if now is None else now
    lines = []
    if status.redis is not None:
        lines += [_describe_redis(status.redis), ""]
    header = ("HOST", "PID", "SLOT", "DEVICE", "MODEL", "STATE", "BATCHES", "REQUESTS",
              "REQ/S", "BATCH", "WAIT p50/p99 ms", "RSS MiB", "CPU %", "UP")  # fmt: skip
    rows = []
    for w in status.workers:
        rates = worker_rates([w])
        rows.append(
            (
                w.get("host", "?"),
                w.get("pid", "?"),
                w.get("slot", "?"),
                w.get("device", "?"),
                w.get("model", "?"),
                w.get("state", "?"),
                w.get("batches", "0"),
                w.get("requests", "0"),
                f"{rates.requests_per_s:.1f}",
                _number(rates.mean_batch),
                _waits(rates.queue_wait.quantile(0.5), rates.queue_wait.quantile(0.99)),
                w.get("rss_mb", "?"),
                w.get("cpu_percent", "?"),
                _age(now - float(w.get("started", now))),
            )
        )
    lines.append(f"workers: {len(status.workers)}")
    lines += _table(header, rows)
    lines.append("")
    lines.append(f"models: {len(status.models)}")
    model_rows = [
        (
            m.name,
            str(m.live_workers),
            "now" if m.live_workers else _last_seen(m.last_seen, now),
            str(m.waiting),
            str(m.pending),
            str(m.dead_letters),
            str(m.max_queue or "none"),
            f"{m.requests_per_s:.1f}",
            _number(m.mean_batch),
            _waits(m.queue_wait_p50_s, m.queue_wait_p99_s),
            f"{m.oldest_waiting_s:.1f}",
            _number(m.estimated_drain_s),
            m.inputs,
        )
        for m in status.models
    ]
    lines += _table(
        ("MODEL", "LIVE", "LAST SEEN", "WAITING", "PENDING", "DEAD", "CAP", "REQ/S", "BATCH",
         "WAIT p50/p99 ms", "OLDEST s", "DRAIN s", "INPUTS"),
        model_rows,
    )  # fmt: skip
    shard_rows = [
        (m.name, str(q.shard), q.stream, str(q.waiting), str(q.pending), str(q.dead_letters),
         str(q.consumers), f"{q.oldest_waiting_s:.1f}")
        for m in status.models if len(m.shards) > 1
        for q in m.shards
    ]  # fmt: skip
    if shard_rows:
        lines += ["", "shards:"]
        lines += _table(("MODEL", "SHARD", "STREAM", "WAITING", "PENDING", "DEAD", "CONSUMERS",
                         "OLDEST s"), shard_rows)  # fmt: skip
    version_rows = [
        (
            w.get("model", "?"),
            w.get("host", "?"),
            w.get("pid", "?"),
            str(w.get("default_version", "") or "-"),
            str(w.get("labels", "") or "-"),
            str(w.get("versions", "")),
        )
        for w in status.workers
        if w.get("versions")
    ]
    if version_rows:  # each worker's own view: during a rollout, workers differ
        lines += ["", "versions (state per worker: loading, warming, ready, draining, failed):"]
        lines += _table(("MODEL", "HOST", "PID", "DEFAULT", "LABELS", "VERSIONS"), version_rows)
    return "\n".join(lines)


def _describe_redis(r: RedisStatus) -> str:
    policy = r.maxmemory_policy or "?"
    verdict = "ok" if policy == SAFE_POLICY else f"NOT {SAFE_POLICY}: may lose requests"
    limit = "no limit" if not r.maxmemory else f"{_mib(r.maxmemory)} MiB"
    used = "?" if r.used_memory is None else f"{_mib(r.used_memory)} MiB"
    return f"redis: maxmemory-policy {policy} ({verdict}); memory used {used} of {limit}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _last_seen(last_seen: float | None, now: float) -> str:
    if last_seen is None:
        return "unknown"
    return f"{time.strftime('%H:%M:%S', time.localtime(last_seen))} ({ago(now - last_seen)})"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _waits(p50: float | None, p99: float | None) -> str:
    if p50 is None or p99 is None:
        return "-"
    return f"{p50 * 1000:.1f}/{p99 * 1000:.1f}"


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"
