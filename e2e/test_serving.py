"""End to end with real engines (issue 8): the operator installed by the Helm chart, a
SarathiDeployment of the bundled smollm2-135m-instruct with 2 replicas, run by the local pod
runner as `sarathi serve` processes of this checkout on CPU. The pods turn Ready because the
engines answer their probes; each answers the openai client; a new token budget reaches each
engine live with no restart; a deleted pod comes back as a new process while the status goes
Degraded and then Ready; `helm uninstall` removes the operator and keeps the CRD.

The tests run in file order and share one deployment, so each engine loads its model once.
"""

import glob
import os
import re
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from openai import OpenAI

from e2e.cluster.proc import start_time
from e2e.test_operator import Cluster, condition, engine_pods, sdep_on_runner, wait_until

pytestmark = pytest.mark.serving

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "sarathi-operator"
RELEASE = "sarathi-operator"
NAME = "chat"
PORT = 8000
# Engines load the model concurrently on a small, shared machine.
LOAD_TIMEOUT = 300


@pytest.fixture(scope="module")
def k(kube_cluster) -> Cluster:
    return Cluster(kube_cluster)


def _namespace(k: Cluster, prefix: str):
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    k.run("create", "namespace", name)
    yield name
    # No waiting for the namespace controller: the runner stops the pods' processes as they
    # are deleted, and any still running when the session ends when it stops.
    k.run("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="module")
def operator_namespace(k, pod_runner):
    yield from _namespace(k, "sarathi-op")


@pytest.fixture(scope="module")
def namespace(k, pod_runner):
    yield from _namespace(k, "serving")


@pytest.fixture(scope="module")
def release(k, pod_runner, operator_namespace, namespace, tmp_path_factory):
    node_selector, tolerations = pod_runner.placement()
    values = tmp_path_factory.mktemp("helm") / "values.yaml"
    values.write_text(yaml.safe_dump({"watchNamespaces": [namespace], "resyncSeconds": 5,
                                      "nodeSelector": node_selector, "tolerations": tolerations}))
    k.kube.run("helm", "install", RELEASE, str(CHART), "-n", operator_namespace, "-f", str(values),
               "--wait", "--timeout", "3m")
    yield RELEASE
    k.kube.run("helm", "uninstall", RELEASE, "-n", operator_namespace, "--wait", check=False)
    _print_logs(pod_runner, operator_namespace)


def _print_logs(runner, namespace: str) -> None:
    """Shown by pytest only when a test failed."""
    for log in sorted(runner.state.glob(f"{namespace}_*/container.log")):
        print(f"--- {log} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))


@pytest.fixture(scope="module")
def served(k, pod_runner, release, namespace):
    """The SarathiDeployment, Ready; and what was seen while it got there."""
    k.apply(sdep_on_runner(pod_runner, NAME, namespace, {"tokenBudget": 512, "maxModelLen": 1024}, "64MiB",
                           replicas=2))
    seen_loading = False
    deadline = time.monotonic() + LOAD_TIMEOUT
    while True:
        pods = engine_pods(k, namespace, NAME)
        seen_loading |= any(p["status"].get("phase") == "Running" and not is_ready(p) for p in pods)
        obj = k.get("sdep", namespace, NAME)
        if obj.get("status", {}).get("phase") == "Ready":
            break
        assert time.monotonic() < deadline, f"not Ready after {LOAD_TIMEOUT}s: {obj.get('status')}"
        time.sleep(0.25)
    yield {"seen_loading": seen_loading}
    _print_logs(pod_runner, namespace)


def is_ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read().decode()


def live_budget(pod: dict) -> float:
    _, text = get(f"http://{pod['status']['podIP']}:{PORT}/metrics")
    return float(re.search(r"^sarathi_token_budget\{[^}]*\} (\S+)$", text, re.M)[1])


def listening_process(ip: str, port: int) -> tuple[int, int]:
    """(pid, start time) of the process listening on ip:port, read from /proc as `ss -p`
    does: the engine itself, whatever the runner says about it."""
    addr = "".join(f"{int(b):02X}" for b in reversed(ip.split("."))) + f":{port:04X}"
    inodes = {line.split()[9] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
              if line.split()[1] == addr and line.split()[3] == "0A"}
    assert inodes, f"nothing listens on {ip}:{port}"
    for fd in glob.glob("/proc/[0-9]*/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            pid = int(fd.split("/")[2])
            return pid, start_time(pid)
    raise AssertionError(f"no process holds the socket listening on {ip}:{port}")


def engines(k: Cluster, namespace: str) -> list[dict]:
    return sorted(engine_pods(k, namespace, NAME), key=lambda p: p["metadata"]["name"])


def complete(pod: dict) -> str:
    client = OpenAI(base_url=f"http://{pod['status']['podIP']}:{PORT}/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert out.model == NAME and out.usage.completion_tokens >= 1
    return out.choices[0].text


# ---------------------------------------------------------------- tests, in order

def test_helm_installs_an_operator_that_runs_under_its_own_role(k, pod_runner, release, operator_namespace, namespace):
    [operator] = k.items("pods", operator_namespace, "app.kubernetes.io/instance=" + RELEASE)
    assert is_ready(operator) and operator["spec"]["nodeName"] == pod_runner.node_name
    assert k.get("role", namespace, RELEASE) and k.get("rolebinding", namespace, RELEASE)
    manifest = k.kube.run("helm", "get", "manifest", RELEASE, "-n", operator_namespace).stdout
    kinds = {d["kind"] for d in yaml.safe_load_all(manifest) if d}
    assert kinds == {"ServiceAccount", "Role", "RoleBinding", "Service", "Deployment"}, \
        "watching one namespace needs nothing cluster-wide"
    assert k.get("service", operator_namespace, f"{RELEASE}-metrics")["spec"]["ports"][0]["port"] == 8081
    _, metrics = get(f"http://{operator['status']['podIP']}:8081/metrics")
    assert "sarathi_operator_reconcile_seconds" in metrics
    [workdir] = pod_runner.state.glob(f"{operator_namespace}_{RELEASE}-*")
    whoami = k.run("auth", "whoami", "--kubeconfig", str(workdir / "kubeconfig"), "-o", "jsonpath={.status.userInfo.username}")
    assert whoami.stdout == f"system:serviceaccount:{operator_namespace}:{RELEASE}"


def test_pods_become_ready_because_their_engines_answer_the_probes(k, pod_runner, served, namespace):
    assert served["seen_loading"], "pods ran before they were ready: readiness came from the engine"
    pods = engines(k, namespace)
    assert len(pods) == 2
    for pod in pods:
        assert is_ready(pod) and pod["spec"]["nodeName"] == pod_runner.node_name
        assert get(f"http://{pod['status']['podIP']}:{PORT}/ready")[0] == 200
        args = pod["spec"]["containers"][0]["args"]
        assert args[:2] == ["serve", "--model"] and "--device" in args
    obj = k.get("sdep", namespace, NAME)
    status = obj["status"]
    assert (status["phase"], status["replicas"], status["readyReplicas"], status["tokenBudget"]) == ("Ready", 2, 2, 512)
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    assert condition(obj, "Ready")["status"] == "True"


def test_the_openai_client_gets_a_completion_from_each_pod(k, served, namespace):
    answers = [complete(pod) for pod in engines(k, namespace)]
    assert all(answers), answers
    assert answers[0] == answers[1], "greedy decoding of one model gives one answer"


def test_a_new_token_budget_reaches_each_engine_live_without_restarts(k, served, namespace):
    before = engines(k, namespace)
    processes = {p["metadata"]["uid"]: listening_process(p["status"]["podIP"], PORT) for p in before}
    assert all(live_budget(p) == 512 for p in before)

    k.patch("sdep", namespace, NAME, {"spec": {"engine": {"tokenBudget": 256}}})
    wait_until("budget 256 on every engine", lambda: all(live_budget(p) == 256 for p in before), timeout=60)
    obj = wait_until("status budget 256", lambda: (lambda o: o["status"].get("tokenBudget") == 256
                                                    and o["status"]["phase"] == "Ready" and o)(k.get("sdep", namespace, NAME)))
    after = engines(k, namespace)
    assert {p["metadata"]["uid"] for p in after} == set(processes), "same pods"
    assert {p["metadata"]["uid"]: listening_process(p["status"]["podIP"], PORT) for p in after} == processes, \
        "same processes, started at the same time"
    for old, new in zip(before, after):
        [was], [now] = old["status"]["containerStatuses"], new["status"]["containerStatuses"]
        assert (now["containerID"], now["restartCount"]) == (was["containerID"], 0)
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]


def test_a_deleted_pod_comes_back_as_a_new_process_through_degraded_to_ready(k, served, namespace):
    victim, survivor = engines(k, namespace)
    old_process = listening_process(victim["status"]["podIP"], PORT)
    k.run("delete", "pod", victim["metadata"]["name"], "-n", namespace, "--wait=false")

    phases = []
    deadline = time.monotonic() + LOAD_TIMEOUT
    while True:
        status = k.get("sdep", namespace, NAME)["status"]
        if not phases or phases[-1] != status["phase"]:
            phases.append(status["phase"])
        pods = engines(k, namespace)
        replaced = len(pods) == 2 and victim["metadata"]["uid"] not in {p["metadata"]["uid"] for p in pods}
        if replaced and status["phase"] == "Ready" and status["readyReplicas"] == 2 and all(map(is_ready, pods)):
            break
        assert time.monotonic() < deadline, f"not back to Ready after {LOAD_TIMEOUT}s; phases {phases}"
        time.sleep(0.2)
    assert "Degraded" in phases and phases[-1] == "Ready", phases

    [new] = [p for p in pods if p["metadata"]["uid"] != survivor["metadata"]["uid"]]
    new_process = listening_process(new["status"]["podIP"], PORT)
    assert new_process != old_process and start_time(old_process[0]) != old_process[1], "the old process is gone"
    # A new engine starts from its flag and then gets the budget in force, live.
    wait_until("the new engine on budget 256", lambda: live_budget(new) == 256, timeout=60)
    assert complete(new)


def test_helm_uninstall_removes_the_operator_and_keeps_the_crd(k, release, operator_namespace, namespace):
    k.kube.run("helm", "uninstall", RELEASE, "-n", operator_namespace, "--wait", "--timeout", "2m")
    assert k.get("deployment", operator_namespace, RELEASE) is None
    assert k.get("serviceaccount", operator_namespace, RELEASE) is None
    assert k.get("role", namespace, RELEASE) is None and k.get("rolebinding", namespace, RELEASE) is None
    assert k.get("service", operator_namespace, f"{RELEASE}-metrics") is None
    wait_until("the operator pod gone", lambda: not k.items("pods", operator_namespace, "app.kubernetes.io/instance=" + RELEASE))
    assert k.get("crd", "", "sarathideployments.serving.sarathi.dev"), "Helm never deletes a CRD it installed"
    assert k.get("sdep", namespace, NAME), "served models outlive the operator"
