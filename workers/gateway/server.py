"""The gateway process: its options, and the gRPC and HTTP servers on one event loop with
the health they report."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from queueing import AsyncClient
from queueing.base import resolve_redis_url, without_password
from queueing.errors import RequestError
from workers.gateway import grpc_api, rest_api
from workers.gateway.catalog import Catalog
from workers.gateway.service import Gateway

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

ENV_PREFIX = "TFPOOL_GATEWAY_"

#: How often the gRPC health service is brought up to date with the pool.
HEALTH_INTERVAL_S = 1.0


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    """``tfpool gateway``'s options: from a TOML file's ``[gateway]`` table, then
    ``TFPOOL_GATEWAY_<OPTION>`` (``TFPOOL_REDIS_URL`` too, for the URL), then the command
    line. Ports are TF Serving's defaults; 0 takes any free port."""

    redis_url: str = ""
    host: str = "0.0.0.0"
    grpc_port: int = 8500
    rest_port: int = 8501
    #: How long a request without a gRPC deadline waits for its answer.
    timeout_s: float = 30.0
    #: Largest gRPC message accepted or sent, in MiB (gRPC's own default is 4).
    max_message_mb: int = 64

    def __post_init__(self) -> None:
        for name in ("grpc_port", "rest_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} must be a port number, got {port}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_message_mb < 1:
            raise ValueError(f"max_message_mb must be >= 1, got {self.max_message_mb}")

    @classmethod
    def load(
        cls,
        *,
        config_file: str | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> GatewayConfig:
        env = os.environ if env is None else env
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        if config_file:
            with open(config_file, "rb") as f:
                values.update(tomllib.load(f).get("gateway", {}))
        if "TFPOOL_REDIS_URL" in env:
            values["redis_url"] = env["TFPOOL_REDIS_URL"]
        values.update(
            {
                name: env[ENV_PREFIX + name.upper()]
                for name in kinds
                if ENV_PREFIX + name.upper() in env
            }
        )
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        unknown = sorted(values.keys() - kinds.keys())
        if unknown:
            raise ValueError(f"unknown gateway options: {unknown}")
        casts = {"str": str, "int": int, "float": float}
        return cls(**{k: casts[str(kinds[k])](v) for k, v in values.items()})


class GatewayServer:
    """The gRPC and REST servers of one gateway, sharing one AsyncClient. ``await start()``
    inside the running loop; the bound ports are then in ``grpc_port`` and ``rest_port``."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.redis_url = resolve_redis_url(config.redis_url or None)
        self.grpc_port = 0
        self.rest_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._rest: web.AppRunner | None = None
        self._health = health.aio.HealthServicer()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        self.client = AsyncClient(self.redis_url)
        self.catalog = Catalog(self.redis_url)
        self.gateway = Gateway(self.client, self.catalog, timeout_s=self.config.timeout_s)
        size = self.config.max_message_mb * 2**20
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
            ]
        )
        self._grpc.add_generic_rpc_handlers(grpc_api.handlers(self.gateway))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        address = f"{self.config.host}:{self.config.grpc_port}"
        try:
            self.grpc_port = self._grpc.add_insecure_port(address)
        except RuntimeError as e:  # grpcio's way of saying the port is taken
            raise OSError(f"gRPC cannot bind {address}: {e}") from e
        await self._grpc.start()
        self._rest = web.AppRunner(
            rest_api.create_app(self.gateway, max_body_mb=self.config.max_message_mb),
            access_log=None,
            # Idle keep-alive connections would otherwise hold a stop for 60 s.
            shutdown_timeout=5.0,
        )
        await self._rest.setup()
        site = web.TCPSite(self._rest, self.config.host, self.config.rest_port)
        await site.start()
        self.rest_port = self._rest.addresses[0][1]
        self._tasks.append(asyncio.create_task(self._watch_health(), name="gateway-health"))
        log.info(
            "gateway on %s: gRPC port %d, REST port %d",
            without_password(self.redis_url),
            self.grpc_port,
            self.rest_port,
        )

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop taking calls, let those under way finish (up to ``grace_s``), close."""
        # The flag is what ends the health task: redis-py may turn a cancellation during a
        # read into a connection error, which the task would take for Redis being down.
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=HEALTH_INTERVAL_S + 1)
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
        if self._rest is not None:
            await self._rest.cleanup()
        await self.client.close()
        await self.catalog.close()

    async def _watch_health(self) -> None:
        """Keep the gRPC health service true to the pool: the server (service "") serves
        while Redis answers; each model (service = its name) while a worker of it is alive."""
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        while not self._stopping.is_set():
            up = await self.catalog.ping()
            for service in ("", grpc_api.TFS_PREDICTION_SERVICE, grpc_api.OIP_SERVICE):
                await self._health.set(service, serving if up else not_serving)
            if up:
                try:
                    for name in await self.catalog.names():
                        entry = await self.catalog.get(name)
                        alive = entry is not None and entry.available
                        await self._health.set(name, serving if alive else not_serving)
                except RequestError as e:
                    log.warning("health: %s", e)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), HEALTH_INTERVAL_S)
