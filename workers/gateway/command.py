"""``tfpool gateway``: its arguments, and the process's main. Light to import: the CLI
builds every subcommand's parser, and only this one needs gRPC and aiohttp."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

_OPTIONS = ("redis_url", "host", "grpc_port", "rest_port", "timeout_s", "max_message_mb")


def add_parser(commands: Any) -> None:
    """Add ``gateway`` to the CLI's subcommands (``commands``, from add_subparsers)."""
    parser = commands.add_parser(
        "gateway", help="speak TF Serving's and KServe v2's gRPC and REST APIs for the pool"
    )
    parser.add_argument("--config", help="TOML file with a [gateway] table")
    parser.add_argument("--redis-url", help="Redis URL (default: TFPOOL_REDIS_URL)")
    parser.add_argument("--host", help="address to listen on (default: 0.0.0.0)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port (default: 8500; 0: any free)")
    parser.add_argument("--rest-port", type=int, help="HTTP port (default: 8501; 0: any free)")
    parser.add_argument(
        "--timeout-s", type=float, help="wait for an answer without a gRPC deadline (default: 30)"
    )
    parser.add_argument("--max-message-mb", type=int, help="largest message (default: 64)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT, then let the calls under way finish."""
    from workers.gateway.server import GatewayConfig, GatewayServer

    try:
        config = GatewayConfig.load(
            config_file=args.config, overrides={k: getattr(args, k) for k in _OPTIONS}
        )
    except (OSError, ValueError) as e:
        print(f"tfpool gateway: {e}", file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        server = GatewayServer(config)
        try:
            await server.start()
        except OSError as e:  # a port in use, most often
            print(f"tfpool gateway: cannot listen: {e}", file=sys.stderr)
            await server.stop(0)
            raise SystemExit(2) from e
        print(
            f"tfpool gateway: gRPC on port {server.grpc_port}, REST on port {server.rest_port}",
            flush=True,
        )
        try:
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(main())
    return 0
