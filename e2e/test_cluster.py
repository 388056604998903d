"""Acceptance tests of the local control plane (issue 6): nodes, scheduling and GC, CRD validation, teardown."""

import ipaddress
import json
import socket
import subprocess
import time
import uuid

import pytest
from kubernetes import client

from e2e.cluster import cluster, versions
from e2e.cluster.layout import POD_CIDR, Layout, default_base_port
from e2e.cluster.proc import start_time

GPU = "nvidia.com/gpu"


def wait_until(what: str, check, timeout: float = 60, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def is_ready(node: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))


@pytest.fixture
def namespace(kube_cluster):
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    with kube_cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": name}})
        wait_until("default service account in the namespace",
                   lambda: core.list_namespaced_service_account(name, field_selector="metadata.name=default").items)
        yield name
        core.delete_namespace(name)


def test_gpu_nodes_ready_and_pinned_server_version(kube_cluster):
    nodes = json.loads(kube_cluster.kubectl_run("get", "nodes", "-o", "json").stdout)["items"]
    gpu_nodes = [n for n in nodes if n["status"].get("allocatable", {}).get(GPU) == "8"]
    assert gpu_nodes, f"no node offers 8 {GPU}: {[n['metadata']['name'] for n in nodes]}"
    for node in gpu_nodes:
        assert is_ready(node), node["metadata"]["name"]
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"

    text = kube_cluster.kubectl_run("version").stdout
    version = json.loads(kube_cluster.kubectl_run("version", "-o", "json").stdout)
    if kube_cluster.local:
        assert f"Server Version: {versions.KUBERNETES}" in text
        assert version["serverVersion"]["gitVersion"] == versions.KUBERNETES
        assert version["clientVersion"]["gitVersion"] == versions.KUBERNETES
    else:
        assert version["serverVersion"]["gitVersion"].startswith("v1.")


def gpu_deployment(name: str, replicas: int, gpus: int) -> dict:
    container = {"name": "engine", "image": "sarathi/engine:test", "resources": {"limits": {GPU: str(gpus)}}}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [container]}},
        },
    }


def test_gpu_deployment_scheduled_running_and_garbage_collected(kube_cluster, namespace):
    with kube_cluster.api_client() as api:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
        apps.create_namespaced_deployment(namespace, gpu_deployment("engine", replicas=3, gpus=2))
        selector = "app=engine"

        def running_pods():
            pods = core.list_namespaced_pod(namespace, label_selector=selector).items
            return pods if len(pods) == 3 and all(p.status.phase == "Running" for p in pods) else None

        pods = wait_until("3 Running pods", running_pods)
        gpu_nodes = {n.metadata.name for n in core.list_node().items if (n.status.allocatable or {}).get(GPU)}
        for pod in pods:
            assert pod.spec.node_name in gpu_nodes
            assert pod.spec.containers[0].resources.limits[GPU] == "2"
            if kube_cluster.local:
                assert ipaddress.ip_address(pod.status.pod_ip) in ipaddress.ip_network(POD_CIDR)

        apps.delete_namespaced_deployment("engine", namespace)
        wait_until("pods garbage-collected", lambda: not core.list_namespaced_pod(namespace, label_selector=selector).items)
        assert not apps.list_namespaced_replica_set(namespace, label_selector=selector).items


def test_pod_asking_more_gpus_than_any_node_has_is_unschedulable(kube_cluster, namespace):
    with kube_cluster.api_client() as api:
        core = client.CoreV1Api(api)
        spec = gpu_deployment("big", replicas=1, gpus=9)["spec"]["template"]["spec"]
        core.create_namespaced_pod(namespace, {"metadata": {"name": "big"}, "spec": spec})

        def unschedulable():
            conds = core.read_namespaced_pod("big", namespace).status.conditions or []
            return next((c for c in conds if c.type == "PodScheduled" and c.reason == "Unschedulable"), None)

        cond = wait_until("PodScheduled=False/Unschedulable", unschedulable)
        assert f"Insufficient {GPU}" in cond.message
        assert core.read_namespaced_pod("big", namespace).status.phase == "Pending"


WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.e2e.sarathi.dev"},
    "spec": {
        "group": "e2e.sarathi.dev",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"spec": {
                    "type": "object",
                    "required": ["model"],
                    "properties": {"model": {"type": "string"}, "replicas": {"type": "integer", "minimum": 1}},
                }},
            }},
        }],
    },
}


def widget(name: str, **spec) -> str:
    return json.dumps({"apiVersion": "e2e.sarathi.dev/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec})


def test_crd_custom_resource_round_trip_and_server_side_validation(kube_cluster, namespace):
    kube_cluster.kubectl_run("apply", "-f", "-", input=json.dumps(WIDGET_CRD))
    try:
        kube_cluster.wait_established("widgets.e2e.sarathi.dev")
        kube_cluster.kubectl_run("apply", "-n", namespace, "-f", "-", input=widget("good", model="smollm2", replicas=2))
        with kube_cluster.api_client() as api:
            got = client.CustomObjectsApi(api).get_namespaced_custom_object(
                "e2e.sarathi.dev", "v1", namespace, "widgets", "good")
        assert got["spec"] == {"model": "smollm2", "replicas": 2}

        bad = kube_cluster.kubectl_run("apply", "-n", namespace, "-f", "-", input=widget("bad", replicas=0), check=False)
        assert bad.returncode != 0
        assert 'The Widget "bad" is invalid' in bad.stderr
        assert "spec.replicas: Invalid value: 0: spec.replicas in body should be greater than or equal to 1" in bad.stderr
        assert 'spec.model: Required value' in bad.stderr
        missing = kube_cluster.kubectl_run("get", "widget", "bad", "-n", namespace, check=False)
        assert missing.returncode != 0 and "NotFound" in missing.stderr
    finally:
        kube_cluster.kubectl_run("delete", "crd", "widgets.e2e.sarathi.dev", "--wait=false", check=False)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_crd_is_established_only_once_its_condition_says_so():
    assert not cluster.established({"metadata": {"name": "new"}})
    assert not cluster.established({"status": {"conditions": None}})  # just created
    assert not cluster.established({"status": {"conditions": [{"type": "NamesAccepted", "status": "True"},
                                                              {"type": "Established", "status": "False"}]}})
    assert cluster.established({"status": {"conditions": [{"type": "Established", "status": "True"}]}})


def test_a_failing_kubectl_says_why_in_the_report(kube_cluster):
    with pytest.raises(subprocess.CalledProcessError) as failure:
        kube_cluster.kubectl_run("get", "nosuchkind")
    stderr = failure.value.stderr.strip()
    assert "nosuchkind" in stderr and stderr in str(failure.value)  # the report shows why, not only the exit status


@pytest.mark.localcluster
def test_down_leaves_no_cluster_process(tmp_path):
    # A second cluster on its own ports and state, so the session's cluster stays up.
    layout = Layout(tmp_path / "state", base_port=default_base_port() + 100, gpu_nodes=1)
    try:
        cluster.up(layout)
        procs = cluster.read_procs(layout)
        assert sorted(p.name for p in procs) == sorted(
            ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"])
        assert all(start_time(p.pid) == p.start_time for p in procs)
        assert port_open(layout.port("kube-apiserver"))
    finally:
        stopped = cluster.down(layout)
    assert {p.pid for p in stopped} == {p.pid for p in procs}
    survivors = [p for p in procs if start_time(p.pid) == p.start_time]
    assert not survivors, f"still running after down: {survivors}"
    assert not port_open(layout.port("kube-apiserver"))
    assert cluster.status(layout) == {}
