"""The `modelloader` command: `local` (the embedded default) and `status`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from modelloader_gateway import main as gateway_main
from modelloader_workers.loading import ExternalDelegate

from modelloader import control_channel
from modelloader.policy import OriginPolicy, parse_policy_spec
from modelloader.resource import ManifestError
from modelloader.sources import default_roots


def default_state_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path.home() / ".cache"
    return base / "modelloader" / "run"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "modelloader" / "models"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelloader", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    commands = parser.add_subparsers(dest="command", required=True)

    local = commands.add_parser(
        "local",
        help="serve LoadedModel manifests from files on this machine",
        description="Read LoadedModel manifests (files or folders), start a local Ray, load the "
        "models and serve them over the Open Inference Protocol. Edits to the files are applied "
        "while running; Ctrl-C stops everything.",
    )
    local.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="YAML files (multi-document) or folders of them",
    )
    local.add_argument("--host", default="127.0.0.1", help="gateway address (default %(default)s)")
    local.add_argument("--port", type=int, default=8080, help="gateway port (default %(default)s)")
    local.add_argument(
        "--grpc-port",
        type=int,
        default=8081,
        help="gateway gRPC port, -1 for none (default %(default)s)",
    )
    local.add_argument(
        "--metrics-port",
        type=int,
        default=9090,
        help="Prometheus /metrics port (default %(default)s)",
    )
    local.add_argument(
        "--model-root",
        action="append",
        type=Path,
        default=None,
        help="a folder file:// models may be read from (repeatable; default: the "
        "folders of the manifests given)",
    )
    local.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="private folder for sockets (default $XDG_RUNTIME_DIR/modelloader/run "
        "or ~/.cache/modelloader/run)",
    )
    local.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="content-addressed model cache (default ~/.cache/modelloader/models)",
    )
    local.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs the local Ray offers (default: all)"
    )
    local.add_argument(
        "--warm-workers",
        type=int,
        default=2,
        help="idle worker processes kept started, each handed to one model (default %(default)s)",
    )
    local.add_argument(
        "--max-request-bytes",
        type=int,
        default=64 << 20,
        help="largest inference request body (default %(default)s)",
    )
    local.add_argument(
        "--allow-source-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a host name, address or network (CIDR) that model sources (http(s), S3 and GCS "
        "endpoints, registries) may reach although it is not public, e.g. 127.0.0.1 "
        "(repeatable; default: public only)",
    )
    _source_flags(local)
    local.add_argument(
        "--idle-timeout",
        type=float,
        default=15.0,
        help="seconds before the gateway closes an idle connection, or one still sending its "
        "headers (default %(default)s)",
    )
    local.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds an inference body may take to arrive (default %(default)s)",
    )

    op = commands.add_parser(
        "operator",
        help="run the Kubernetes operator (kopf) against the cluster",
        description="Reconcile LoadedModels into Ray workers. Kubernetes credentials: in-cluster "
        "service account, else KUBECONFIG; Ray: RAY_ADDRESS.",
    )
    op.add_argument(
        "--model-root",
        action="append",
        type=Path,
        default=[],
        help="a folder file:// models may be read from (repeatable)",
    )
    op.add_argument(
        "--allow-source-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a host name, address or network (CIDR) that model sources (http(s), S3 and GCS "
        "endpoints, registries) may reach although it is not public, e.g. an in-cluster "
        "model store (repeatable)",
    )
    _source_flags(op)
    op.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="watch only these namespaces (repeatable; default: all)",
    )
    op.add_argument(
        "--state-dir",
        type=Path,
        default=Path("/var/run/modelloader"),
        help="folder for the workers' sockets, shared with the gateway",
    )
    op.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="the model cache on each Ray node: every node fetches into its own (default "
        "~/.cache/modelloader/models there)",
    )
    op.add_argument(
        "--npu-resource",
        default="NPU",
        help="the Ray resource NPU nodes advertise (default %(default)s)",
    )
    op.add_argument(
        "--cpu-node-resource",
        default=None,
        help="a Ray resource CPU nodes advertise, to keep CPU models off "
        "accelerator nodes (default: none)",
    )
    op.add_argument(
        "--delegate",
        action="append",
        default=[],
        metavar="CLASS=PATH[:K=V,...]",
        help="a TFLite delegate library for an accelerator class, e.g. "
        "npu=/usr/lib/libedgetpu.so.1:device=usb (repeatable; default: LiteRT's own "
        "GPU and NPU support)",
    )

    op.add_argument(
        "--metrics-port",
        type=int,
        default=9090,
        help="Prometheus /metrics port, 0 for none (default %(default)s)",
    )
    op.add_argument(
        "--worker-transport",
        choices=("tcp", "unix"),
        default="tcp",
        help="how the gateway reaches workers: tcp (any node; default) or unix "
        "(the gateway shares the workers' node and --state-dir)",
    )

    op.add_argument(
        "--default-policy",
        type=Path,
        default=None,
        metavar="FILE",
        help="YAML: the OriginPolicy spec of origins without an OriginPolicy "
        "(default: no limits, perModel isolation, no anonymous calls)",
    )
    op.add_argument(
        "--webhook-port",
        type=int,
        default=0,
        help="serve the validating admission webhook for LoadedModels on this port "
        "(path /validate-loadedmodel; default 0: off)",
    )
    op.add_argument("--webhook-cert", type=Path, default=None, help="TLS certificate (PEM)")
    op.add_argument(
        "--warm-workers",
        type=int,
        default=2,
        help="idle worker processes kept started for CPU models (default %(default)s)",
    )
    op.add_argument("--webhook-key", type=Path, default=None, help="TLS private key (PEM)")

    gw = commands.add_parser(
        "gateway",
        help="serve the v2 API from the route table the operator publishes through Ray",
    )
    gateway_main.add_arguments(gw)

    stat = commands.add_parser(
        "status", help="show the LoadedModels of a running modelloader local"
    )
    stat.add_argument("-o", "--output", choices=("table", "json"), default="table")
    stat.add_argument("--state-dir", type=Path, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "local":
        return _local(args)
    if args.command == "operator":
        return _operator(args)
    if args.command == "gateway":
        return gateway_main.run(args)
    return _status(args)


def _operator(args: argparse.Namespace) -> int:
    from modelloader.control_loop import LoopSettings
    from modelloader.operator_main import OperatorConfig, run_operator
    from modelloader.placement import PlacementConfig
    from modelloader.sources import SourcePolicy

    config = OperatorConfig(
        sources=SourcePolicy(
            roots=tuple(r.resolve() for r in args.model_root),
            cache_dir=(args.cache_dir or default_cache_dir()).resolve(),
            allow_hosts=tuple(args.allow_source_host),
            plain_http_registries=tuple(args.plain_http_registry),
            cache_max_bytes=args.cache_max_bytes,
        ),
        state_dir=args.state_dir.resolve(),
        loop=LoopSettings(
            placement=PlacementConfig(
                npu_resource=args.npu_resource, cpu_resource=args.cpu_node_resource
            ),
            interval_seconds=1.0,
            scan_seconds=10.0,
        ),
        ray_address=os.environ.get("RAY_ADDRESS"),
        namespaces=tuple(args.namespace),
        delegates=dict(parse_delegate(d) for d in args.delegate),
        worker_transport=args.worker_transport,
        metrics_port=args.metrics_port,
        default_policy=_default_policy(args.default_policy),
        webhook_port=args.webhook_port,
        warm_workers=args.warm_workers,
        webhook_cert=args.webhook_cert,
        webhook_key=args.webhook_key,
    )
    asyncio.run(run_operator(config))
    return 0


def _default_policy(path: Path | None) -> OriginPolicy:
    if path is None:
        return OriginPolicy("")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
        return parse_policy_spec(spec)
    except (OSError, yaml.YAMLError, ManifestError, AttributeError) as error:
        raise SystemExit(f"--default-policy {path}: {error}") from None


def _source_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plain-http-registry",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="an OCI registry spoken to over plain HTTP, as `oras --plain-http` (repeatable)",
    )
    parser.add_argument(
        "--cache-max-bytes",
        type=_byte_quantity,
        default=0,
        help="bound on each node's model cache; models no worker uses are evicted, least "
        "recently used first (default 0: unbounded)",
    )


def _byte_quantity(text: str) -> int:
    """Bytes, as a number or a Kubernetes quantity (16Gi)."""
    from modelloader.quantity import parse_quantity

    try:
        return int(parse_quantity(text))
    except (ValueError, ArithmeticError) as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count: {error}") from None


def parse_delegate(text: str) -> tuple[str, ExternalDelegate]:
    """`npu=/path/lib.so:device=usb,x=y` -> ("npu", ExternalDelegate(path, options))."""
    accelerator, _, rest = text.partition("=")
    if accelerator not in ("gpu", "npu") or not rest:
        raise SystemExit(f"--delegate {text!r}: expected gpu=PATH or npu=PATH[:key=value,...]")
    path, _, raw_options = rest.partition(":")
    options = tuple(
        (key, value)
        for key, _, value in (item.partition("=") for item in raw_options.split(",") if item)
    )
    return accelerator, ExternalDelegate(path, options)


def _local(args: argparse.Namespace) -> int:
    from modelloader_gateway.server import GatewayConfig

    from modelloader.local_runtime import LocalConfig, LocalRuntime
    from modelloader.sources import SourcePolicy

    paths = tuple(p.resolve() for p in args.paths)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"modelloader local: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    roots = tuple(r.resolve() for r in args.model_root) if args.model_root else default_roots(paths)
    config = LocalConfig(
        paths=paths,
        state_dir=(args.state_dir or default_state_dir()).resolve(),
        sources=SourcePolicy(
            roots=roots,
            cache_dir=(args.cache_dir or default_cache_dir()).resolve(),
            allow_hosts=tuple(args.allow_source_host),
            plain_http_registries=tuple(args.plain_http_registry),
            cache_max_bytes=args.cache_max_bytes,
        ),
        gateway=GatewayConfig(
            host=args.host,
            port=args.port,
            grpc_port=args.grpc_port if args.grpc_port >= 0 else None,
            metrics_port=args.metrics_port,
            max_request_bytes=args.max_request_bytes,
            idle_timeout_seconds=args.idle_timeout,
            body_timeout_seconds=args.body_timeout,
        ),
        num_cpus=args.num_cpus,
        warm_workers=args.warm_workers,
    )
    try:
        asyncio.run(LocalRuntime(config).run())
    except RuntimeError as error:
        print(f"modelloader local: {error}", file=sys.stderr)
        return 1
    return 0


def _status(args: argparse.Namespace) -> int:
    state_dir = (args.state_dir or default_state_dir()).resolve()
    try:
        data = control_channel.fetch(state_dir)
    except control_channel.ControlUnavailable as error:
        print(f"modelloader status: {error}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(data, indent=2))
        return 0
    print(format_table(data["items"]))
    for problem in data.get("errors", []):
        print(f"warning: {problem}")
    return 0


def format_table(items: Sequence[dict[str, Any]]) -> str:
    """As `kubectl get lm` shows them: READY is replicas serving / wanted."""
    rows = [("NAMESPACE", "NAME", "ORIGIN", "PHASE", "READY", "MESSAGE")]
    rows += [
        (
            i["namespace"],
            i["name"],
            i["origin"],
            i["status"].get("phase", ""),
            i["status"].get("ready", ""),
            i["status"].get("message", ""),
        )
        for i in items
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row[:5])) + "  " + row[5]
        for row in rows
    )


if __name__ == "__main__":
    sys.exit(main())
