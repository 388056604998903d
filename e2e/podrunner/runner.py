"""The local pod runner: a stand-in kubelet for one node, for tests and the demo only.

It registers its node (node.py) and keeps the node's Lease fresh, and every TICK it lists the
pods bound to that node and, for each, runs the pod's container as a local process of this
checkout (container.py), probes it over HTTP on the pod's IP as the kubelet would, restarts it
per the pod's restartPolicy, and writes the pod status (status.py). A deleted pod's process gets
SIGTERM, then SIGKILL once the pod's grace period is over, and then the runner removes the pod
object, as the kubelet does. Stopping the runner stops every process it started and removes
its node. If the API server stays unreachable for API_PATIENCE, the runner stops by itself.

Not emulated: images, volumes and mounts, liveness probes, resource limits, `kubectl logs`
and `exec` (each pod's output is in <state>/<namespace>_<name>_<uid>/container.log).
"""

import base64
import datetime
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from e2e.cluster.cluster import api_client

from . import container, node, status

log = logging.getLogger("podrunner")

TICK = 0.5
LEASE_RENEW_SECONDS = 10
# The kubelet backs off from 10 s to 5 min; shorter here so tests of restarts stay short.
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0
API_PATIENCE = 60.0
STOP_GRACE = 15.0
TOKEN_SECONDS = 24 * 3600
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def http_ok(ip: str, probe: container.Probe) -> bool:
    try:
        with _http.open(f"http://{ip}:{probe.port}{probe.path}", timeout=probe.timeout) as resp:
            return 200 <= resp.status < 400
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class ProbeState:
    spec: container.Probe
    due: float
    successes: int = 0
    failures: int = 0


class PodProcess:
    """One pod's container as a local process: started, probed, restarted and stopped as the
    kubelet would, keeping what its status is built from."""

    def __init__(self, pod: dict, ip: str, workdir: Path, runner: "Runner"):
        spec = pod["spec"]["containers"][0]
        self.pod, self.ip, self.workdir, self.runner = pod, ip, workdir, runner
        self.container = status.Container(name=spec["name"], image=spec.get("image", ""))
        self.started_at = now_iso()
        self.proc: subprocess.Popen | None = None
        self.proc_started_at = ""
        self.restart_at = 0.0
        self.kill_at: float | None = None
        self.probes: dict[str, ProbeState] = {}
        self.deleted = False  # gone from the API server without passing through termination
        self.reported: dict = {}

    @property
    def key(self) -> str:
        meta = self.pod["metadata"]
        return f"{meta['namespace']}/{meta['name']}"

    @property
    def log(self) -> Path:
        return self.workdir / "container.log"

    @property
    def terminating(self) -> bool:
        return self.deleted or "deletionTimestamp" in self.pod["metadata"]

    @property
    def finished(self) -> bool:
        """Terminating and its process is gone: the pod object can go."""
        return self.terminating and self.proc is None

    def sync(self, pod: dict | None, now: float) -> None:
        if pod is None:
            self.deleted = True
        else:
            self.pod = pod
        self._reap(now)
        if self.terminating:
            self._terminate(now)
        elif self.proc is None and now >= self.restart_at and "terminated" not in self.container.state:
            self._start(now)
        if self.proc is not None and not self.terminating:
            self._probe(now)

    def status(self) -> dict:
        return status.pod_status(self.reported, now_iso(), self.ip, self.started_at,
                                 self.pod["spec"].get("restartPolicy", "Always"), self.container)

    def _start(self, now: float) -> None:
        try:
            spec = container.the_container(self.pod)
            argv = container.argv(spec)
            mounts = container.claim_mounts(self.pod, spec, self.runner.claim_path)
            argv = [container.under_mounts(arg, mounts) for arg in argv]
            env = {**self.runner.image_env,
                   **{k: container.under_mounts(v, mounts)
                      for k, v in container.pod_env(self.pod, spec, self.ip, self.runner.read_secret).items()},
                   container.POD_IP_ENV: self.ip, container.HOSTS_ENV: str(self.runner.hosts_file),
                   container.NAMESPACE_ENV: self.pod["metadata"]["namespace"]}
            if _mounts_service_account_token(self.pod):
                env["KUBECONFIG"] = str(self.runner.write_pod_kubeconfig(self.pod, self.workdir))
            probes = {kind: container.probe(spec, kind) for kind in ("startupProbe", "readinessProbe")}
        except (container.Unsupported, ApiException) as e:
            self._waiting("CreateContainerConfigError", str(e), now)
            return
        exe = shutil.which(argv[0], path=env["PATH"])
        if exe is None:
            self._waiting("RunContainerError", f'exec: "{argv[0]}": executable file not found in $PATH', now)
            return
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([exe, *argv[1:]], env=env, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if self.container.container_id:
            self.container.restart_count += 1
        self.container.container_id = f"podrunner://{uuid.uuid4().hex}"
        self.proc_started_at = now_iso()
        self.container.state = {"running": {"startedAt": self.proc_started_at}}
        self.probes = {kind: ProbeState(p, now + p.initial_delay) for kind, p in probes.items() if p}
        self.container.started = "startupProbe" not in self.probes
        self.container.ready = "readinessProbe" not in self.probes
        log.info("%s: started pid %d on %s: %s", self.key, self.proc.pid, self.ip, " ".join(argv))

    def _waiting(self, reason: str, message: str, now: float) -> None:
        self.container.state = {"waiting": {"reason": reason, "message": message}}
        self.restart_at = now + BACKOFF_MAX / 10

    def _reap(self, now: float) -> None:
        if self.proc is None or self.proc.poll() is None:
            return
        code = self.proc.returncode
        ended = status.terminated_state(code, self.proc_started_at, now_iso(), self.container.container_id)
        log.info("%s: pid %d exited with %d", self.key, self.proc.pid, code)
        self.proc = None
        self.container.started = self.container.ready = False
        policy = self.pod["spec"].get("restartPolicy", "Always")
        if not self.terminating and status.restarts(policy, ended["terminated"]["exitCode"]):
            delay = min(BACKOFF_FIRST * 2 ** self.container.restart_count, BACKOFF_MAX)
            self.container.last_state = ended
            self.container.state = {"waiting": {"reason": "CrashLoopBackOff",
                                                "message": f"back-off {delay:g}s restarting failed container"}}
            self.restart_at = now + delay
        else:
            self.container.state = ended

    def _probe(self, now: float) -> None:
        startup = self.probes.get("startupProbe")
        if startup and not self.container.started:
            if now >= startup.due:
                startup.due = now + startup.spec.period
                if http_ok(self.ip, startup.spec):
                    self.container.started = True
                    if "readinessProbe" in self.probes:
                        self.probes["readinessProbe"].due = now
            return
        readiness = self.probes.get("readinessProbe")
        if readiness is None or now < readiness.due:
            return
        readiness.due = now + readiness.spec.period
        if http_ok(self.ip, readiness.spec):
            readiness.successes, readiness.failures = readiness.successes + 1, 0
            if readiness.successes >= readiness.spec.successes:
                self.container.ready = True
        else:
            readiness.successes, readiness.failures = 0, readiness.failures + 1
            if readiness.failures >= readiness.spec.failures:
                self.container.ready = False

    def _terminate(self, now: float) -> None:
        self.container.ready = False
        if self.proc is None:
            return
        if self.kill_at is None:
            grace = container.grace_seconds(self.pod)
            log.info("%s: SIGTERM to pid %d (grace %ss)", self.key, self.proc.pid, grace)
            self.signal(signal.SIGTERM)
            self.kill_at = now + grace
        elif now >= self.kill_at:
            log.info("%s: SIGKILL to pid %d", self.key, self.proc.pid)
            self.signal(signal.SIGKILL)

    def signal(self, sig: int) -> None:
        """Signal the container's whole process group (it leads its own session)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass


def _mounts_service_account_token(pod: dict) -> bool:
    """Whether the kubelet would mount a ServiceAccount token: the admission plugin adds a
    projected volume with one unless automountServiceAccountToken is false."""
    return any(source.get("serviceAccountToken")
               for volume in pod["spec"].get("volumes", [])
               for source in volume.get("projected", {}).get("sources", []))


class Runner:
    """Start with start(), stop with stop(); `node_name` is the node pods must select."""

    def __init__(self, kubeconfig: Path, node_name: str, state: Path, environ: dict[str, str] | None = None):
        self.kubeconfig = Path(kubeconfig)
        self.node_name = node_name
        self.state = Path(state)
        self.image_env = container.image_env(dict(os.environ if environ is None else environ),
                                             Path(sys.executable).parent)
        self.api = api_client(self.kubeconfig)
        self.core = client.CoreV1Api(self.api)
        self.leases = client.CoordinationV1Api(self.api)
        self.pods: dict[str, PodProcess] = {}
        self.pod_cidr = ""
        self.error: str | None = None
        self._node: dict = {}
        self._hosts: dict[str, str] | None = None
        self._lease_due = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"podrunner-{node_name}", daemon=True)

    # ------------------------------------------------------------ life

    def start(self) -> "Runner":
        self.state.mkdir(parents=True, exist_ok=True)
        self._register()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.api.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def hosts_file(self) -> Path:
        return self.state / "hosts.json"

    def placement(self) -> tuple[dict, list[dict]]:
        """nodeSelector and tolerations for pods meant to run here."""
        return node.pod_placement(self.node_name)

    def log_path(self, namespace: str, name: str) -> Path | None:
        """The output of the newest pod of this name (None if it never ran here)."""
        logs = sorted(self.state.glob(f"{namespace}_{name}_*/container.log"), key=lambda p: p.stat().st_mtime)
        return logs[-1] if logs else None

    def _register(self) -> None:
        self._remove_node()
        while True:
            nodes = self._json(self.core.list_node)["items"]
            cidr = node.free_pod_cidr({n["spec"].get("podCIDR") for n in nodes} - {None})
            self._node = self._json(self.core.create_node, node.node_manifest(self.node_name, cidr, now_iso()))
            # Two runners starting at once may pick the same CIDR: the older node keeps it.
            rivals = [n for n in self._json(self.core.list_node)["items"]
                      if n["spec"].get("podCIDR") == cidr and n["metadata"]["name"] != self.node_name
                      and (n["metadata"]["creationTimestamp"], n["metadata"]["name"])
                      <= (self._node["metadata"]["creationTimestamp"], self.node_name)]
            if not rivals:
                break
            self._remove_node()
        self.pod_cidr = cidr
        self._renew_lease(time.monotonic())
        log.info("node %s registered, pod CIDR %s", self.node_name, cidr)

    def _remove_node(self) -> None:
        """Delete our node, and then the pod objects still bound to it."""
        for call, args in ((self.core.delete_node, (self.node_name,)),
                           (self.leases.delete_namespaced_lease, (self.node_name, node.LEASE_NAMESPACE))):
            try:
                call(*args)
            except ApiException as e:
                if e.status != 404:
                    raise
        for pod in self._pods_on_node():
            self._delete_pod(pod)

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        failing_since = None
        while not self._stop.wait(TICK):
            try:
                self._tick(time.monotonic())
                failing_since = None
            except Exception as e:  # noqa: BLE001  (a stand-in kubelet keeps going, and says why it could not)
                log.exception("tick failed")
                self.error = f"{type(e).__name__}: {e}"
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > API_PATIENCE:
                    log.error("the API server has failed for %.0fs: stopping", API_PATIENCE)
                    break
        self._shutdown()

    def _tick(self, now: float) -> None:
        if now >= self._lease_due:
            self._renew_lease(now)
        listed = {p["metadata"]["uid"]: p for p in self._pods_on_node()}
        for uid, pod in listed.items():
            if uid not in self.pods and "deletionTimestamp" not in pod["metadata"]:
                self.pods[uid] = self._admit(pod)
        for uid, proc in list(self.pods.items()):
            proc.sync(listed.get(uid), now)
            if proc.finished:
                del self.pods[uid]
            else:
                self._report(proc)
        for uid, pod in listed.items():
            if uid not in self.pods:  # its process is gone, or it was deleted before it ever ran here
                self._delete_pod(pod)
        self._write_hosts()

    def _write_hosts(self) -> None:
        """The DNS names of the pods running here, for the shim; replaced whole when they change."""
        hosts = {name: p.ip for p in self.pods.values() if not p.terminating and (name := container.dns_name(p.pod))}
        if hosts != self._hosts:
            tmp = self.hosts_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(hosts))
            tmp.replace(self.hosts_file)
            self._hosts = hosts

    def _admit(self, pod: dict) -> PodProcess:
        meta = pod["metadata"]
        ip = node.free_pod_ip(self.pod_cidr, {p.ip for p in self.pods.values()})
        workdir = self.state / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        workdir.mkdir(parents=True, exist_ok=True)
        return PodProcess(pod, ip, workdir, self)

    def _report(self, proc: PodProcess) -> None:
        new = proc.status()
        if new == proc.reported:
            return
        meta = proc.pod["metadata"]
        try:
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": new},
                                                  _content_type="application/merge-patch+json")
        except ApiException as e:
            if e.status != 404:
                raise
        proc.reported = new

    def _shutdown(self) -> None:
        """Stop every process (SIGTERM, SIGKILL after STOP_GRACE), then the node and its pods."""
        running = [p for p in self.pods.values() if p.proc is not None]
        for p in running:
            p.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for p in running:
            try:
                p.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.signal(signal.SIGKILL)
                p.proc.wait()
        self.pods.clear()
        try:
            self._remove_node()
        except Exception:  # noqa: BLE001  (the API server may be the reason we stop)
            log.exception("could not remove node %s", self.node_name)

    # ------------------------------------------------------------ API

    def _json(self, call, *args, **kw) -> dict:
        return json.loads(call(*args, _preload_content=False, **kw).data)

    def _pods_on_node(self) -> list[dict]:
        return self._json(self.core.list_pod_for_all_namespaces,
                          field_selector=f"spec.nodeName={self.node_name}")["items"]

    def _delete_pod(self, pod: dict) -> None:
        meta = pod["metadata"]
        try:
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], grace_period_seconds=0,
                                            body=client.V1DeleteOptions(
                                                grace_period_seconds=0,
                                                preconditions=client.V1Preconditions(uid=meta["uid"])))
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    def _renew_lease(self, now: float) -> None:
        body = node.lease(self._node, now_micro())
        try:
            self.leases.create_namespaced_lease(node.LEASE_NAMESPACE, body)
        except ApiException as e:
            if e.status != 409:
                raise
            self.leases.patch_namespaced_lease(self.node_name, node.LEASE_NAMESPACE,
                                               {"spec": {"renewTime": body["spec"]["renewTime"]}},
                                               _content_type="application/merge-patch+json")
        self._lease_due = now + LEASE_RENEW_SECONDS

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            secret = self._json(self.core.read_namespaced_secret, name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    def claim_path(self, namespace: str, claim: str) -> str:
        """The path on this machine of the hostPath or local volume bound to a claim."""
        pvc = self._json(self.core.read_namespaced_persistent_volume_claim, claim, namespace)
        volume = pvc["spec"].get("volumeName")
        if pvc.get("status", {}).get("phase") != "Bound" or not volume:
            raise container.Unsupported(f"persistentvolumeclaim {claim!r} is not bound")
        pv = self._json(self.core.read_persistent_volume, volume)["spec"]
        path = (pv.get("hostPath") or pv.get("local") or {}).get("path")
        if not path:
            raise container.Unsupported(f"persistentvolume {volume!r}: the local pod runner mounts hostPath "
                                        "and local volumes only")
        return path

    def write_pod_kubeconfig(self, pod: dict, workdir: Path) -> Path:
        """A kubeconfig with a token of the pod's ServiceAccount, bound to the pod as the
        kubelet's projected token is (it stops working when the pod is deleted)."""
        meta = pod["metadata"]
        request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=[], expiration_seconds=TOKEN_SECONDS,
            bound_object_ref=client.V1BoundObjectReference(api_version="v1", kind="Pod",
                                                           name=meta["name"], uid=meta["uid"])))
        token = self.core.create_namespaced_service_account_token(
            pod["spec"].get("serviceAccountName", "default"), meta["namespace"], request).status.token
        admin = yaml.safe_load(self.kubeconfig.read_text())
        path = workdir / "kubeconfig"
        path.write_text(yaml.safe_dump(node.service_account_kubeconfig(admin, token, meta["namespace"])))
        path.chmod(0o600)
        return path
