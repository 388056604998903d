"""Acceptance of the SarathiDeployment CRD and operator (issue 7) against a real API server:
schema validation, the children of single- and multi-pod replicas, and specs the operator
refuses. The operator runs as a subprocess under the ServiceAccount token of
operator/deploy/rbac.yaml, so every test also proves that RBAC sufficient.

Also the harness shared with test_operator_lifecycle.py.
"""

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from sarathi_engine.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "crds" / "sarathideployments.yaml"
RBAC = ROOT / "operator" / "deploy" / "rbac.yaml"
GPU = "nvidia.com/gpu"
OWNER_LABEL = "serving.sarathi.dev/deployment"
INFERENCE_POOL_CRD = ROOT / "e2e" / "fixtures" / "inferencepool-crd.yaml"
DEFAULT_ENGINE_IMAGE = "sarathi-engine:default"


# ---------------------------------------------------------------- harness

def wait_until(what: str, check, timeout: float = 60, every: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last saw {last!r}")


class Cluster:
    """kubectl against the test cluster, JSON in and out."""

    def __init__(self, kube_cluster):
        self.kube = kube_cluster

    def run(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return self.kube.kubectl_run(*args, input=input, check=check)

    def json(self, *args: str):
        return json.loads(self.run(*args, "-o", "json").stdout)

    def items(self, kind: str, namespace: str, selector: str | None = None) -> list[dict]:
        args = ["get", kind, "-n", namespace] + (["-l", selector] if selector else [])
        return self.json(*args)["items"]

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        result = self.run("get", kind, name, "-n", namespace, "-o", "json", "--ignore-not-found", check=False)
        return json.loads(result.stdout) if result.stdout.strip() else None

    def apply(self, manifest: dict, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("apply", "-f", "-", input=json.dumps(manifest), check=check)

    def patch(self, kind: str, namespace: str, name: str, patch: dict) -> None:
        self.run("patch", kind, name, "-n", namespace, "--type", "merge", "-p", json.dumps(patch))

    def events(self, namespace: str, name: str) -> list[dict]:
        selector = f"involvedObject.kind=SarathiDeployment,involvedObject.name={name}"
        return self.json("get", "events", "-n", namespace, "--field-selector", selector)["items"]


def sdep(name: str, namespace: str, **spec) -> dict:
    return {
        "apiVersion": "serving.sarathi.dev/v1alpha1",
        "kind": "SarathiDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"image": "sarathi-engine:e2e", "model": {"name": name, "source": "smollm2-135m-instruct"}, **spec},
    }


def sdep_on_runner(runner, name: str, namespace: str, engine: dict, kv_cache: str, **spec) -> dict:
    """A SarathiDeployment the local pod runner serves: this checkout's engine on CPU, one thread
    each, on the runner's node."""
    node_selector, tolerations = runner.placement()
    manifest = sdep(name, namespace, engine={**engine, "extraArgs": ["--device", "cpu", "--kv-cache-memory", kv_cache]},
                    env=[{"name": "OMP_NUM_THREADS", "value": "1"}], nodeSelector=node_selector,
                    tolerations=tolerations, **spec)
    manifest["spec"]["image"] = "sarathi-engine:local"  # the runner runs this checkout instead
    return manifest


def condition(obj: dict, kind: str) -> dict:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def running(pods: list[dict]) -> bool:
    return bool(pods) and all(p["status"].get("phase") == "Running" and "deletionTimestamp" not in p["metadata"]
                              for p in pods)


def engine_pods(k: Cluster, namespace: str, name: str) -> list[dict]:
    """The resource's engine pods that are not going (never its model download Job's pods)."""
    selector = f"{OWNER_LABEL}={name},app.kubernetes.io/component=engine"
    return [p for p in k.items("pods", namespace, selector) if "deletionTimestamp" not in p["metadata"]]


def wait_phase(k: Cluster, namespace: str, name: str, phase: str, timeout: float = 60, generation: int | None = None):
    def reached():
        obj = k.get("sdep", namespace, name)
        status = (obj or {}).get("status", {})
        if status.get("phase") != phase:
            return None
        if generation is not None and status.get("observedGeneration") != generation:
            return None
        return obj

    return wait_until(f"{name} phase {phase}", reached, timeout)


class Operator:
    """`python -m sarathi_operator` watching one namespace, as the operator's ServiceAccount."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path):
        self.kubeconfig, self.namespace, self.log = kubeconfig, namespace, log
        self.proc: subprocess.Popen | None = None
        self.metrics_port = free_port()

    def start(self) -> None:
        health = free_port()
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sarathi_operator", "--kubeconfig", str(self.kubeconfig),
                 "--namespace", self.namespace, "--health-port", str(health),
                 "--metrics-port", str(self.metrics_port), "--resync-seconds", "5",
                 "--engine-image", DEFAULT_ENGINE_IMAGE],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            )
        wait_until("the operator's liveness endpoint", lambda: self._healthy(health), timeout=30)

    def _healthy(self, port: int) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no clean-up, no finishing of the pass in flight."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as resp:
            return resp.read().decode()


@pytest.fixture(scope="module")
def k(kube_cluster) -> Cluster:
    return Cluster(kube_cluster)


@pytest.fixture(scope="module")
def crd(k):
    k.run("apply", "-f", str(CRD))
    k.kube.wait_established("sarathideployments.serving.sarathi.dev")
    wait_until("the CRD in discovery", lambda: k.run("explain", "sdep", check=False).returncode == 0, timeout=30)


@pytest.fixture(scope="module")
def operator_kubeconfig(k, crd, tmp_path_factory) -> Path:
    """A kubeconfig with the operator ServiceAccount's token and nothing else."""
    k.run("apply", "-f", str(RBAC))
    wait_until("the operator ServiceAccount", lambda: k.get("serviceaccount", "sarathi-system", "sarathi-operator"))
    token = k.run("create", "token", "sarathi-operator", "-n", "sarathi-system", "--duration", "2h").stdout.strip()
    admin = yaml.safe_load(Path(k.kube.kubeconfig).read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    cluster = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
    path = tmp_path_factory.mktemp("operator") / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "sarathi-operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster["name"], "user": "sarathi-operator"}}],
        "current-context": "operator",
    }))
    return path


@contextlib.contextmanager
def fresh_namespace(k: Cluster):
    name = f"sdep-{uuid.uuid4().hex[:8]}"
    k.run("create", "namespace", name)
    yield name
    k.run("delete", "namespace", name, "--wait=false")
    # Later tests need the GPUs back.
    wait_until(f"namespace {name} gone", lambda: k.get("namespace", "", name) is None, timeout=120)


@pytest.fixture
def namespace(k, crd):
    with fresh_namespace(k) as name:
        yield name


@pytest.fixture(scope="module")
def scratch_namespace(k, crd):
    """For tests that create nothing that runs."""
    with fresh_namespace(k) as name:
        yield name


@contextlib.contextmanager
def operator_running(kubeconfig: Path, namespace: str, log: Path, shown: int = 5000):
    """An operator watching namespace while the block runs; the tail of its log is printed
    after (pytest shows it when a test failed)."""
    op = Operator(kubeconfig, namespace, log)
    op.start()
    try:
        yield op
    finally:
        op.stop()
        print(f"--- operator log ({op.log}) ---\n{op.log.read_text()[-shown:]}")


@pytest.fixture
def operator(operator_kubeconfig, namespace, tmp_path):
    with operator_running(operator_kubeconfig, namespace, tmp_path / "operator.log") as op:
        yield op


# ---------------------------------------------------------------- the CRD

def test_crd_is_served_and_explains_the_documented_fields(k, crd):
    text = k.run("explain", "sarathideployment.spec").stdout
    for field in ("model", "image", "imagePullPolicy", "replicas", "parallelism", "engine", "slo", "autotune",
                  "resources", "nodeSelector", "tolerations", "env", "affinity", "topologySpreadConstraints",
                  "priorityClassName", "podLabels", "volumes", "volumeMounts", "gateway"):
        assert f"  {field}\t" in text, field
    model = k.run("explain", "sarathideployment.spec.model").stdout
    assert "  cache\t" in model and "  diskSize\t" in model
    engine = k.run("explain", "sarathideployment.spec.engine").stdout
    for field in ("policy", "tokenBudget", "maxNumSeqs", "maxModelLen", "dtype", "extraArgs"):
        assert f"  {field}\t" in engine, field
    assert "enum: sarathi, vllm, orca, fastertransformer" in engine
    assert "tbtP99Ms" in k.run("explain", "sarathideployment.spec.slo").stdout
    assert "intervalSeconds" in k.run("explain", "sarathideployment.spec.autotune").stdout
    assert "gpusPerNode" in k.run("explain", "sarathideployment.spec.parallelism").stdout


@pytest.mark.parametrize(
    "spec, field, message",
    [
        ({"parallelism": {"tensor": 0}}, "spec.parallelism.tensor",
         "should be greater than or equal to 1"),
        ({"autotune": {"enabled": True}}, "spec.slo", "required when spec.autotune.enabled is true"),
        ({"autotune": {"enabled": True}, "slo": {"tbtP99Ms": 100}, "engine": {"policy": "vllm"}},
         "spec.autotune.enabled", "needs spec.engine.policy sarathi and spec.parallelism.pipeline 1"),
        ({"parallelism": {"tensor": 4, "pipeline": 3}}, "spec.parallelism",
         "must fit one node (at most gpusPerNode) or fill whole nodes"),
        ({"parallelism": {"tensor": 6, "pipeline": 2, "gpusPerNode": 4}}, "spec.parallelism.tensor",
         "must divide gpusPerNode"),
        ({"model": {"name": "m", "source": "s3://bucket/model"}}, "spec.model.source",
         "must be smollm2-135m-instruct, an absolute path"),
        ({"engine": {"policy": "fifo"}}, "spec.engine.policy", "Unsupported value"),
        ({"volumes": [{"name": "model", "emptyDir": {}}]}, "spec.volumes",
         "must not be named dshm or model, which the operator mounts"),
        ({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone"}]},
         "spec.topologySpreadConstraints[0].whenUnsatisfiable", "Required value"),
        ({"gateway": {"inferencePool": True, "endpointPicker": {"name": "epp", "port": 0}}},
         "spec.gateway.endpointPicker.port", "should be greater than or equal to 1"),
        ({"model": {"name": "m", "source": "hf://org/m"}}, "spec.model",
         "spec.model.diskSize: an hf:// source without spec.model.cache downloads"),
        ({"model": {"name": "m", "source": "hf://org/m", "diskSize": "lots"}}, "spec.model.diskSize",
         "must be a positive quantity"),
        ({"model": {"name": "m", "source": "pvc://models/m", "cache": {"claimName": "c"}}}, "spec.model",
         "spec.model.cache holds hf:// downloads"),
        ({"model": {"name": "m", "source": "hf://org/m", "cache": {"claimName": "c", "size": "1Gi"}}},
         "spec.model.cache", "needs claimName (an existing PersistentVolumeClaim) or size"),
        ({"model": {"name": "m", "source": "hf://org/m", "cache": {"claimName": "c", "storageClassName": "nfs"}}},
         "spec.model.cache", "describe a claim the operator creates"),
    ],
    ids=["tensor-0", "autotune-without-slo", "autotune-without-chunking",
         "gpus-not-whole-nodes", "tensor-straddles-pods", "model-source", "policy", "operator-volume",
         "spread-without-when-unsatisfiable", "endpoint-picker-port", "hf-without-disk-size", "disk-size",
         "cache-of-a-pvc-source", "cache-claim-and-size", "cache-class-of-an-existing-claim"],
)
def test_the_api_server_rejects_invalid_resources_naming_the_field(k, scratch_namespace, spec, field, message):
    result = k.apply(sdep("bad", scratch_namespace, **spec), check=False)
    assert result.returncode != 0
    assert f"{field}: " in result.stderr and message in result.stderr, result.stderr
    assert k.get("sdep", scratch_namespace, "bad") is None


def test_defaults_are_filled_in_by_the_api_server(k, scratch_namespace):
    k.apply(sdep("defaults", scratch_namespace))
    spec = k.get("sdep", scratch_namespace, "defaults")["spec"]
    assert spec["replicas"] == 1
    assert spec["parallelism"] == {"tensor": 1, "pipeline": 1, "gpusPerNode": 8}
    assert spec["engine"] == {"policy": "sarathi", "tokenBudget": 512, "dtype": "auto", "extraArgs": []}
    assert spec["autotune"] == {"enabled": False, "intervalSeconds": 30}


# ---------------------------------------------------------------- children

def owned_children(k: Cluster, namespace: str, name: str) -> dict[str, list[dict]]:
    kinds = ("deployments", "statefulsets", "services", "secrets", "poddisruptionbudgets", "replicasets")
    return {kind: k.items(kind, namespace, f"{OWNER_LABEL}={name}") for kind in kinds}


def test_tp2_replica_is_one_pod_with_two_gpus_and_the_engine_flags(k, namespace, operator):
    k.apply(sdep("tp2", namespace, parallelism={"tensor": 2}, engine={"tokenBudget": 768}))
    obj = wait_phase(k, namespace, "tp2", "Ready")
    [pod] = engine_pods(k, namespace, "tp2")
    [container] = pod["spec"]["containers"]
    assert container["resources"]["limits"][GPU] == "2" and container["resources"]["requests"][GPU] == "2"
    args = " ".join(container["args"])
    assert "--tensor-parallel-size 2" in args and "--token-budget 768" in args
    assert container["command"] == ["sarathi"] and container["args"][0] == "serve"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    assert pod["spec"]["nodeName"].startswith("gpu-node-") and pod["status"]["phase"] == "Running"

    status = obj["status"]
    assert (status["replicas"], status["readyReplicas"], status["tokenBudget"]) == (1, 1, 768)
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    assert condition(obj, "Ready")["status"] == "True"
    assert {"Pending", "Ready"} <= {e["reason"] for e in k.events(namespace, "tp2")}
    header, row = k.run("get", "sdep", "tp2", "-n", namespace).stdout.splitlines()
    assert header.split() == ["NAME", "MODEL", "TP", "PP", "REPLICAS", "READY", "BUDGET", "P99-TBT-MS", "PHASE", "AGE"]
    assert row.split()[:6] + row.split()[-2:-1] == ["tp2", "tp2", "2", "1", "1", "1", "Ready"]
    assert row.split()[6] == "768"

    children = owned_children(k, namespace, "tp2")
    assert {kind: len(v) for kind, v in children.items()} == {
        "deployments": 1, "statefulsets": 0, "services": 1, "secrets": 1,
        "poddisruptionbudgets": 1, "replicasets": 1,
    }
    for kind in ("deployments", "services", "secrets", "poddisruptionbudgets"):
        [child] = children[kind]
        [ref] = child["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
            "SarathiDeployment", "tp2", obj["metadata"]["uid"], True), kind


def test_tp4_pp4_replica_spans_two_pods_with_ranks_wired(k, namespace, operator):
    k.apply(sdep("tp4pp4", namespace, parallelism={"tensor": 4, "pipeline": 4, "gpusPerNode": 8}))
    obj = wait_phase(k, namespace, "tp4pp4", "Ready")
    pods = sorted(engine_pods(k, namespace, "tp4pp4"), key=lambda p: p["metadata"]["name"])
    assert [p["metadata"]["name"] for p in pods] == ["tp4pp4-0-0", "tp4pp4-0-1"]
    assert running(pods)
    assert [p["metadata"]["labels"]["apps.kubernetes.io/pod-index"] for p in pods] == ["0", "1"]
    assert len({p["spec"]["nodeName"] for p in pods}) == 2, "each pod fills one 8-GPU node"
    for pod in pods:
        [container] = pod["spec"]["containers"]
        assert container["resources"]["limits"][GPU] == "8"
        args = " ".join(container["args"])
        assert "--tensor-parallel-size 4" in args and "--pipeline-parallel-size 4" in args
        env = {e["name"]: e for e in container["env"]}
        assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
        assert env["WORLD_SIZE"]["value"] == "2"
        assert env["MASTER_ADDR"]["value"] == "tp4pp4-0-0.tp4pp4-ranks"
        assert env["MASTER_PORT"]["value"] == "29500"
        assert pod["spec"]["hostname"] == pod["metadata"]["name"] and pod["spec"]["subdomain"] == "tp4pp4-ranks"
    assert (obj["status"]["replicas"], obj["status"]["readyReplicas"]) == (1, 1)
    service = k.get("service", namespace, "tp4pp4")
    assert service["spec"]["selector"]["apps.kubernetes.io/pod-index"] == "0", "only rank 0 serves the API"
    assert k.get("service", namespace, "tp4pp4-ranks")["spec"]["clusterIP"] == "None"


# ---------------------------------------------------------------- specs the operator refuses

def test_a_spec_the_schema_cannot_catch_fails_while_others_reconcile(k, namespace, operator):
    k.apply(sdep("broken", namespace, env=[{"name": "RANK", "value": "7"}]))
    k.apply(sdep("fine", namespace))
    broken = wait_phase(k, namespace, "broken", "Failed")
    ready = condition(broken, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert ready["message"] == "spec.env must not set RANK: the operator sets them"
    assert condition(broken, "Degraded")["status"] == "True"
    assert owned_children(k, namespace, "broken")["deployments"] == []
    failed = [e for e in k.events(namespace, "broken") if e["reason"] == "Failed"]
    assert failed and failed[0]["type"] == "Warning" and "RANK" in failed[0]["message"]

    wait_phase(k, namespace, "fine", "Ready")

    k.patch("sdep", namespace, "broken", {"spec": {"env": [{"name": "LOG_LEVEL", "value": "debug"}]}})
    fixed = wait_phase(k, namespace, "broken", "Ready", generation=2)
    assert condition(fixed, "Degraded")["status"] == "False"


def test_a_child_the_api_server_rejects_fails_with_its_message(k, namespace, operator):
    k.apply(sdep("badlabel", namespace, nodeSelector={"gpu": "not a label value"}))
    obj = wait_phase(k, namespace, "badlabel", "Failed")
    ready = condition(obj, "Ready")
    assert ready["reason"] == "ChildRejected"
    assert ready["message"].startswith("the API server rejected Deployment badlabel:")
    assert "nodeSelector" in ready["message"]


def test_pod_fields_reach_the_pods_and_the_image_defaults_to_the_operators(k, namespace, operator):
    suffix = namespace.removeprefix("sdep-")
    k.apply({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": f"inference-{suffix}"},
             "value": 1000})
    k.apply({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": f"gpu-{suffix}"},
             "handler": "runc"})
    k.run("create", "serviceaccount", "engine", "-n", namespace)
    spread = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
               "labelSelector": {"matchLabels": {OWNER_LABEL: "pods"}}}]
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "type", "operator": "In", "values": ["kwok"]}]}]}}}
    manifest = sdep("pods", namespace, replicas=2, affinity=affinity, topologySpreadConstraints=spread,
                    priorityClassName=f"inference-{suffix}", runtimeClassName=f"gpu-{suffix}",
                    serviceAccountName="engine", imagePullSecrets=[{"name": "registry"}],
                    podLabels={"team": "ml"}, podAnnotations={"example.com/owner": "ml"},
                    podSecurityContext={"runAsNonRoot": True, "runAsUser": 1000},
                    securityContext={"allowPrivilegeEscalation": False},
                    volumes=[{"name": "scratch", "emptyDir": {}}],
                    volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}])
    del manifest["spec"]["image"]
    try:
        k.apply(manifest)
        wait_phase(k, namespace, "pods", "Ready")
        pods = engine_pods(k, namespace, "pods")
        assert len(pods) == 2 and running(pods)
        assert {p["spec"]["nodeName"] for p in pods} == {"gpu-node-0", "gpu-node-1"}  # spread over the nodes
        for pod in pods:
            spec, meta = pod["spec"], pod["metadata"]
            [container] = spec["containers"]
            assert container["image"] == DEFAULT_ENGINE_IMAGE
            assert spec["affinity"] == affinity and spec["topologySpreadConstraints"] == spread
            assert (spec["priorityClassName"], spec["priority"]) == (f"inference-{suffix}", 1000)
            assert spec["runtimeClassName"] == f"gpu-{suffix}" and spec["serviceAccountName"] == "engine"
            assert spec["imagePullSecrets"] == [{"name": "registry"}]
            assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000}
            assert container["securityContext"] == {"allowPrivilegeEscalation": False}
            assert {"name": "scratch", "mountPath": "/scratch"} in container["volumeMounts"]
            assert meta["labels"]["team"] == "ml" and meta["annotations"]["example.com/owner"] == "ml"
    finally:
        k.run("delete", "priorityclass", f"inference-{suffix}", "--ignore-not-found")
        k.run("delete", "runtimeclass", f"gpu-{suffix}", "--ignore-not-found")


def test_an_inference_pool_follows_the_spec_once_the_cluster_serves_the_api(k, namespace, operator):
    k.run("delete", "-f", str(INFERENCE_POOL_CRD), "--ignore-not-found")
    k.apply(sdep("gw", namespace, gateway={"inferencePool": True, "endpointPicker": {"name": "gw-epp"}}))
    obj = wait_phase(k, namespace, "gw", "Ready")  # serving does not wait for the gateway
    wait_until("the InferencePoolReady condition", lambda: condition(k.get("sdep", namespace, "gw"), "InferencePoolReady"))
    pool_condition = condition(k.get("sdep", namespace, "gw"), "InferencePoolReady")
    assert (pool_condition["status"], pool_condition["reason"]) == ("False", "CRDNotInstalled")

    k.run("apply", "-f", str(INFERENCE_POOL_CRD))
    try:
        k.kube.wait_established("inferencepools.inference.networking.k8s.io")
        pool = wait_until("the InferencePool", lambda: k.get("inferencepool", namespace, "gw"), timeout=60)
        assert pool["spec"]["selector"]["matchLabels"] == {OWNER_LABEL: "gw", "app.kubernetes.io/component": "engine"}
        assert pool["spec"]["targetPorts"] == [{"number": 8000}]
        assert pool["spec"]["endpointPickerRef"] == {"kind": "Service", "name": "gw-epp", "port": {"number": 9002},
                                                     "failureMode": "FailClose"}
        [ref] = pool["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["uid"]) == ("SarathiDeployment", obj["metadata"]["uid"])
        wait_until("InferencePoolReady true",
                   lambda: condition(k.get("sdep", namespace, "gw"), "InferencePoolReady").get("status") == "True")
        [pod] = engine_pods(k, namespace, "gw")
        assert pool["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()

        k.patch("sdep", namespace, "gw", {"spec": {"gateway": {"inferencePool": False}}})
        wait_until("the InferencePool pruned", lambda: k.get("inferencepool", namespace, "gw") is None, timeout=60)
        wait_until("the condition gone",
                   lambda: not condition(k.get("sdep", namespace, "gw"), "InferencePoolReady"), timeout=30)
    finally:
        k.run("delete", "-f", str(INFERENCE_POOL_CRD), "--ignore-not-found", "--wait=false")
