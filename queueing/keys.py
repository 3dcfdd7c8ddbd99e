"""Every Redis key tfpool uses, in one place.

In a Redis Cluster, every key one Lua script or MULTI/EXEC touches must live in one hash slot
(Celery and RQ broke there with ``CROSSSLOT`` errors). A key's slot comes from its *hash tag*,
the part between braces, so:

* a model's keys share the tag ``{model}``: admission control (stream + info hash), the
  worker's acks, dead letters and attempt counts stay in one slot, and different models
  spread over the masters;
* a reply stream has its producer's tag ``{client id}``, a kept result its request's: a
  round of answers for many producers touches many slots, so the worker posts them apart
  from its acks (see :mod:`workers.writer`), and the producers spread over the masters.

A model's queue can be split into *shards* (option ``shards``): shard 0 is the model's own
keys; shard ``i`` has the keys of a name of its own (:func:`shard_names`), whose tag is
chosen so that the shards spread over a cluster's masters. On one Redis the braces are
just characters.
"""

from __future__ import annotations

from functools import lru_cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

PREFIX = "tfpool"

#: The consumer group every worker of every host joins.
GROUP = "workers"

#: Stream entry fields. ``id`` and ``reply`` sit outside the msgpack body so that a request
#: whose body is garbage can still be answered with an error.
FIELD_ID = b"id"
FIELD_REPLY = b"reply"
FIELD_BODY = b"body"


def result_fields(payloads: list[bytes]) -> list[bytes]:
    """A reply stream entry's fields and values for ``payloads``: one field per result,
    named by its position (``0``, ``1``, ...). A worker adds one entry per reply stream
    per round, with every result of that round for that producer."""
    return [item for i, payload in enumerate(payloads) for item in (b"%d" % i, payload)]


#: Separates a model's name from a version or label in an address: ``"resnet@4"``,
#: ``"resnet@canary"``. Model names may not contain it.
VERSION_SEP = "@"


def split_address(address: str) -> tuple[str, str | None]:
    """``"resnet@4"`` -> ``("resnet", "4")``; ``"resnet"`` -> ``("resnet", None)``. The
    version part is a version number or a label; every version of a model shares the
    model's queue, and the worker routes each request to the version it names."""
    name, sep, version = address.partition(VERSION_SEP)
    return name, (version if sep else None)


def version_field(field: str, version: int) -> str:
    """The field of a model's info hash that holds one served version's ``field``
    (``inputs@3``, ``outputs@3``, ``output_specs@3``): versions of one model may take
    different inputs. The plain fields (``inputs``...) are the default version's."""
    return f"{field}{VERSION_SEP}{version}"


def is_version_field(field: str) -> bool:
    """Whether an info hash field is one version's (see :func:`version_field`)."""
    _, sep, version = field.partition(VERSION_SEP)
    return bool(sep) and version.isdigit()


#: Separates a model's name from a shard's number in a shard's name: ``"resnet#2.5"``.
SHARD_SEP = "#"

#: The field of the model's info hash that says into how many shards its queue is split.
FIELD_SHARDS = "shards"


@lru_cache(maxsize=1024)
def shard_names(model: str, shards: int) -> tuple[str, ...]:
    """The names whose keys (stream, info, dead letters, attempts) hold each shard of
    ``model``'s queue: ``model`` itself, then ``model#i.k``. The slots are split into
    ``shards`` equal parts, and shard ``i`` lives in the ``i``-th part after shard 0's
    (``k`` is the first number that puts it there): a cluster created with equal slot
    ranges per master (as ``redis-cli --cluster create`` does) has each shard on another
    master, as far as there are masters. Producers and workers compute the same names
    with no lookup."""
    name = split_address(model)[0]
    if shards <= 1:
        return (name,)
    part = REDIS_CLUSTER_HASH_SLOTS / shards
    first = int(key_slot(name.encode()) // part)
    names = [name]
    for i in range(1, shards):
        want = (first + i) % shards
        k = 0
        while int(key_slot(f"{name}{SHARD_SEP}{i}.{k}".encode()) // part) != want:
            k += 1
        names.append(f"{name}{SHARD_SEP}{i}.{k}")
    return tuple(names)


def stream(model: str) -> str:
    """The request stream of ``model`` (an address ``name@version`` names its model's)."""
    return f"{PREFIX}:{{{split_address(model)[0]}}}:q"


def model_info(model: str) -> str:
    """Hash written by the workers of ``model``: queue cap, input spec, versions served
    (and each one's spec: :func:`version_field`). Its existence says that a pool has
    served this model on this Redis."""
    return f"{PREFIX}:{{{split_address(model)[0]}}}:info"


def dead_letters(model: str) -> str:
    """Stream of requests set aside: unreadable, or delivered too many times."""
    return f"{PREFIX}:{{{model}}}:dead"


def last_alive(model: str) -> str:
    """Hash stamped by every heartbeat of a ready worker of ``model``: when one was last
    seen and how long its heartbeat lasts (see ``queueing.liveness``). Apart from the
    info hash, whose existence means "registered"."""
    return f"{PREFIX}:{{{split_address(model)[0]}}}:alive"


def attempts(model: str) -> str:
    """Hash: stream entry id -> runs of a taken-over request that were under way when a
    worker died (how poison requests are told from their innocent batch-mates)."""
    return f"{PREFIX}:{{{model}}}:attempts"


def kept_result(request_id: str) -> str:
    """A result kept for fetching by id (``submit(..., keep=True)``): a one-element list."""
    return f"{PREFIX}:result:{{{request_id}}}"


def reply_stream(client_id: str) -> str:
    """The stream a producer process reads its results from. A stream, not a list: the
    client reads it by entry id and trims what it holds, so that a result stays in Redis
    until the client has it (a popped list element dies with a dropped connection)."""
    return f"{PREFIX}:reply:{{{client_id}}}"


def worker_heartbeat(worker_id: str) -> str:
    """A worker's heartbeat (a hash with a TTL)."""
    return f"{PREFIX}:worker:{worker_id}"


#: Set of the names of every model a pool has served on this Redis.
MODELS = f"{PREFIX}:models"

#: A counter ``tfpool reload`` increments: workers re-scan their model repository when it
#: changes.
RELOAD = f"{PREFIX}:reload"

#: A random value naming this Redis's dataset; see queueing.redis_state.
EPOCH = f"{PREFIX}:epoch"

#: Pattern matching every heartbeat key (for SCAN).
WORKER_PATTERN = f"{PREFIX}:worker:*"
