"""Unit tests of the cluster package's pure parts: go.mod generation, stamps, manifests, command lines."""

from pathlib import Path

import yaml

from e2e.cluster import build, components, lws, nodes, pki
from e2e.cluster.layout import PORT_OFFSETS, Layout

RELEASE_GOMOD = """module k8s.io/kubernetes

go 1.26.0

godebug default=go1.26

require (
	k8s.io/api v0.0.0
	k8s.io/client-go v0.0.0
)

replace (
	github.com/example/fork => github.com/example/fork v1.2.3
	k8s.io/api => ./staging/src/k8s.io/api
	k8s.io/client-go => ./staging/src/k8s.io/client-go
)
"""


def test_gomod_replaces_exactly_the_staging_modules_with_published_versions():
    gomod = build.render_gomod(RELEASE_GOMOD, "v1.36.3", "v3.6.8")
    assert "\tk8s.io/api => k8s.io/api v0.36.3" in gomod
    assert "\tk8s.io/client-go => k8s.io/client-go v0.36.3" in gomod
    assert "github.com/example/fork" not in gomod
    assert "\tk8s.io/kubernetes v1.36.3" in gomod and "\tgo.etcd.io/etcd/server/v3 v3.6.8" in gomod
    assert "go 1.26.0" in gomod and "godebug default=go1.26" in gomod


def test_tools_go_names_every_kube_binary():
    packages = build.tool_packages((build.GOMOD_DIR / "tools.go").read_text())
    names = {"etcd" if p.startswith("go.etcd.io/") else p.rsplit("/", 1)[1] for p in packages}
    assert names == set(build.KUBE_BINARIES)


def test_kube_ldflags_stamp_both_version_packages():
    flags = build.kube_ldflags("v1.36.3", "2026-07-22T18:07:38Z")
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        assert f"-X {pkg}.gitVersion=v1.36.3" in flags
        assert f"-X {pkg}.gitMajor=1" in flags and f"-X {pkg}.gitMinor=36" in flags


def test_gpu_node_offers_eight_gpus_and_is_managed_by_kwok():
    node = nodes.gpu_node("gpu-node-0")
    assert node["status"]["allocatable"][nodes.GPU_RESOURCE] == "8"
    assert node["metadata"]["annotations"][nodes.KWOK_ANNOTATION] == "fake"
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == nodes.GPU_PRODUCT


def test_kwok_stages_cover_node_and_pod_lifecycles():
    stages = [d for d in yaml.safe_load_all(nodes.STAGES.read_text())]
    kinds = {(s["spec"]["resourceRef"]["kind"], s["metadata"]["name"]) for s in stages}
    assert ("Node", "node-initialize") in kinds and ("Pod", "pod-ready") in kinds and ("Pod", "pod-delete") in kinds


def test_components_listen_on_distinct_ports_of_their_layout():
    layout = Layout(Path("/tmp/x"), base_port=30000)
    assert len({layout.port(n) for n in PORT_OFFSETS}) == len(PORT_OFFSETS)
    argv = components.kube_apiserver(layout, Path("/bin"))
    assert "--secure-port=30000" in argv and f"--etcd-servers=http://127.0.0.1:{layout.port('etcd')}" in argv


def test_kubeconfig_embeds_credentials():
    conf = pki.kubeconfig("https://127.0.0.1:1", "c", "u", b"CA", b"CERT", b"KEY")
    assert conf["clusters"][0]["cluster"]["certificate-authority-data"] == "Q0E="
    assert conf["users"][0]["user"]["client-key-data"] == "S0VZ"
    assert conf["current-context"] == "c"


LWS_MANIFESTS = """apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: mutating-webhook-configuration}
webhooks:
- name: mleaderworkerset.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /mutate-leaderworkerset-x-k8s-io-v1-leaderworkerset}}
  rules: [{apiGroups: [leaderworkerset.x-k8s.io], apiVersions: [v1], operations: [CREATE], resources: [leaderworkersets]}]
- name: mpod.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /mutate--v1-pod}}
  rules: [{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods]}]
"""


def test_lws_webhooks_call_the_controller_on_loopback_and_pods_only_of_leader_worker_sets():
    [config] = lws.webhook_configurations(LWS_MANIFESTS, "https://127.0.0.1:26449", b"CA")
    assert config["metadata"]["name"] == "lws-mutating-webhook-configuration"
    sets, pods = config["webhooks"]
    assert sets["clientConfig"] == {"url": "https://127.0.0.1:26449/mutate-leaderworkerset-x-k8s-io-v1-leaderworkerset",
                                    "caBundle": "Q0E="}
    assert pods["clientConfig"]["url"].endswith("/mutate--v1-pod")
    assert "objectSelector" not in sets
    assert pods["objectSelector"] == {"matchExpressions": [{"key": lws.SET_NAME_LABEL, "operator": "Exists"}]}


def test_lws_controller_listens_on_the_layouts_ports_without_leader_election_or_its_own_certificates():
    layout = Layout(Path("/state"), base_port=30000)
    config = lws.controller_config(layout, Path("/certs"))
    assert config["webhook"] == {"host": "127.0.0.1", "port": 30006, "certDir": "/certs"}
    assert config["health"]["healthProbeBindAddress"] == "127.0.0.1:30007"
    assert components.health_url("lws-controller", layout) == "http://127.0.0.1:30007/healthz"
    assert config["leaderElection"] == {"leaderElect": False} and config["internalCertManagement"] == {"enable": False}
    assert config["metrics"] == {"bindAddress": "0"}
