"""What the local pod runner runs for a pod, read from the pod as the kubelet would: the
container's command line, its environment and its probes, and the part of the pod API the
runner supports.

The image is replaced by this checkout: `command[0]` is looked up on the image's PATH, which
has the checkout's virtualenv first, and the image's own environment is a few variables of
the runner's (never its kubeconfig). With no mount namespace, a mount of a claim bound to a
hostPath or local volume is emulated by rewriting paths under its mountPath in the command,
args and env to the volume's path on this machine. A pod asking for what the runner does not
emulate gets CreateContainerConfigError with the reason, as the kubelet reports a container it
cannot create.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# What a container inherits from "the image": where to find the checkout's tools, the model cache
# and the built CPU kernels, and the OpenBLAS settings some processors here need.
IMAGE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "SARATHI_CACHE", "SARATHI_KERNELS_DIR",
             "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
POD_IP_ENV = "SARATHI_PODRUNNER_POD_IP"
HOSTS_ENV = "SARATHI_PODRUNNER_HOSTS"  # the DNS names of the runner's pods (shim/sitecustomize.py)
NAMESPACE_ENV = "SARATHI_PODRUNNER_NAMESPACE"
SHIM_DIR = Path(__file__).resolve().parent / "shim"

_LABEL_REF = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


class Unsupported(Exception):
    """The pod asks for something the runner does not emulate, or refers to what is missing."""


@dataclass(frozen=True)
class Probe:
    path: str
    port: int
    period: float
    timeout: float
    failures: int
    successes: int
    initial_delay: float


def the_container(pod: dict) -> dict:
    spec = pod["spec"]
    if len(spec["containers"]) != 1:
        raise Unsupported("the local pod runner runs pods of exactly one container")
    if spec.get("initContainers"):
        raise Unsupported("the local pod runner does not run init containers")
    container = spec["containers"][0]
    for key in ("envFrom", "workingDir"):
        if container.get(key):
            raise Unsupported(f"the local pod runner does not support {key}")
    return container


def argv(container: dict) -> list[str]:
    """command + args; there is no image, so there is no ENTRYPOINT to fall back on."""
    if not container.get("command"):
        raise Unsupported("the local pod runner needs an explicit command (there is no image ENTRYPOINT)")
    return list(container["command"]) + list(container.get("args", []))


def field_ref(pod: dict, path: str, pod_ip: str) -> str:
    """The downward API: the value of a `fieldRef.fieldPath` for this pod."""
    meta = pod["metadata"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": pod_ip,
        "status.hostIP": "127.0.0.1",
    }
    if path in simple:
        return simple[path]
    match = _LABEL_REF.match(path)
    if match:
        return meta.get(match[1], {}).get(match[2], "")
    raise Unsupported(f"fieldRef {path} is not supported by the local pod runner")


def pod_env(pod: dict, container: dict, pod_ip: str, read_secret) -> dict[str, str]:
    """The container's `env`, resolved. read_secret(namespace, name) returns the Secret's
    decoded data, or None when it does not exist."""
    env = {}
    for var in container.get("env", []):
        source = var.get("valueFrom")
        if source is None:
            env[var["name"]] = var.get("value", "")
        elif "fieldRef" in source:
            env[var["name"]] = field_ref(pod, source["fieldRef"]["fieldPath"], pod_ip)
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            data = read_secret(pod["metadata"]["namespace"], ref["name"])
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise Unsupported(f"secret {ref['name']!r} key {ref['key']!r} not found")
            env[var["name"]] = data[ref["key"]]
        else:
            raise Unsupported(f"env {var['name']}: {', '.join(source)} is not supported by the local pod runner")
    return env


def claim_mounts(pod: dict, container: dict, claim_path: Callable[[str, str], str]) -> dict[str, str]:
    """Where each mounted persistentVolumeClaim lies on this machine, by mountPath.
    claim_path(namespace, claim) is the path of the volume bound to the claim."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in pod["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
    mounts = {}
    for mount in container.get("volumeMounts", []):
        if mount["name"] in claims:
            host = claim_path(pod["metadata"]["namespace"], claims[mount["name"]])
            mounts[mount["mountPath"].rstrip("/")] = str(Path(host, mount.get("subPath", "")))
    return mounts


def under_mounts(value: str, mounts: dict[str, str]) -> str:
    """value with a path under a mountPath (the longest that matches) moved to where it lies."""
    for mount in sorted(mounts, key=len, reverse=True):
        if value == mount or value.startswith(mount + "/"):
            return mounts[mount] + value[len(mount):]
    return value


def dns_name(pod: dict) -> str | None:
    """The name cluster DNS gives a pod with a subdomain (a headless Service of that name selects
    it): <hostname>.<subdomain>.<namespace>.svc.cluster.local; None without a subdomain."""
    spec, meta = pod["spec"], pod["metadata"]
    if not spec.get("subdomain"):
        return None
    return f"{spec.get('hostname') or meta['name']}.{spec['subdomain']}.{meta['namespace']}.svc.cluster.local"


def image_env(environ: dict[str, str], venv_bin: Path) -> dict[str, str]:
    """The environment "the image" provides: the checkout's virtualenv first on PATH, and the
    bind shim first on PYTHONPATH."""
    env = {k: environ[k] for k in IMAGE_ENV if k in environ}
    env["PATH"] = ":".join(filter(None, [str(venv_bin), env.get("PATH", "/usr/bin:/bin")]))
    env["PYTHONPATH"] = ":".join(filter(None, [str(SHIM_DIR), env.get("PYTHONPATH")]))
    return env


def probe(container: dict, kind: str) -> Probe | None:
    """The container's startupProbe or readinessProbe, with the API's defaults."""
    spec = container.get(kind)
    if spec is None:
        return None
    if "httpGet" not in spec:
        raise Unsupported(f"{kind}: the local pod runner runs httpGet probes only")
    get = spec["httpGet"]
    return Probe(
        path=get.get("path", "/"),
        port=container_port(container, get["port"]),
        period=spec.get("periodSeconds", 10),
        timeout=spec.get("timeoutSeconds", 1),
        failures=spec.get("failureThreshold", 3),
        successes=spec.get("successThreshold", 1),
        initial_delay=spec.get("initialDelaySeconds", 0),
    )


def container_port(container: dict, port: int | str) -> int:
    if isinstance(port, int) or port.isdigit():
        return int(port)
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return declared["containerPort"]
    raise Unsupported(f"no container port named {port!r}")


def grace_seconds(pod: dict) -> float:
    """How long a deleted pod's process has between SIGTERM and SIGKILL."""
    meta_grace = pod["metadata"].get("deletionGracePeriodSeconds")
    if meta_grace is not None:
        return meta_grace
    return pod["spec"].get("terminationGracePeriodSeconds", 30)
