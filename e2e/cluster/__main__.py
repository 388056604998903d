"""`python -m e2e.cluster {build,up,down,status,gpu-nodes,lws-up,lws-down}`: the command line behind make
cluster-up/-down.

lws-up installs LeaderWorkerSet (CRDs, controller, webhooks) on the running cluster; lws-down removes it.

gpu-nodes prints the fake GPU Node manifests, for putting them on another cluster that runs kwok (kind).
"""

import argparse
import sys
from pathlib import Path

import yaml

from . import build, cluster, lws
from .layout import Layout, default_base_port, default_state_dir
from .nodes import gpu_nodes
from .ui import say


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster", description=__doc__)
    parser.add_argument("command", choices=["build", "up", "down", "status", "gpu-nodes", "lws-up", "lws-down"])
    parser.add_argument("--state-dir", type=Path, default=None, help="default: $SARATHI_CLUSTER_STATE or .cache/cluster")
    parser.add_argument("--port", type=int, default=None, help="base port; default: $SARATHI_CLUSTER_PORT or 26443")
    parser.add_argument("--gpu-nodes", type=int, default=2, help="fake 8-GPU nodes to create (up, gpu-nodes)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds each start-up step may take (up)")
    parser.add_argument("--force", action="store_true", help="rebuild every binary (build)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    layout = Layout(args.state_dir or default_state_dir(), args.port or default_base_port(), args.gpu_nodes)
    try:
        if args.command == "build":
            say(f"binaries in {build.build(force=args.force)}")
        elif args.command == "up":
            with cluster.locked(layout):
                cluster.up(layout, args.timeout)
        elif args.command == "down":
            with cluster.locked(layout):
                cluster.down(layout)
        elif args.command in ("lws-up", "lws-down"):
            with cluster.locked(layout):
                if not cluster.running(layout):
                    raise cluster.ClusterError(f"no cluster running in {layout.state}: `up` first")
                if args.command == "lws-up":
                    lws.install(layout, args.timeout)
                else:
                    lws.uninstall(layout)
        elif args.command == "gpu-nodes":
            print(yaml.safe_dump_all(gpu_nodes(args.gpu_nodes), sort_keys=False), end="")
        else:
            states = cluster.status(layout)
            for name, ok in states.items():
                print(f"{name:24} {'running' if ok else 'DOWN'}")
            if not states:
                print(f"no cluster recorded in {layout.state}")
            return 0 if states and all(states.values()) else 1
    except (build.BuildError, cluster.ClusterError) as e:
        say(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
