"""`python -m e2e.podrunner {run,start,stop}`: a runner in the foreground, or in the background
for the demo (its PID and start time in <state>/runner.json, its own log in <state>/runner.log)."""

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from e2e.cluster.build import REPO
from e2e.cluster.layout import Layout
from e2e.cluster.proc import Proc, alive, spawn, stop, tail

from .runner import Runner


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m e2e.podrunner", description=__doc__)
    parser.add_argument("command", choices=["run", "start", "stop"])
    parser.add_argument("--node", required=True, help="the node to register and run the pods of")
    parser.add_argument("--kubeconfig", type=Path, default=None,
                        help="default: $KUBECONFIG, else the local cluster's (e2e/cluster)")
    parser.add_argument("--state", type=Path, default=None, help="default: .cache/podrunner/<node>")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for the node (start)")
    return parser.parse_args(argv)


def run(runner: Runner) -> int:
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    runner.start()
    while not stopping.wait(1.0) and runner.alive:
        pass
    runner.stop()
    return 0 if stopping.is_set() else 1  # otherwise it stopped by itself (the API server is gone)


def start(args: argparse.Namespace, record: Path) -> int:
    """Start a background runner unless one is running, then wait for its node to be Ready."""
    proc = Proc(**json.loads(record.read_text())) if record.exists() else None
    if proc is None or not alive(proc):
        argv = [sys.executable, "-m", "e2e.podrunner", "run", "--node", args.node,
                "--kubeconfig", str(args.kubeconfig), "--state", str(args.state)]
        proc = spawn("podrunner", argv, args.state / "runner.log", {"PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
        record.write_text(json.dumps(proc.to_json()))
    from kubernetes import client

    from e2e.cluster.cluster import api_client

    deadline = time.monotonic() + args.timeout
    with api_client(args.kubeconfig) as api:
        while time.monotonic() < deadline:
            if not alive(proc):
                print(f"pod runner exited:\n{tail(args.state / 'runner.log')}", file=sys.stderr)
                return 1
            nodes = client.CoreV1Api(api).list_node(field_selector=f"metadata.name={args.node}").items
            if nodes and any(c.type == "Ready" and c.status == "True" for c in nodes[0].status.conditions or []):
                return 0
            time.sleep(0.5)
    print(f"node {args.node} not Ready after {args.timeout:.0f}s:\n{tail(args.state / 'runner.log')}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    args.kubeconfig = (args.kubeconfig or Path(os.environ.get("KUBECONFIG") or Layout.default().kubeconfig)).resolve()
    args.state = (args.state or REPO / ".cache" / "podrunner" / args.node).resolve()
    args.state.mkdir(parents=True, exist_ok=True)
    record = args.state / "runner.json"
    if args.command == "run":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        return run(Runner(args.kubeconfig, args.node, args.state))
    if args.command == "start":
        return start(args, record)
    if record.exists():
        left = stop([Proc(**json.loads(record.read_text()))], timeout=30)
        record.unlink()
        return 1 if left else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
