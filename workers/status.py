"""``tfpool status``: every worker of every host, and each model's queue, from Redis alone.

Workers publish a heartbeat hash with a TTL, so a dead worker drops out of the list within
three heartbeats; the queue figures come from the streams themselves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis

from queueing import keys
from queueing.liveness import FIELD_LAST_SEEN, ago
from queueing.redis_state import SAFE_POLICY

#: Heartbeat fields that stay text; the others are numbers (in ``--json`` too).
TEXT_FIELDS = frozenset(
    {
        "host",
        "device",
        "model",
        "state",
        "cuda_visible_devices",
        "memory_growth",
        "versions",
        "labels",
    }
)


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
        return {
            "workers": self.workers,
            "models": [asdict(m) for m in self.models],
            "redis": None if self.redis is None else asdict(self.redis),
        }

    @property
    def models_without_workers(self) -> list[str]:
        """Models that no live worker serves: requests to them wait."""
        return [m.name for m in self.models if not m.live_workers]


def collect(conn: redis.Redis) -> PoolStatus:
    """Read the status of every pool on this Redis."""
    workers = []
    for key in conn.scan_iter(match=keys.WORKER_PATTERN, count=500):
        fields: dict[bytes, bytes] = conn.hgetall(key)  # type: ignore[assignment]
        if fields:
            workers.append({k.decode(): _typed(k.decode(), v.decode()) for k, v in fields.items()})
    workers.sort(key=lambda w: (w.get("model", ""), w.get("host", ""), w.get("slot", 0)))
    names = sorted(n.decode() for n in conn.smembers(keys.MODELS))  # type: ignore[union-attr]
    seconds, micros = conn.time()
    live: dict[str, int] = {}
    for w in workers:
        if w.get("state") == "ready":  # a heartbeat key exists only while its TTL runs
            live[w.get("model", "")] = live.get(w.get("model", ""), 0) + 1
    return PoolStatus(
        workers=workers,
        models=[_model_status(conn, n, live.get(n, 0)) for n in names],
        now=seconds + micros / 1e6,
        redis=_redis(conn),
    )


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


def _model_status(conn: redis.Redis, name: str, live_workers: int) -> ModelStatus:
    stream = keys.stream(name)
    pipe = conn.pipeline(transaction=False)
    pipe.xlen(stream)
    pipe.xlen(keys.dead_letters(name))
    pipe.hgetall(keys.model_info(name))
    pipe.hget(keys.last_alive(name), FIELD_LAST_SEEN)
    length, dead, info, last_seen = pipe.execute()
    pending, consumers = 0, 0
    try:
        groups: list[dict[str, Any]] = conn.xinfo_groups(stream)
        for group in groups:
            if group["name"] in (keys.GROUP, keys.GROUP.encode()):
                pending, consumers = int(group["pending"]), int(group["consumers"])
    except redis.ResponseError:  # no stream yet
        pass
    return ModelStatus(
        name=name,
        # Answered entries are deleted: what the stream holds is waiting or pending.
        waiting=max(0, int(length) - pending),
        pending=pending,
        dead_letters=int(dead),
        live_workers=live_workers,
        last_seen=None if last_seen is None else float(last_seen),
        consumers=consumers,
        max_queue=int(info.get(b"max_queue", 0)),
        inputs=info.get(b"inputs", b"").decode(),
    )


def render(status: PoolStatus, *, now: float | None = None) -> str:
    """A plain-text report: a workers table, then a models table."""
    now = status.now if now is None else now
    lines = []
    if status.redis is not None:
        lines += [_describe_redis(status.redis), ""]
    header = ("HOST", "PID", "SLOT", "DEVICE", "MODEL", "STATE", "BATCHES", "REQUESTS",
              "RSS MiB", "CPU %", "UP")  # fmt: skip
    rows = [
        (
            w.get("host", "?"),
            w.get("pid", "?"),
            w.get("slot", "?"),
            w.get("device", "?"),
            w.get("model", "?"),
            w.get("state", "?"),
            w.get("batches", "0"),
            w.get("requests", "0"),
            w.get("rss_mb", "?"),
            w.get("cpu_percent", "?"),
            _age(now - float(w.get("started", now))),
        )
        for w in status.workers
    ]
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
            m.inputs,
        )
        for m in status.models
    ]
    lines += _table(
        ("MODEL", "LIVE", "LAST SEEN", "WAITING", "PENDING", "DEAD", "CAP", "INPUTS"), model_rows
    )
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
