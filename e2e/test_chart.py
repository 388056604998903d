"""The Helm chart (charts/sarathi-operator) as rendered: lint, the values schema, the CRD and
RBAC kept equal to crds/ and operator/deploy/rbac.yaml, operator args the operator accepts,
and the rendered manifests validated by the API server. Installing it for real is in
test_serving.py."""

import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from e2e.cluster import build
from e2e.test_operator import Cluster
from sarathi_operator.cli import parse_args

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "sarathi-operator"
RBAC = ROOT / "operator" / "deploy" / "rbac.yaml"
NAMESPACED = {"watchNamespaces": ["team-a", "team-b"]}


@pytest.fixture(scope="module")
def helm() -> str:
    """The pinned helm (built with the local cluster's binaries), else one on PATH."""
    pinned = build.binary("helm")
    if pinned.is_file():
        return str(pinned)
    return shutil.which("helm") or str(build.build() / "helm")


def run_helm(helm: str, *args: str, values: dict | None = None, tmp_path: Path, check: bool = True):
    extra = []
    if values is not None:
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        extra = ["-f", str(path)]
    return subprocess.run([helm, *args, *extra], capture_output=True, text=True, check=check, timeout=60)


def render(helm: str, tmp_path: Path, values: dict | None = None, namespace: str = "sarathi-system",
           *flags: str) -> list[dict]:
    out = run_helm(helm, "template", "sarathi-operator", str(CHART), "-n", namespace, *flags,
                   values=values, tmp_path=tmp_path).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def operator_rules() -> list[dict]:
    [role] = [d for d in yaml.safe_load_all(RBAC.read_text()) if d and d["kind"] == "ClusterRole"]
    return role["rules"]


@pytest.mark.parametrize("values", [None, NAMESPACED], ids=["cluster-wide", "namespaced"])
def test_chart_lints_strictly(helm, tmp_path, values):
    result = run_helm(helm, "lint", "--strict", str(CHART), values=values, tmp_path=tmp_path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values, complaint", [
    ({"watchNamespaces": "team-a"}, "/watchNamespaces"),
    ({"watchNamespaces": ["Not_A_Namespace"]}, "/watchNamespaces/0"),
    ({"metrics": {"port": 0}}, "/metrics/port"),
    ({"replicas": 2}, "additional properties 'replicas' not allowed"),
], ids=["not-a-list", "bad-namespace", "port-0", "unknown-key"])
def test_values_schema_rejects_bad_values_naming_them(helm, tmp_path, values, complaint):
    result = run_helm(helm, "lint", str(CHART), values=values, tmp_path=tmp_path, check=False)
    assert result.returncode != 0
    assert complaint in result.stdout + result.stderr


def test_chart_installs_the_operators_crd(helm, tmp_path):
    """The chart's crds/ links to crds/sarathideployments.yaml, the one source; Helm follows
    the link (and `helm package` stores the file)."""
    [crd] = of_kind(render(helm, tmp_path, None, "sarathi-system", "--include-crds"), "CustomResourceDefinition")
    assert crd == yaml.safe_load((ROOT / "crds" / "sarathideployments.yaml").read_text())


def test_cluster_wide_install_grants_the_operators_rules_through_a_cluster_role(helm, tmp_path):
    docs = render(helm, tmp_path)
    [role], [binding] = of_kind(docs, "ClusterRole"), of_kind(docs, "ClusterRoleBinding")
    assert role["rules"] == operator_rules()
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "sarathi-operator", "namespace": "sarathi-system"}]
    assert not of_kind(docs, "Role") and not of_kind(docs, "RoleBinding")


def test_namespaced_install_grants_the_same_rules_in_each_watched_namespace_only(helm, tmp_path):
    docs = render(helm, tmp_path, NAMESPACED)
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    roles, bindings = of_kind(docs, "Role"), of_kind(docs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(r["rules"] == operator_rules() for r in roles)
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert all(b["subjects"][0]["namespace"] == "sarathi-system" for b in bindings)


@pytest.mark.parametrize("values, namespaces", [(None, None), (NAMESPACED, ["team-a", "team-b"])],
                         ids=["cluster-wide", "namespaced"])
def test_operator_container_runs_what_the_operator_accepts(helm, tmp_path, values, namespaces, monkeypatch):
    monkeypatch.delenv("SARATHI_ENGINE_IMAGE", raising=False)
    docs = render(helm, tmp_path, values)
    [deployment] = of_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", (ROOT / "operator" / "Dockerfile").read_text(), re.M)[1]
    assert container["command"] == json.loads(entrypoint), "the chart runs the image's entrypoint"
    args = parse_args(container["args"])
    assert args.namespaces == namespaces
    assert args.engine_image is None  # no default engine image unless the values give one
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (args.health_port, args.metrics_port) == (ports["health"], ports["metrics"])
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert pod["serviceAccountName"] == "sarathi-operator"
    assert pod["securityContext"]["runAsNonRoot"] and not container["securityContext"]["allowPrivilegeEscalation"]
    [service] = of_kind(docs, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8081, "targetPort": "metrics"}]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.fixture(scope="module")
def k(kube_cluster) -> Cluster:
    return Cluster(kube_cluster)


@pytest.fixture(scope="module")
def namespace(k):
    """Server-side dry runs create nothing, so nothing needs waiting for when it goes."""
    name = f"chart-{uuid.uuid4().hex[:8]}"
    k.run("create", "namespace", name)
    yield name
    k.run("delete", "namespace", name, "--wait=false")


def test_the_engine_image_value_becomes_the_operators_default_engine_image(helm, tmp_path):
    docs = render(helm, tmp_path, {"engineImage": "registry.example/sarathi-engine:1.0"})
    [deployment] = of_kind(docs, "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert parse_args(container["args"]).engine_image == "registry.example/sarathi-engine:1.0"


def test_notes_tell_what_to_apply_next(helm, kube_cluster, tmp_path):
    """NOTES.txt is rendered only by install; even a client dry run asks a cluster its version."""
    notes = run_helm(helm, "install", "sarathi-operator", str(CHART), "--dry-run=client", "-n", "ops",
                     "--kubeconfig", str(kube_cluster.kubeconfig), values=NAMESPACED, tmp_path=tmp_path).stdout
    assert "kind: SarathiDeployment" in notes and "kubectl apply -n team-a" in notes
    assert "kubectl apply --server-side --force-conflicts -f charts/sarathi-operator/crds/" in notes


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_rendered_chart_is_accepted_by_the_api_server(k, namespace, helm, tmp_path, mode):
    values = {"watchNamespaces": [namespace]} if mode == "namespaced" else None
    docs = render(helm, tmp_path, values, namespace, "--include-crds")
    assert of_kind(docs, "CustomResourceDefinition")
    result = k.run("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(docs), check=False)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == len(docs)
