"""pytest plugin: the session-scoped `kube_cluster` fixture and the `cluster` marker.

With $KUBECONFIG set, tests use that cluster (kind, a real one) and never stop it. Otherwise
they use the local cluster in the default state directory: one already running (make
cluster-up) is reused and left running; if none is, the session starts it and stops it at
the end.
"""

import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import build, cluster
from .layout import Layout


@dataclass(frozen=True)
class KubeCluster:
    kubeconfig: Path
    local: bool  # built from source by e2e.cluster (so its server version is the pinned one)
    started: bool  # this pytest session started it and will stop it

    def api_client(self):
        """A new kubernetes.client.ApiClient for this cluster; close it (or use `with`)."""
        return cluster.api_client(self.kubeconfig)

    @property
    def kubectl(self) -> str:
        return _tool("kubectl")

    @property
    def helm(self) -> str:
        return _tool("helm")

    @property
    def env(self) -> dict[str, str]:
        """os.environ with KUBECONFIG pointing at this cluster, for subprocesses."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def run(self, tool: str, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run kubectl or helm against this cluster; output captured as text."""
        return subprocess.run([_tool(tool), *args], input=input, env=self.env, capture_output=True,
                              text=True, check=check, timeout=120)

    def kubectl_run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("kubectl", *args, **kw)


def _tool(name: str) -> str:
    """The pinned binary from the build cache, else one on PATH (e.g. when testing against kind)."""
    built = build.binary(name)
    found = str(built) if built.is_file() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name}: not in {build.bin_dir()} nor on PATH; run `python -m e2e.cluster build`")
    return found


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: needs a Kubernetes cluster (uses the kube_cluster fixture)")
    config.addinivalue_line("markers", "localcluster: starts its own cluster from the built binaries (not on kind)")


def pytest_collection_modifyitems(items):
    for item in items:
        if "kube_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker("cluster")


@contextmanager
def _uncaptured(config):
    """Let build and start-up progress through to the terminal and CI log."""
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        yield
        return
    with capman.global_and_fixture_disabled():
        yield


@pytest.fixture(scope="session")
def kube_cluster(request) -> KubeCluster:
    external = os.environ.get("KUBECONFIG")
    if external:
        kubeconfig = Path(external.split(os.pathsep)[0])
        _check_reachable(kubeconfig)
        yield KubeCluster(kubeconfig, local=False, started=False)
        return
    layout = Layout.default()
    if cluster.running(layout):
        yield KubeCluster(layout.kubeconfig, local=True, started=False)
        return
    with _uncaptured(request.config):
        cluster.up(layout)
    try:
        yield KubeCluster(layout.kubeconfig, local=True, started=True)
    finally:
        with _uncaptured(request.config):
            cluster.down(layout)


def _check_reachable(kubeconfig: Path) -> None:
    from kubernetes import client

    try:
        with cluster.api_client(kubeconfig) as api:
            client.VersionApi(api).get_code(_request_timeout=10)
    except Exception as e:
        raise RuntimeError(f"KUBECONFIG={kubeconfig} is set but its cluster does not answer ({e}); "
                           "unset KUBECONFIG to let the tests start a local cluster") from e
