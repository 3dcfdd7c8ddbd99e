"""What a pool says of a model in its info hash (see :func:`queueing.keys.model_info`),
for the version an address names: ``resnet@2`` reads version 2's ``inputs@2``,
``resnet@canary`` the version its label names, ``resnet`` the default version's plain
fields. Versions of one model may take different inputs, so what a producer matches
against (a dataset's columns, an output's name) must be the version it sends to."""

from __future__ import annotations

from typing import Any, cast

import redis

from queueing import keys


def version_of(address: str, labels: bytes | str | None) -> int | None:
    """The version ``address`` names: its number, or the version its label has in
    ``labels`` (the info hash's ``labels`` field, ``"stable=3, canary=4"``); None for the
    default version or a label the pool does not have."""
    _, spec = keys.split_address(address)
    if spec is None:
        return None
    if spec.isdigit():
        return int(spec)
    text = labels.decode() if isinstance(labels, bytes) else labels or ""
    for pair in text.split(","):
        label, _, number = pair.strip().partition("=")
        if label == spec and number.strip().isdigit():
            return int(number)
    return None


def read_field(conn: redis.Redis, address: str, field: str) -> str | None:
    """``field`` of the version ``address`` names, falling back to the default version's
    (a pool older than per-version fields, or a version it does not serve: the request
    itself then fails with the pool's own error). None before any pool served the model."""
    info = keys.model_info(address)
    labels, plain = cast(list[Any], conn.hmget(info, ["labels", field]))
    version = version_of(address, labels)
    value = conn.hget(info, keys.version_field(field, version)) if version else None
    chosen = value if value is not None else plain
    return chosen.decode() if isinstance(chosen, bytes) else chosen
