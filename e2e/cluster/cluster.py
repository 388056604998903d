"""Brings one local cluster up and down: certificates, daemons, readiness, fake GPU nodes.

State (certificates, kubeconfigs, etcd data, logs, the PIDs of the daemons) lives in the
Layout's state directory; `up` starts from a clean one, `down` stops every recorded process
and checks that none is left.
"""

import fcntl
import json
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

from . import build, components, pki
from .layout import HOST, Layout
from .nodes import gpu_nodes
from .proc import Proc, alive, spawn, stop, tail
from .ui import fmt_duration, say, step


class ClusterError(RuntimeError):
    pass


def _ssl_context(layout: Layout, name: str) -> ssl.SSLContext:
    if name == "kube-apiserver":
        ctx = ssl.create_default_context(cafile=str(layout.pki / "ca.crt"))
        ctx.load_cert_chain(layout.pki / "admin.crt", layout.pki / "admin.key")
        return ctx
    # Controller-manager and scheduler serve a self-signed certificate made at start-up.
    return ssl._create_unverified_context()


def healthy(layout: Layout, name: str) -> bool:
    url = components.health_url(name, layout)
    try:
        ctx = _ssl_context(layout, name) if url.startswith("https") else None
        with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError, ssl.SSLError):
        return False


def _failure(proc: Proc, layout: Layout, why: str) -> ClusterError:
    log = layout.log(proc.name)
    return ClusterError(f"{proc.name} {why}; last lines of {log}:\n{tail(log)}")


def wait_healthy(proc: Proc, layout: Layout, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(proc):
            raise _failure(proc, layout, "exited during start-up")
        if healthy(layout, proc.name):
            return
        time.sleep(0.2)
    raise _failure(proc, layout, f"did not answer {components.health_url(proc.name, layout)} within {timeout:.0f}s")


def wait_for(what: str, check, timeout: float, component: Proc, layout: Layout) -> None:
    """Poll check() until true; on time-out blame `component` and show its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise _failure(component, layout, f"did not bring about '{what}' within {timeout:.0f}s")


def established(crd: dict) -> bool:
    """Whether a CustomResourceDefinition's API is served (its Established condition is True). A
    CRD just created has null conditions, on which `kubectl wait --for=condition=Established` can
    exit at once with an error instead of waiting (knative/operator#2338; a fresh-clone CI run
    here failed so, within a second of the apply)."""
    return any(c.get("type") == "Established" and c.get("status") == "True"
               for c in (crd.get("status") or {}).get("conditions") or [])


def wait_established(kubectl, names, timeout: float) -> None:
    """Polls `kubectl get crd NAMES -o json` until every one of them is established; `kubectl`
    runs kubectl with those arguments and returns the CompletedProcess, failed or not."""
    deadline = time.monotonic() + timeout
    while True:
        result = kubectl("get", "crd", *names, "-o", "json")
        if result.returncode == 0:
            got = json.loads(result.stdout)
            crds = got["items"] if got.get("kind") == "List" else [got]
            if len(crds) == len(names) and all(established(c) for c in crds):
                return
        if time.monotonic() > deadline:
            raise ClusterError(f"CRDs not established after {timeout:.0f}s: {', '.join(names)} "
                               f"({result.stderr.strip() or 'conditions not yet True'})")
        time.sleep(0.25)


def api_client(kubeconfig):
    from kubernetes import config

    return config.new_client_from_config(config_file=str(kubeconfig))


def read_procs(layout: Layout) -> list[Proc]:
    try:
        return [Proc(**p) for p in json.loads(layout.processes.read_text())]
    except FileNotFoundError:
        return []


def write_procs(layout: Layout, procs: list[Proc]) -> None:
    layout.processes.write_text(json.dumps([p.to_json() for p in procs], indent=1))


@contextmanager
def locked(layout: Layout):
    """Hold the cluster's start/stop lock, so concurrent `up`s and `down`s take turns."""
    path = layout.side_file("lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def owner(layout: Layout) -> str | None:
    try:
        return layout.owner.read_text().strip()
    except FileNotFoundError:
        return None


def running(layout: Layout) -> bool:
    procs = read_procs(layout)
    return bool(procs) and all(alive(p) for p in procs) and healthy(layout, "kube-apiserver")


def _check_ports_free(layout: Layout) -> None:
    for name in components.ORDER + ("etcd-peer",):
        with socket.socket() as s:
            # As the servers themselves do, so ports lingering in TIME_WAIT do not count as taken.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, layout.port(name)))
            except OSError as e:
                raise ClusterError(f"port {layout.port(name)} for {name} is taken ({e.strerror}); "
                                   "stop whatever holds it or choose another base port (SARATHI_CLUSTER_PORT)")


def _prepare_state(layout: Layout) -> None:
    shutil.rmtree(layout.state, ignore_errors=True)
    layout.state.mkdir(parents=True)
    pki.make_pki(layout.pki)
    pki.write_kubeconfig(layout.kubeconfig, layout.pki, layout.server, "sarathi-local", "admin")
    for client in ("controller-manager", "scheduler", "kwok"):
        pki.write_kubeconfig(layout.component_kubeconfig(client), layout.pki, layout.server, "sarathi-local", client)


def _nodes_ready(core, count: int) -> bool:
    ready = [n for n in core.list_node().items
             if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])]
    return len(ready) >= count


def _default_service_account(core) -> bool:
    return any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account("default").items)


def _start_daemons(layout: Layout, bin_dir, procs: list[Proc], timeout: float) -> None:
    for name in components.ORDER:
        with step(f"{name} on {HOST}:{layout.port(name)}", every=10):
            env = {"HOME": str(layout.state)} if name == "kwok" else None  # no ~/.kwok config leaks in
            proc = spawn(name, components.ARGV[name](layout, bin_dir), layout.log(name), env)
            procs.append(proc)
            write_procs(layout, procs)
            wait_healthy(proc, layout, timeout)


def _populate(layout: Layout, procs: list[Proc], timeout: float) -> None:
    from kubernetes import client

    by_name = {p.name: p for p in procs}
    with api_client(layout.kubeconfig) as api:
        core = client.CoreV1Api(api)
        with step(f"{layout.gpu_nodes} fake GPU nodes Ready (kwok)", every=10):
            for node in gpu_nodes(layout.gpu_nodes):
                core.create_node(node)
            wait_for("nodes Ready", lambda: _nodes_ready(core, layout.gpu_nodes), timeout, by_name["kwok"], layout)
        with step("default service account", every=10):
            wait_for("ServiceAccount default/default", lambda: _default_service_account(core), timeout,
                     by_name["kube-controller-manager"], layout)


def up(layout: Layout, timeout: float = 120, started_by: str = "cli") -> Layout:
    """Build if needed and start the cluster; a healthy running one is left as it is.

    Callers that may race with others hold locked(layout) around it.
    """
    bin_dir = build.build()
    if running(layout):
        if started_by == "cli":  # asked for by hand: test sessions must now leave it running
            layout.owner.write_text(started_by)
        say(f"cluster already running at {layout.server}")
        return layout
    down(layout, quiet=True)
    _check_ports_free(layout)
    start = time.monotonic()
    say(f"starting a local cluster in {layout.state}")
    _prepare_state(layout)
    procs: list[Proc] = []
    try:
        _start_daemons(layout, bin_dir, procs, timeout)
        _populate(layout, procs, timeout)
    except BaseException:
        stop(list(reversed(procs)))
        layout.processes.unlink(missing_ok=True)
        raise
    layout.owner.write_text(started_by)
    say(f"cluster up in {fmt_duration(time.monotonic() - start)}; to use it:\n"
        f"  export KUBECONFIG={layout.kubeconfig}\n  export PATH={bin_dir}:$PATH")
    return layout


def down(layout: Layout, quiet: bool = False) -> list[Proc]:
    """Stop every recorded daemon, newest first; raise if any survives. Returns those stopped."""
    procs = read_procs(layout)
    left = stop(list(reversed(procs)))
    if left:
        raise ClusterError("still running after SIGKILL: " + ", ".join(f"{p.name} (pid {p.pid})" for p in left))
    layout.processes.unlink(missing_ok=True)
    if not quiet:
        say(f"stopped {len(procs)} processes" if procs else f"no cluster recorded in {layout.state}")
    return procs


def status(layout: Layout) -> dict[str, bool]:
    """Each recorded component and whether its process is alive and its health endpoint answers."""
    return {p.name: alive(p) and healthy(layout, p.name) for p in read_procs(layout)}
