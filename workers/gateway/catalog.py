"""What the gateway knows about models: read from Redis, where the workers publish it (the
same records ``tfpool status`` reads), and cached for a moment.

A model's inputs and outputs come from its info hash (``keys.model_info``), written by its
workers from the loaded models themselves: the default version's, and each served
version's (``inputs@3``...; a pool started by an older tfpool gives only the default's,
which then stands for every version), with the versions and labels they serve
(``Versions.model_info``); its live workers from their heartbeats, which expire three
heartbeats after a worker dies. An output whose dtype and shape the info hash does not give
(a pool started by an older tfpool, or a model that does not declare them) is learned from
the first answer of that version the gateway forwards.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import cast

import numpy as np
import redis

from queueing import connection, keys
from queueing.base import without_password
from queueing.errors import Unavailable
from queueing.wire import dtype_name
from workers.spec import TensorSpec

#: How long what was read from Redis is trusted: a dead worker shows within this (plus its
#: heartbeat's TTL), and a busy gateway reads Redis for metadata once per this, not per call.
DEFAULT_TTL_S = 1.0

# One input as the info hash describes it: "name: float32 [*, 4]". A pre-processed input
# reads "image: bytes [*] (encoded ...) or uint8 [...] -> ...": its first form is taken.
_INPUT = re.compile(r"(?:^|, )([^\s:,]+): (\w+) \[([^\]]*)\]")


#: The versions of a model whose info hash does not list them (a pool started by an older
#: tfpool): such a pool serves one model file, version 1.
SINGLE_VERSION = 1


@dataclass(frozen=True)
class Signature:
    """What one version of a model takes and answers: its inputs (shapes without the batch
    axis), its output names, and its output specs by name (registered by the workers,
    else learned from an answer)."""

    inputs: list[TensorSpec]
    output_names: list[str]
    outputs: dict[str, TensorSpec] = field(default_factory=dict)

    def with_learned(self, learned: dict[str, TensorSpec]) -> Signature:
        """The same, with output specs learned from answers where none was registered."""
        return replace(self, outputs={**learned, **self.outputs}) if learned else self


@dataclass(frozen=True)
class ModelEntry:
    """One model: the inputs and outputs of one of its versions (the default's, or the
    one :meth:`at` chose), how many workers are ready to serve it now, the versions and
    labels they serve, and each version's inputs and outputs."""

    name: str
    inputs: list[TensorSpec]
    output_names: list[str]
    ready_workers: int
    #: Output specs by name: registered by the workers, else learned from an answer.
    outputs: dict[str, TensorSpec] = field(default_factory=dict)
    #: Version numbers served, ascending (empty: a repository with none loaded now).
    versions: list[int] = field(default_factory=lambda: [SINGLE_VERSION])
    #: Labels of served versions: label -> version number.
    labels: dict[str, int] = field(default_factory=dict)
    #: The version a request that names none goes to (None: none served).
    default_version: int | None = SINGLE_VERSION
    #: Each served version's inputs and outputs.
    signatures: dict[int, Signature] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.ready_workers > 0

    def at(self, version: int | None) -> ModelEntry:
        """This model with the inputs and outputs of ``version`` (unchanged for None or a
        version it does not know)."""
        signature = None if version is None else self.signatures.get(version)
        if signature is None:
            return self
        return replace(self, inputs=signature.inputs, output_names=signature.output_names,
                       outputs=signature.outputs)  # fmt: skip

    def describe_versions(self) -> str:
        """``versions 1, 2; labels canary=2, stable=1``, for error messages."""
        text = "versions " + (", ".join(map(str, self.versions)) or "none")
        if self.labels:
            text += "; labels " + ", ".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        return text


def parse_inputs(text: str) -> list[TensorSpec]:
    """The specs in an info hash's ``inputs`` or ``output_specs`` field (written by
    ``Worker._assemble``)."""
    specs = []
    for name, dtype, dims in _INPUT.findall(text):
        sizes = [d.strip() for d in dims.split(",") if d.strip()]
        # The first axis is the batch axis ("*"); other "*" are free sizes.
        shape = tuple(None if d == "*" else int(d) for d in sizes[1:])
        specs.append(TensorSpec(name=name, dtype=dtype, shape=shape))
    return specs


def parse_versions(info: dict[bytes, bytes]) -> tuple[list[int], dict[str, int], int | None]:
    """Versions served, labels (of served versions only) and the default version, from an
    info hash's ``versions``, ``labels`` and ``default_version`` fields. A hash without a
    ``versions`` field is an older pool's: one model file, version 1."""
    if b"versions" not in info:
        return [SINGLE_VERSION], {}, SINGLE_VERSION
    versions = sorted(int(v) for v in info[b"versions"].decode().split(",") if v.strip())
    labels = {}
    for pair in info.get(b"labels", b"").decode().split(","):
        label, _, number = pair.strip().partition("=")
        if label and number.strip().isdigit() and int(number) in versions:
            labels[label] = int(number)
    default = info.get(b"default_version", b"").decode()
    return versions, labels, int(default) if default.isdigit() and versions else None


def parse_signature(info: dict[bytes, bytes], version: int | None = None) -> Signature | None:
    """A version's inputs and outputs from an info hash's ``inputs@N``, ``outputs@N`` and
    ``output_specs@N`` fields, or with ``version`` None the default version's (the plain
    fields). None when the hash has no inputs for it."""

    def text(name: str) -> str | None:
        field_name = name if version is None else keys.version_field(name, version)
        value = info.get(field_name.encode())
        return None if value is None else value.decode()

    inputs = text("inputs")
    if inputs is None:
        return None
    registered = parse_inputs(text("output_specs") or "")
    return Signature(
        inputs=parse_inputs(inputs),
        output_names=[o for o in (text("outputs") or "").split(", ") if o],
        outputs={s.name: s for s in registered},
    )


def learned_spec(name: str, array: np.ndarray) -> TensorSpec:
    """An output's spec as one answer shows it (the batch axis left out)."""
    return TensorSpec(name=name, dtype=dtype_name(array), shape=tuple(array.shape[1:]))


class Catalog:
    """Models served on one Redis. Create inside the running loop; ``await close()``."""

    def __init__(self, redis_url: str, *, ttl_s: float = DEFAULT_TTL_S) -> None:
        self._redis = connection.connect_async(redis_url, socket_timeout=10)
        self._safe_url = without_password(redis_url)
        self._ttl_s = ttl_s
        # Written and read on the event loop only: no lock.
        self._entries: dict[str, tuple[float, ModelEntry | None]] = {}
        self._workers: tuple[float, Counter[str]] = (-1e9, Counter())
        # Output specs learned from answers, by (model, version).
        self._outputs: dict[tuple[str, int | None], dict[str, TensorSpec]] = {}
        self._refresh_lock = asyncio.Lock()

    async def get(self, name: str, *, fresh: bool = False) -> ModelEntry | None:
        """The model called ``name``, or None if no pool has served it on this Redis;
        ``fresh``: read Redis even if what was read last is recent. Raises
        :class:`Unavailable` when Redis cannot be reached."""
        now = time.monotonic()
        cached = self._entries.get(name)
        if fresh or cached is None or now - cached[0] > self._ttl_s:
            cached = (now, await self._read(name))
            self._entries[name] = cached
        entry = cached[1]
        if entry is None or not self._outputs:
            return entry
        default = Signature(entry.inputs, entry.output_names, entry.outputs)
        default = default.with_learned(self._outputs.get((name, entry.default_version), {}))
        signatures = {
            number: signature.with_learned(self._outputs.get((name, number), {}))
            for number, signature in entry.signatures.items()
        }
        return replace(entry, outputs=default.outputs, signatures=signatures)

    async def names(self) -> list[str]:
        """Every model a pool has served on this Redis."""
        try:
            members = await self._redis.smembers(keys.MODELS)
        except redis.RedisError as e:
            raise self._unavailable(e) from e
        return sorted(m.decode() if isinstance(m, bytes) else m for m in members)

    async def ping(self) -> bool:
        """Whether Redis answers."""
        try:
            return bool(await self._redis.ping())
        except redis.RedisError:
            return False

    def learn_outputs(self, name: str, version: int | None, outputs: dict[str, np.ndarray]) -> None:
        """Note the dtypes and shapes of the outputs of a model's version from one of its
        answers (the specs its workers registered, if any, take precedence)."""
        if (name, version) not in self._outputs:
            learned = {k: learned_spec(k, v) for k, v in outputs.items()}
            self._outputs[name, version] = learned

    async def close(self) -> None:
        await self._redis.aclose()

    # --- internals ----------------------------------------------------------------------

    async def _read(self, name: str) -> ModelEntry | None:
        try:
            info = cast(dict[bytes, bytes], await self._redis.hgetall(keys.model_info(name)))
        except redis.RedisError as e:
            raise self._unavailable(e) from e
        if not info:
            return None
        workers = await self._ready_workers()
        versions, labels, default = parse_versions(info)
        main = parse_signature(info) or Signature(inputs=[], output_names=[])
        return ModelEntry(
            name=name,
            inputs=main.inputs,
            output_names=main.output_names,
            ready_workers=workers[name],
            outputs=main.outputs,
            versions=versions,
            labels=labels,
            default_version=default,
            # A pool started by an older tfpool gives only the default's: it stands for all.
            signatures={n: parse_signature(info, n) or main for n in versions},
        )

    async def _ready_workers(self) -> Counter[str]:
        """Ready workers per model, from one scan of the heartbeats (shared by all models)."""
        async with self._refresh_lock:
            read_at, counts = self._workers
            if time.monotonic() - read_at <= self._ttl_s:
                return counts
            counts = Counter()
            try:
                found = [
                    k async for k in self._redis.scan_iter(match=keys.WORKER_PATTERN, count=500)
                ]
                pipe = self._redis.pipeline(transaction=False)
                for key in found:
                    pipe.hmget(key, ["model", "state"])
                for model, state in cast(list[list[bytes | None]], await pipe.execute()):
                    if model is not None and state == b"ready":
                        counts[model.decode()] += 1
            except redis.RedisError as e:
                raise self._unavailable(e) from e
            self._workers = (time.monotonic(), counts)
            return counts

    def _unavailable(self, error: redis.RedisError) -> Unavailable:
        return Unavailable(f"cannot reach Redis at {self._safe_url}: {error}")
