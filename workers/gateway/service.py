"""The gateway's core, whatever the protocol: find the model, forward the request through
the one :class:`AsyncClient`, name the outputs. The gRPC and REST front ends are thin
translations around it."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from queueing import AsyncClient
from queueing.errors import DeadlineExceeded, InvalidInput, UnknownModel
from workers.gateway.catalog import Catalog, ModelEntry

#: The one version a pool serves, as the APIs that want a version number see it, until
#: the model repository (TF Serving's ``REPO/<name>/<version>/``) exists.
SERVED_VERSION = 1

#: The signature a pool serves, as TF Serving names the default one.
DEFAULT_SIGNATURE = "serving_default"


class Gateway:
    """Requests in, answers out, for every front end of one gateway process."""

    def __init__(self, client: AsyncClient, catalog: Catalog, *, timeout_s: float) -> None:
        self.client = client
        self.catalog = catalog
        self.timeout_s = timeout_s

    async def model(self, name: str, version: int | str | None = None) -> ModelEntry:
        """The model called ``name``; UnknownModel if no pool serves it, or not that version."""
        if not name:
            raise InvalidInput("no model name given")
        entry = await self.catalog.get(name)
        if entry is None:
            raise UnknownModel(f"no pool serves model {name!r} on this Redis")
        if version not in (None, "", SERVED_VERSION, str(SERVED_VERSION)):
            raise UnknownModel(
                f"model {name!r} has no version {version}: a pool serves one version,"
                f" {SERVED_VERSION}"
            )
        return entry

    async def predict(
        self,
        entry: ModelEntry,
        inputs: dict[str, np.ndarray],
        *,
        deadline_s: float | None = None,
        outputs: Sequence[str] = (),
    ) -> dict[str, np.ndarray]:
        """Run ``inputs`` through the pool; every output by name, or only ``outputs``.

        ``deadline_s`` (seconds from now, e.g. a gRPC call's time remaining) becomes the
        request's deadline in the pool, so that the pool never runs a request whose caller
        has given up; without it, the gateway waits ``timeout_s``."""
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
        result = await self.client.predict(entry.name, inputs, timeout=timeout, deadline=deadline_s)
        if isinstance(result, np.ndarray):  # a model with one output: name it
            result = {entry.output_names[0] if entry.output_names else "output_0": result}
        self.catalog.learn_outputs(entry.name, result)
        if outputs:
            return {name: result[name] for name in outputs}
        return result


def tfpool_version() -> str:
    """The installed tfpool's version, for the APIs' server metadata."""
    try:
        return version("tfpool")
    except PackageNotFoundError:
        return "unknown"
