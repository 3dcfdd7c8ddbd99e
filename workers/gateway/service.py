"""The gateway's core, whatever the protocol: find the model, forward the request through
the one :class:`AsyncClient`, name the outputs. The gRPC and REST front ends are thin
translations around it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from queueing import AsyncClient, keys
from queueing.errors import DeadlineExceeded, InvalidInput, UnknownModel
from workers.gateway.catalog import Catalog, ModelEntry

#: The signature a pool serves, as TF Serving names the default one.
DEFAULT_SIGNATURE = "serving_default"


@dataclass(frozen=True)
class Route:
    """Where one request goes: its model (with the inputs and outputs of the version it
    goes to: see :meth:`ModelEntry.at`), the address the pool is sent (``"resnet"``,
    ``"resnet@4"``, ``"resnet@canary"``: the workers route it to that version), and the
    version the catalog resolves that address to (None: the model serves none now)."""

    entry: ModelEntry
    address: str
    version: int | None


@dataclass(frozen=True)
class Answer:
    """A request's outputs by name, and the version of the model that made them."""

    outputs: dict[str, np.ndarray]
    version: int | None


class Gateway:
    """Requests in, answers out, for every front end of one gateway process."""

    def __init__(self, client: AsyncClient, catalog: Catalog, *, timeout_s: float) -> None:
        self.client = client
        self.catalog = catalog
        self.timeout_s = timeout_s

    async def model(self, name: str) -> ModelEntry:
        """The model called ``name``; UnknownModel if no pool serves it."""
        if not name:
            raise InvalidInput("no model name given")
        if keys.VERSION_SEP in name:
            raise InvalidInput(
                f"model name {name!r}: a name has no {keys.VERSION_SEP!r}; ask for a version"
                " with the API's version field (TF Serving: model_spec.version or"
                " version_label; REST: /versions/V or /labels/L)"
            )
        entry = await self.catalog.get(name)
        if entry is None:
            raise UnknownModel(f"no pool serves model {name!r} on this Redis")
        return entry

    async def route(self, name: str, version: int | str | None = None) -> Route:
        """Where a request for ``version`` of model ``name`` goes: a version number
        (``4``, ``"4"``), a label (``"canary"``), or the default (None or ``""``).
        UnknownModel if the model does not serve it."""
        entry = await self.model(name)
        spec = "" if version is None else str(version).strip()
        if not spec:
            return Route(entry.at(entry.default_version), name, entry.default_version)
        number = _resolve(entry, spec)
        if number is None:  # a version rolled out within the catalog's TTL: look again
            entry = await self.catalog.get(name, fresh=True) or entry
            number = _resolve(entry, spec)
        if number is None:
            what = f"version {spec}" if _is_number(spec) else f"label {spec!r}"
            raise UnknownModel(
                f"model {name!r} has no {what}: it serves {entry.describe_versions()}"
            )
        # A label goes to the pool as a label: the workers resolve it when they read it.
        pinned = str(number) if _is_number(spec) else spec
        return Route(entry.at(number), f"{name}{keys.VERSION_SEP}{pinned}", number)

    async def predict(
        self,
        route: Route,
        inputs: dict[str, np.ndarray],
        *,
        deadline_s: float | None = None,
        outputs: Sequence[str] = (),
    ) -> Answer:
        """Run ``inputs`` through the pool; every output by name, or only ``outputs``,
        and the version that made them.

        ``deadline_s`` (seconds from now, e.g. a gRPC call's time remaining) becomes the
        request's deadline in the pool, so that the pool never runs a request whose caller
        has given up; without it, the gateway waits ``timeout_s``."""
        entry = route.entry
        if not inputs:
            raise InvalidInput("the request has no inputs")
        unknown = sorted(set(outputs) - set(entry.output_names))
        if unknown:
            raise InvalidInput(
                f"model {entry.name!r} has no outputs {unknown}; it has {entry.output_names}"
            )
        if deadline_s is not None and deadline_s <= 0:
            raise DeadlineExceeded("the request's deadline passed before it was sent")
        timeout = self.timeout_s if deadline_s is None else deadline_s
        future = await self.client.submit(route.address, inputs, deadline=deadline_s)
        result = await self.client.wait(future, timeout=timeout)
        if isinstance(result, np.ndarray):  # a model with one output: name it
            result = {entry.output_names[0] if entry.output_names else "output_0": result}
        # The worker says which version answered; a pool that does not say (an older
        # tfpool) served the one the catalog resolved.
        made_by = route.version if future.model_version is None else future.model_version
        self.catalog.learn_outputs(entry.name, made_by, result)
        if outputs:
            result = {name: result[name] for name in outputs}
        return Answer(result, made_by)


def _is_number(spec: str) -> bool:
    return spec.removeprefix("-").isdigit()


def _resolve(entry: ModelEntry, spec: str) -> int | None:
    """The served version a version number or label names, or None."""
    number = int(spec) if _is_number(spec) else entry.labels.get(spec)
    return number if number in entry.versions else None


def tfpool_version() -> str:
    """The installed tfpool's version, for the APIs' server metadata."""
    try:
        return version("tfpool")
    except PackageNotFoundError:
        return "unknown"
