"""Unit tests of the pod runner's pure parts: what it runs for a pod, the status it reports,
its node, and the bind shim."""

import json
import os
import socket
import subprocess
import sys

import pytest

from e2e.cluster.nodes import KWOK_ANNOTATION

from . import container, node, status
from .shim.sitecustomize import cluster_address, pod_address


def pod(**container_fields) -> dict:
    return {
        "metadata": {"name": "web-0", "namespace": "ns", "uid": "u-1", "labels": {"app": "web"},
                     "annotations": {"note": "hi"}},
        "spec": {"nodeName": "runner", "containers": [{"name": "c", "image": "img", **container_fields}]},
    }


# ---------------------------------------------------------------- container

def test_argv_is_command_then_args_and_needs_a_command():
    assert container.argv({"command": ["sarathi"], "args": ["serve", "--port", "8000"]}) == ["sarathi", "serve", "--port", "8000"]
    with pytest.raises(container.Unsupported, match="explicit command"):
        container.argv({"args": ["serve"]})


@pytest.mark.parametrize("change, complaint", [
    (lambda p: p["spec"]["containers"].append({"name": "sidecar"}), "exactly one container"),
    (lambda p: p["spec"].update(initContainers=[{"name": "init"}]), "init containers"),
    (lambda p: p["spec"]["containers"][0].update(envFrom=[{"configMapRef": {"name": "x"}}]), "envFrom"),
])
def test_what_the_runner_does_not_emulate_is_refused(change, complaint):
    p = pod(command=["true"])
    change(p)
    with pytest.raises(container.Unsupported, match=complaint):
        container.the_container(p)


def test_pod_env_resolves_values_field_refs_and_secrets():
    p = pod(env=[
        {"name": "PLAIN", "value": "1"},
        {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "NOTE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['note']"}}},
        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "admin", "key": "token"}}},
        {"name": "MAYBE", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k", "optional": True}}},
    ])
    secrets = {("ns", "admin"): {"token": "s3cret"}}
    env = container.pod_env(p, p["spec"]["containers"][0], "127.3.0.2", lambda ns, name: secrets.get((ns, name)))
    assert env == {"PLAIN": "1", "NAME": "web-0", "APP": "web", "NOTE": "hi", "IP": "127.3.0.2", "TOKEN": "s3cret"}


@pytest.mark.parametrize("source, complaint", [
    ({"secretKeyRef": {"name": "gone", "key": "k"}}, "secret 'gone' key 'k' not found"),
    ({"configMapKeyRef": {"name": "c", "key": "k"}}, "configMapKeyRef is not supported"),
    ({"fieldRef": {"fieldPath": "status.phase"}}, "fieldRef status.phase is not supported"),
])
def test_pod_env_refuses_what_it_cannot_resolve(source, complaint):
    p = pod(env=[{"name": "X", "valueFrom": source}])
    with pytest.raises(container.Unsupported, match=complaint):
        container.pod_env(p, p["spec"]["containers"][0], "127.3.0.2", lambda ns, name: None)


def test_image_env_is_the_checkouts_and_never_the_runners_credentials(tmp_path):
    env = container.image_env({"PATH": "/usr/bin", "HOME": "/root", "KUBECONFIG": "/admin", "SARATHI_CACHE": "/c",
                               "SECRET": "x"}, tmp_path)
    assert env["PATH"] == f"{tmp_path}:/usr/bin"
    assert env["PYTHONPATH"] == str(container.SHIM_DIR)
    assert {k: env[k] for k in ("HOME", "SARATHI_CACHE")} == {"HOME": "/root", "SARATHI_CACHE": "/c"}
    assert "KUBECONFIG" not in env and "SECRET" not in env


def test_claim_mounts_move_paths_under_them_to_the_bound_volume():
    p = pod(command=["sarathi"], volumeMounts=[
        {"name": "model", "mountPath": "/models/", "readOnly": True},
        {"name": "sub", "mountPath": "/models/extra", "subPath": "x"},
        {"name": "shm", "mountPath": "/dev/shm"}])
    p["spec"]["volumes"] = [{"name": "model", "persistentVolumeClaim": {"claimName": "cache"}},
                            {"name": "sub", "persistentVolumeClaim": {"claimName": "other"}},
                            {"name": "shm", "emptyDir": {"medium": "Memory"}}]
    asked = []

    def claim_path(namespace, claim):
        asked.append((namespace, claim))
        return f"/srv/{claim}"

    mounts = container.claim_mounts(p, p["spec"]["containers"][0], claim_path)
    assert mounts == {"/models": "/srv/cache", "/models/extra": "/srv/other/x"}
    assert asked == [("ns", "cache"), ("ns", "other")]
    assert container.under_mounts("/models/org/m", mounts) == "/srv/cache/org/m"
    assert container.under_mounts("/models", mounts) == "/srv/cache"
    assert container.under_mounts("/models/extra/a", mounts) == "/srv/other/x/a", "the longest mount wins"
    assert container.under_mounts("/modelsx", mounts) == "/modelsx"
    assert container.under_mounts("--local-dir", mounts) == "--local-dir"


def test_probe_resolves_named_ports_and_the_apis_defaults():
    c = {"ports": [{"name": "http", "containerPort": 8000}],
         "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5}}
    assert container.probe(c, "readinessProbe") == container.Probe("/ready", 8000, 5, 1, 3, 1, 0)
    assert container.probe(c, "startupProbe") is None
    with pytest.raises(container.Unsupported, match="httpGet probes only"):
        container.probe({"readinessProbe": {"exec": {"command": ["true"]}}}, "readinessProbe")
    with pytest.raises(container.Unsupported, match="no container port named 'metrics'"):
        container.probe({"readinessProbe": {"httpGet": {"port": "metrics"}}}, "readinessProbe")


def test_grace_is_the_deletions_then_the_pods():
    p = pod()
    p["spec"]["terminationGracePeriodSeconds"] = 120
    assert container.grace_seconds(p) == 120
    p["metadata"]["deletionGracePeriodSeconds"] = 0
    assert container.grace_seconds(p) == 0


# ---------------------------------------------------------------- status

def running(**kw) -> status.Container:
    return status.Container("c", "img", state={"running": {"startedAt": "t0"}}, **kw)


@pytest.mark.parametrize("policy, code, expected", [
    ("Never", 0, "Succeeded"), ("Never", 3, "Failed"), ("OnFailure", 0, "Succeeded"),
])
def test_an_exit_that_is_not_restarted_ends_the_pod(policy, code, expected):
    c = status.Container("c", "img", state=status.terminated_state(code, "t0", "t1", "id"))
    assert status.phase(policy, c) == expected


def test_phase_is_pending_until_the_container_first_runs_then_running_through_restarts():
    assert status.phase("Always", status.Container("c", "img")) == "Pending"
    assert status.phase("Always", running()) == "Running"
    backoff = status.Container("c", "img", state={"waiting": {"reason": "CrashLoopBackOff"}},
                               last_state=status.terminated_state(1, "t0", "t1", "id"))
    assert status.phase("Always", backoff) == "Running"
    assert status.restarts("Always", 0) and status.restarts("OnFailure", 1) and not status.restarts("OnFailure", 0)


def test_killed_by_a_signal_is_exit_code_128_plus_the_signal():
    assert status.terminated_state(-15, "t0", "t1", "id")["terminated"] == {
        "exitCode": 143, "reason": "Error", "startedAt": "t0", "finishedAt": "t1", "containerID": "id"}
    assert status.terminated_state(0, "t0", "t1", "id")["terminated"]["reason"] == "Completed"


def test_conditions_keep_their_transition_time_until_they_flip():
    first = status.conditions([], "t0", {"Ready": False, "PodScheduled": True})
    second = status.conditions(first, "t1", {"Ready": True, "PodScheduled": True})
    assert second == [{"type": "Ready", "status": "True", "lastTransitionTime": "t1"},
                      {"type": "PodScheduled", "status": "True", "lastTransitionTime": "t0"}]


def test_pod_is_ready_only_while_its_ready_container_runs():
    ready = status.pod_status({}, "t0", "127.3.0.2", "t0", "Always", running(ready=True, started=True))
    assert {c["type"]: c["status"] for c in ready["conditions"]}["Ready"] == "True"
    assert ready["podIP"] == "127.3.0.2" and ready["containerStatuses"][0]["ready"] is True
    exited = status.Container("c", "img", state=status.terminated_state(1, "t0", "t1", "id"), ready=True)
    gone = status.pod_status(ready, "t1", "127.3.0.2", "t0", "Never", exited)
    assert {c["type"]: c["status"] for c in gone["conditions"]}["Ready"] == "False"
    assert gone["phase"] == "Failed"


# ---------------------------------------------------------------- node

def test_node_is_a_tainted_gpu_node_kwok_leaves_alone():
    n = node.node_manifest("runner-a", "127.3.4.0/24", "t0")
    assert KWOK_ANNOTATION not in n["metadata"]["annotations"]
    assert n["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert n["spec"]["taints"] == [{"key": node.TAINT_KEY, "value": "runner-a", "effect": "NoSchedule"}]
    assert {c["type"]: c["status"] for c in n["status"]["conditions"]}["Ready"] == "True"
    selector, tolerations = node.pod_placement("runner-a")
    assert selector == {"kubernetes.io/hostname": "runner-a"}
    assert tolerations[0]["key"] == node.TAINT_KEY and tolerations[0]["value"] == "runner-a"


def test_pod_cidrs_and_ips_are_the_first_free_ones():
    assert node.free_pod_cidr(set()) == "127.3.0.0/24"
    assert node.free_pod_cidr({"127.3.0.0/24", "127.1.0.0/16"}) == "127.3.1.0/24"
    assert node.free_pod_ip("127.3.1.0/24", set()) == "127.3.1.2"
    assert node.free_pod_ip("127.3.1.0/24", {"127.3.1.2"}) == "127.3.1.3"


def test_service_account_kubeconfig_keeps_the_cluster_and_only_the_token():
    admin = {"current-context": "b",
             "contexts": [{"name": "a", "context": {"cluster": "x", "user": "admin"}},
                          {"name": "b", "context": {"cluster": "y", "user": "admin"}}],
             "clusters": [{"name": "x", "cluster": {"server": "https://x"}}, {"name": "y", "cluster": {"server": "https://y"}}],
             "users": [{"name": "admin", "user": {"client-key-data": "KEY"}}]}
    conf = node.service_account_kubeconfig(admin, "tok", "ns")
    assert conf["clusters"] == [{"name": "y", "cluster": {"server": "https://y"}}]
    assert conf["users"] == [{"name": "pod", "user": {"token": "tok"}}]
    assert "KEY" not in str(conf)


# ---------------------------------------------------------------- bind shim

def test_shim_narrows_ipv4_wildcards_to_the_pod_ip():
    assert pod_address(socket.AF_INET, ("0.0.0.0", 8000), "127.3.0.2") == ("127.3.0.2", 8000)
    assert pod_address(socket.AF_INET, ("", 8000), "127.3.0.2") == ("127.3.0.2", 8000)
    assert pod_address(socket.AF_INET, ("127.0.0.1", 8000), "127.3.0.2") == ("127.0.0.1", 8000)
    assert pod_address(socket.AF_INET6, ("::", 8000, 0, 0), "127.3.0.2") == ("::", 8000, 0, 0)


def test_shim_is_loaded_by_python_processes_with_it_on_their_path():
    code = "import socket; s = socket.socket(); s.bind(('0.0.0.0', 0)); print(s.getsockname()[0])"
    env = {**os.environ, "PYTHONPATH": str(container.SHIM_DIR), container.POD_IP_ENV: "127.3.255.254"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "127.3.255.254"


def test_pods_with_a_subdomain_have_the_dns_name_cluster_dns_gives_them():
    p = pod()
    assert container.dns_name(p) is None
    p["spec"].update(hostname="chat-lws-0", subdomain="chat-lws")
    assert container.dns_name(p) == f"chat-lws-0.chat-lws.{p['metadata']['namespace']}.svc.cluster.local"
    del p["spec"]["hostname"]
    assert container.dns_name(p).startswith(f"{p['metadata']['name']}.chat-lws.")


def test_shim_finds_cluster_names_through_the_namespaces_search_domains():
    table = {"chat-lws-0.chat-lws.ns.svc.cluster.local": "127.3.0.4"}
    for name in ("chat-lws-0.chat-lws", "chat-lws-0.chat-lws.ns", "chat-lws-0.chat-lws.ns.svc",
                 "chat-lws-0.chat-lws.ns.svc.cluster.local", "chat-lws-0.chat-lws.ns.svc.cluster.local."):
        assert cluster_address(name, "ns", table) == "127.3.0.4", name
    assert cluster_address("chat-lws-0.chat-lws", "other", table) is None, "another namespace's search domains"
    assert cluster_address("chat-lws-0.chat-lws.", "ns", table) is None, "a trailing dot is not searched"
    assert cluster_address("example.com", "ns", table) is None and cluster_address(None, "ns", table) is None


def test_shim_resolves_the_runners_pods_before_the_system_resolver(tmp_path):
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps({"chat-lws-0.chat-lws.ns.svc.cluster.local": "127.3.0.4"}))
    code = ("import socket; print(socket.getaddrinfo('chat-lws-0.chat-lws.ns', 29500)[0][4][0], "
            "socket.gethostbyname('chat-lws-0.chat-lws'), socket.gethostbyname('127.0.0.1'))")
    env = {**os.environ, "PYTHONPATH": str(container.SHIM_DIR), container.HOSTS_ENV: str(hosts),
           container.NAMESPACE_ENV: "ns"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["127.3.0.4", "127.3.0.4", "127.0.0.1"]
