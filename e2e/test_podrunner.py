"""The local pod runner (e2e/podrunner) against the cluster, with small Python processes:
pods run on their own IP and turn Ready when their probe passes, exit codes and restarts show
in the pod status, deletion is SIGTERM then SIGKILL, and a pod gets its ServiceAccount's
identity. The engines themselves are in test_serving.py."""

import json
import time
import urllib.request
import uuid

import pytest

from e2e.test_operator import Cluster, wait_until

HTTP_AFTER_2S = ("import http.server, time; time.sleep(2); "
                 "http.server.HTTPServer(('0.0.0.0', 8000), http.server.SimpleHTTPRequestHandler).serve_forever()")


@pytest.fixture(scope="module")
def k(kube_cluster) -> Cluster:
    return Cluster(kube_cluster)


@pytest.fixture(scope="module")
def namespace(k, pod_runner):
    name = f"podrunner-{uuid.uuid4().hex[:8]}"
    k.run("create", "namespace", name)
    k.run("create", "secret", "generic", "creds", "-n", name, "--from-literal=token=s3cret")
    yield name
    k.run("delete", "namespace", name, "--wait=false")


def run_pod(k: Cluster, runner, namespace: str, name: str, code: str, **spec) -> None:
    node_selector, tolerations = runner.placement()
    container = {"name": "main", "image": "python", "command": ["python", "-c", code], **spec.pop("container", {})}
    k.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
             "spec": {"nodeSelector": node_selector, "tolerations": tolerations, "containers": [container], **spec}})


def pod_status(k: Cluster, namespace: str, name: str) -> dict:
    return (k.get("pod", namespace, name) or {}).get("status", {})


def ready(status: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))


def log_of(runner, namespace: str, name: str) -> str:
    path = runner.log_path(namespace, name)
    return path.read_text() if path else ""


def test_pod_serves_on_its_own_ip_and_is_ready_once_its_probe_passes(k, pod_runner, namespace):
    probe = {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}
    run_pod(k, pod_runner, namespace, "web", HTTP_AFTER_2S,
            container={"ports": [{"name": "http", "containerPort": 8000}], "readinessProbe": probe})
    running = wait_until("web running", lambda: (lambda s: s.get("phase") == "Running" and s)(pod_status(k, namespace, "web")))
    assert not ready(running), "not ready while the server has not started"
    status = wait_until("web ready", lambda: (lambda s: ready(s) and s)(pod_status(k, namespace, "web")), timeout=30)
    ip = status["podIP"]
    assert ip.startswith("127.3.")
    with urllib.request.urlopen(f"http://{ip}:8000/", timeout=5) as resp:
        assert resp.status == 200
    [container] = status["containerStatuses"]
    assert container["ready"] and container["started"] and container["restartCount"] == 0
    assert container["containerID"].startswith("podrunner://") and "running" in container["state"]


def test_env_is_resolved_and_the_exit_code_ends_a_never_restarted_pod(k, pod_runner, namespace):
    code = ("import json, os, sys; "
            "print(json.dumps({k: os.environ.get(k) for k in ('PLAIN', 'NAME', 'TOKEN', 'KUBECONFIG')})); sys.exit(3)")
    env = [{"name": "PLAIN", "value": "1"},
           {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}]
    run_pod(k, pod_runner, namespace, "once", code, restartPolicy="Never", automountServiceAccountToken=False,
            container={"env": env})
    status = wait_until("once failed", lambda: (lambda s: s.get("phase") == "Failed" and s)(pod_status(k, namespace, "once")))
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (3, "Error")
    assert json.loads(log_of(pod_runner, namespace, "once")) == {"PLAIN": "1", "NAME": "once", "TOKEN": "s3cret",
                                                                 "KUBECONFIG": None}


def test_an_always_restarted_pod_restarts_with_its_last_exit_shown(k, pod_runner, namespace):
    run_pod(k, pod_runner, namespace, "crash", "import sys; sys.exit(1)")

    def restarted():
        statuses = pod_status(k, namespace, "crash").get("containerStatuses", [{}])
        return statuses[0].get("restartCount", 0) >= 1 and statuses[0]

    container = wait_until("a restart", restarted, timeout=30)
    assert container["lastState"]["terminated"]["exitCode"] == 1
    assert pod_status(k, namespace, "crash")["phase"] == "Running"
    k.run("delete", "pod", "crash", "-n", namespace, "--wait=false")


def test_deleting_a_pod_sends_sigterm_then_sigkill_after_its_grace_period(k, pod_runner, namespace):
    code = ("import os, signal, time; print(os.getpid(), flush=True); "
            "signal.signal(signal.SIGTERM, lambda *_: print('TERM', flush=True)); time.sleep(600)")
    run_pod(k, pod_runner, namespace, "stubborn", code, terminationGracePeriodSeconds=2)
    wait_until("stubborn running", lambda: pod_status(k, namespace, "stubborn").get("phase") == "Running")
    pid = int(wait_until("its pid", lambda: log_of(pod_runner, namespace, "stubborn").split()[:1])[0])
    start = time.monotonic()
    k.run("delete", "pod", "stubborn", "-n", namespace, "--wait=false")
    wait_until("stubborn gone", lambda: k.get("pod", namespace, "stubborn") is None, timeout=30)
    assert time.monotonic() - start >= 2, "the grace period was given"
    assert "TERM" in log_of(pod_runner, namespace, "stubborn")
    assert not process_exists(pid)


def process_exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] not in "ZX"
    except FileNotFoundError:
        return False


def test_a_pod_the_runner_cannot_create_waits_with_the_reason(k, pod_runner, namespace):
    node_selector, tolerations = pod_runner.placement()
    k.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nocmd", "namespace": namespace},
             "spec": {"nodeSelector": node_selector, "tolerations": tolerations,
                      "containers": [{"name": "main", "image": "python", "args": ["-V"]}]}})

    def waiting():
        statuses = pod_status(k, namespace, "nocmd").get("containerStatuses", [{}])
        return statuses[0].get("state", {}).get("waiting", {}).get("reason") == "CreateContainerConfigError" and statuses[0]

    container = wait_until("CreateContainerConfigError", waiting)
    assert "explicit command" in container["state"]["waiting"]["message"]
    assert pod_status(k, namespace, "nocmd")["phase"] == "Pending"


def test_a_pod_acts_as_its_service_account(k, pod_runner, namespace):
    code = ("from kubernetes import client, config; config.load_kube_config(); "
            "print(client.AuthenticationV1Api().create_self_subject_review({}).status.user_info.username)")
    run_pod(k, pod_runner, namespace, "whoami", code, restartPolicy="Never")
    wait_until("whoami done", lambda: pod_status(k, namespace, "whoami").get("phase") in ("Succeeded", "Failed"))
    assert log_of(pod_runner, namespace, "whoami").strip().splitlines()[-1] == f"system:serviceaccount:{namespace}:default"
