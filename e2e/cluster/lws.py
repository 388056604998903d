"""LeaderWorkerSet on the local cluster, installed on demand and removed again: its CRDs, its
controller as a local process (built by build.py at versions.LWS), and its webhooks on loopback.

In a real cluster the controller runs in a pod behind a Service and rotates its own
certificate. Here the API server calls the webhooks at https://127.0.0.1:<port> directly, so
the webhook configurations name that URL and the cluster's CA, which signs the controller's
serving certificate, and the controller's own certificate management is off. As LWS's Helm
chart does, the pod webhooks see only pods labelled with a LeaderWorkerSet name, so no other
pod waits on them.

A cluster without it serves no LeaderWorkerSet: the operator then runs multi-pod replicas as
StatefulSets, which is what every other test sees.
"""

import base64
import subprocess
from pathlib import Path

import yaml

from . import build, cluster, pki
from .layout import HOST, Layout
from .proc import spawn, stop
from .ui import say, step

NAME = "lws-controller"
CRDS = ("leaderworkersets.leaderworkerset.x-k8s.io", "disaggregatedsets.disaggregatedset.x-k8s.io")
CRD_FILES = ("leaderworkerset.x-k8s.io_leaderworkersets.yaml", "disaggregatedset.x-k8s.io_disaggregatedsets.yaml")
# The webhook configurations' names in LWS's own kustomize base are generic; its chart prefixes them.
CONFIG_PREFIX = "lws-"
SET_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
# An object the validating and mutating webhooks must both accept, sent with --dry-run=server to
# see that the API server reaches them.
PROBE = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
         "metadata": {"name": "webhook-probe", "namespace": "default"},
         "spec": {"leaderWorkerTemplate": {"size": 2, "workerTemplate": {"spec": {"containers": [
             {"name": "c", "image": "unused"}]}}}}}


def state_dir(layout: Layout) -> Path:
    return layout.state / "lws"


def controller_config(layout: Layout, cert_dir: Path) -> dict:
    """The controller's Configuration: webhooks and health on loopback, no metrics server, no
    leader election (one replica), certificates from cert_dir."""
    return {
        "apiVersion": "config.lws.x-k8s.io/v1alpha1",
        "kind": "Configuration",
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "webhook": {"host": HOST, "port": layout.port("lws-webhook"), "certDir": str(cert_dir)},
        "health": {"healthProbeBindAddress": f"{HOST}:{layout.port(NAME)}"},
        "metrics": {"bindAddress": "0"},
    }


def webhook_configurations(manifests: str, url: str, ca: bytes) -> list[dict]:
    """LWS's webhook configurations, calling url + each webhook's path, trusting ca."""
    out = []
    for config in yaml.safe_load_all(manifests):
        config["metadata"]["name"] = CONFIG_PREFIX + config["metadata"]["name"]
        for hook in config["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": url + path, "caBundle": base64.b64encode(ca).decode()}
            if any("pods" in rule["resources"] for rule in hook["rules"]):
                hook["objectSelector"] = {"matchExpressions": [{"key": SET_NAME_LABEL, "operator": "Exists"}]}
        out.append(config)
    return out


def _kubectl(layout: Layout, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(build.binary("kubectl")), f"--kubeconfig={layout.kubeconfig}", *args],
                          input=stdin, capture_output=True, text=True)


def _checked(result: subprocess.CompletedProcess) -> str:
    if result.returncode:
        raise cluster.ClusterError(f"kubectl {' '.join(result.args[2:4])}: {result.stderr.strip()}")
    return result.stdout


def installed(layout: Layout) -> bool:
    return any(p.name == NAME and cluster.alive(p) for p in cluster.read_procs(layout))


def install(layout: Layout, timeout: float = 120) -> None:
    """CRDs, then the controller (it lists what they define), then the webhooks that call it. A
    running installation is left as it is."""
    if installed(layout):
        say(f"LeaderWorkerSet already installed on {layout.server}")
        return
    build.build()
    lws = build.lws_dir()
    with step(f"LeaderWorkerSet {build.versions.LWS} CRDs", every=10):
        _checked(_kubectl(layout, "apply", "--server-side", *(f"-f={lws / f}" for f in CRD_FILES)))
        cluster.wait_established(lambda *args: _kubectl(layout, *args), CRDS, timeout)
    folder = state_dir(layout)
    certs = folder / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    pki.server_cert(layout.pki, "lws-webhook", "lws-webhook", (f"IP:{HOST}",))
    pki.client_cert(layout.pki, NAME, NAME, "system:masters")
    for suffix in ("crt", "key"):
        (certs / f"tls.{suffix}").write_bytes((layout.pki / f"lws-webhook.{suffix}").read_bytes())
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(controller_config(layout, certs)))
    kubeconfig = pki.write_kubeconfig(folder / "kubeconfig", layout.pki, layout.server, "sarathi-local", NAME)
    with step(f"{NAME} on {HOST}:{layout.port('lws-webhook')}", every=10):
        proc = spawn(NAME, [str(build.binary(NAME)), f"--config={config}"], layout.log(NAME),
                     {"KUBECONFIG": str(kubeconfig)})
        cluster.write_procs(layout, cluster.read_procs(layout) + [proc])
        cluster.wait_healthy(proc, layout, timeout)
    with step("LeaderWorkerSet webhooks", every=10):
        configs = webhook_configurations((lws / "manifests.yaml").read_text(),
                                         f"https://{HOST}:{layout.port('lws-webhook')}",
                                         (layout.pki / "ca.crt").read_bytes())
        _checked(_kubectl(layout, "apply", "--server-side", "-f=-", stdin=yaml.safe_dump_all(configs)))
        cluster.wait_for("the webhooks answer the API server", lambda: _kubectl(
            layout, "create", "--dry-run=server", "-f=-", stdin=yaml.safe_dump(PROBE)).returncode == 0,
            timeout, proc, layout)


def uninstall(layout: Layout) -> None:
    """Every LeaderWorkerSet first, waiting for the garbage collector to remove what they own (it
    cannot tell that an owner of a kind no longer served is gone, so it would keep their
    StatefulSets and pods), then the webhooks (a configuration whose server is gone refuses the
    objects it covers), the CRDs and the controller."""
    with step("LeaderWorkerSet removed", every=10):
        if installed(layout):
            _checked(_kubectl(layout, "delete", "leaderworkersets", "--all", "--all-namespaces",
                              "--cascade=foreground", "--wait"))
        _checked(_kubectl(layout, "delete", "--ignore-not-found",
                          *(f"{kind}webhookconfiguration/{CONFIG_PREFIX}{kind}-webhook-configuration"
                            for kind in ("mutating", "validating"))))
        _checked(_kubectl(layout, "delete", "--ignore-not-found", "--wait", *(f"crd/{c}" for c in CRDS)))
        procs = cluster.read_procs(layout)
        left = stop([p for p in procs if p.name == NAME])
        if left:
            raise cluster.ClusterError(f"{NAME} (pid {left[0].pid}) still running after SIGKILL")
        cluster.write_procs(layout, [p for p in procs if p.name != NAME])
