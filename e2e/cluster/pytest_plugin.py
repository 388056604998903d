"""pytest plugin: the session-scoped `kube_cluster` fixture and the `cluster` marker.

With $KUBECONFIG set, tests use that cluster (kind, a real one) and never stop it. Otherwise
they use the local cluster in the default state directory: one already running is reused; if
none is, the session starts it. At the end a session stops the cluster only if a pytest
session started it and no other session still uses it (each holds a shared lock on a file
beside the state); one started by `make cluster-up` is left running.
"""

import fcntl
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
    started: bool  # this pytest session started it

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
        """Run kubectl or helm against this cluster; output captured as text. With `check`, a
        failure raises with the tool's stderr in the message, where the test report shows it."""
        result = subprocess.run([_tool(tool), *args], input=input, env=self.env, capture_output=True,
                                text=True, timeout=120)
        if check and result.returncode:
            raise ToolFailed(result.returncode, result.args, result.stdout, result.stderr)
        return result

    def kubectl_run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("kubectl", *args, **kw)

    def wait_established(self, *crds: str, timeout: float = 60) -> None:
        """Returns once these CustomResourceDefinitions' APIs are served."""
        cluster.wait_established(lambda *args: self.kubectl_run(*args, check=False), crds, timeout)


class ToolFailed(subprocess.CalledProcessError):
    """A CalledProcessError whose message ends with the tool's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr.strip()}"


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
    layout = Layout.default()
    external = os.environ.get("KUBECONFIG")
    if external:
        kubeconfig = Path(external.split(os.pathsep)[0])
        _check_reachable(kubeconfig)
        yield KubeCluster(kubeconfig, local=kubeconfig.resolve() == layout.kubeconfig.resolve(), started=False)
        return
    layout.state.parent.mkdir(parents=True, exist_ok=True)
    with open(layout.side_file("users"), "a") as users:
        with cluster.locked(layout):
            started = not cluster.running(layout)
            if started:
                with _uncaptured(request.config):
                    cluster.up(layout, started_by="pytest")
            fcntl.flock(users, fcntl.LOCK_SH)
        try:
            yield KubeCluster(layout.kubeconfig, local=True, started=started)
        finally:
            with cluster.locked(layout):
                if _last_user(users) and cluster.owner(layout) == "pytest":
                    with _uncaptured(request.config):
                        cluster.down(layout)


def _last_user(users) -> bool:
    """Turn our shared lock exclusive: that succeeds only when no other session holds one."""
    try:
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _check_reachable(kubeconfig: Path) -> None:
    from kubernetes import client

    try:
        with cluster.api_client(kubeconfig) as api:
            client.VersionApi(api).get_code(_request_timeout=10)
    except Exception as e:
        raise RuntimeError(f"KUBECONFIG={kubeconfig} is set but its cluster does not answer ({e}); "
                           "unset KUBECONFIG to let the tests start a local cluster") from e
