"""`sarathi operator`: runs the kopf operator, the periodic resync, the autotuners and the metrics endpoint."""

import argparse
import asyncio
import contextlib
import os

import kopf
from prometheus_client import start_http_server

from . import handlers  # noqa: F401  (registers the handlers)
from .autotune.daemon import Autotuners
from .kube import Kube, load_api_client
from .reconcile import Reconciler


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sarathi operator", description="Reconcile SarathiDeployment resources into running Sarathi engines."
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NAMESPACE",
                       help="watch this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="watch every namespace (the default when no --namespace is given)")
    parser.add_argument("--kubeconfig", help="kubeconfig path (default: in-cluster, then $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--peering", metavar="NAME",
                        help="coordinate with other operator replicas through kopf's peering object NAME "
                             "(needs kopf's peering CRDs); without it the operator runs standalone")
    parser.add_argument("--health-port", type=int, default=8080, help="liveness endpoint port, /healthz (0: off)")
    parser.add_argument("--metrics-port", type=int, default=8081, help="Prometheus /metrics port (0: off)")
    parser.add_argument("--resync-seconds", type=float, default=60.0,
                        help="reconcile every resource at this interval, besides reacting to changes")
    parser.add_argument("--engine-image", default=os.environ.get("SARATHI_ENGINE_IMAGE") or None,
                        help="the engine image of a SarathiDeployment without spec.image "
                             "(default: $SARATHI_ENGINE_IMAGE; none: spec.image is required)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    kube = Kube(load_api_client(args.kubeconfig))
    autotuners = Autotuners(kube, lambda namespace, name: reconciler.reconcile(namespace, name))
    reconciler = Reconciler(kube, on_autotune=autotuners.ensure, engine_image=args.engine_image)
    resync = asyncio.create_task(reconciler.resync_forever(args.namespaces, args.resync_seconds))
    try:
        await kopf.operator(
            clusterwide=not args.namespaces,
            namespaces=args.namespaces or (),
            standalone=args.peering is None,
            peering_name=args.peering,
            liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
            memo=kopf.Memo(reconciler=reconciler),
        )
    finally:
        resync.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await resync
        await autotuners.stop()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # read by the login handler (handlers.py)
    kopf.configure(verbose=args.verbose)
    if args.metrics_port:
        start_http_server(args.metrics_port)
    asyncio.run(run(args))
    return 0
