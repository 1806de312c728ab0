"""`modelloader gateway`: the gateway as its own process on a cluster. It joins the Ray cluster
only to follow the route table the operator publishes (`route_board`), so it serves on while
the operator restarts, and a gateway started while the operator is away serves the last table.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from modelloader_gateway import route_board
from modelloader_gateway.http_v2 import BODY_TIMEOUT_SECONDS, IDLE_TIMEOUT_SECONDS
from modelloader_gateway.server import DRAIN_SECONDS, Gateway, GatewayConfig

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=8081,
        help="the gRPC Open Inference Protocol and grpc.health.v1 (default %(default)s; -1: none)",
    )
    parser.add_argument("--max-request-bytes", type=int, default=64 << 20)
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9090,
        help="Prometheus /metrics port, 0 for none (default %(default)s)",
    )
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT_SECONDS)
    parser.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_SECONDS)
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=DRAIN_SECONDS,
        help="on SIGTERM, how long requests under way may take to be answered "
        "(default %(default)s)",
    )


def config_from(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port if args.grpc_port >= 0 else None,
        metrics_port=args.metrics_port,
        max_request_bytes=args.max_request_bytes,
        idle_timeout_seconds=args.idle_timeout,
        body_timeout_seconds=args.body_timeout,
        drain_seconds=args.drain_seconds,
    )


async def serve(config: GatewayConfig, ray_address: str | None, stop: asyncio.Event) -> None:
    """Serve from the published table until `stop` is set, then drain."""
    await route_board.connect(ray_address, "gateway")
    urgent = asyncio.Event()  # a request waits for a model to wake: report the load now
    gateway = Gateway(config, on_hold=urgent.set)
    await gateway.start()
    try:
        await route_board.follow(gateway.publish, stop, gateway.dataplane.load.report, urgent)
    finally:
        await gateway.close()


async def _main(config: GatewayConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    await route_board.connect(os.environ.get("RAY_ADDRESS"), "gateway")
    # After ray.init, which installs a SIGTERM handler of its own.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, os.environ.get("RAY_ADDRESS"), stop)


def run(args: argparse.Namespace) -> int:
    asyncio.run(_main(config_from(args)))
    return 0
