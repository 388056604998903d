"""Gang-scheduled multi-pod replicas end to end (issue 19): where the cluster serves
LeaderWorkerSet, a replica spanning pods is one LeaderWorkerSet group. Here LeaderWorkerSet is
built from source (e2e/cluster/lws.py) and installed on the local cluster for this module only,
so every other test sees the StatefulSet path; the operator starts after it, under its RBAC.

A tensor-parallel 2 x pipeline-parallel 2 replica on nodes of 2 GPUs spans two pods, which the
local pod runner runs: rank 0 (the leader) finds its workers through LWS_LEADER_ADDRESS, a
cluster DNS name the runner answers for its pods.
"""

import pytest
from openai import OpenAI

from e2e.cluster import lws
from e2e.cluster.layout import Layout
from e2e.module_fixtures import namespace, operator  # noqa: F401  (fixtures)
from e2e.test_operator import (  # noqa: F401  (fixtures)
    Cluster, crd, engine_pods, k, operator_kubeconfig, sdep, sdep_on_runner, wait_phase, wait_until,
)
from sarathi_operator.names import WORKER_INDEX_LABEL

pytestmark = pytest.mark.serving

NAME = "gang"
GROUP = f"{NAME}-lws"
TP2_PP2_ON_TWO_PODS = {"tensor": 2, "pipeline": 2, "gpusPerNode": 2}
LOAD_TIMEOUT = 420


# autouse: set up before the module's other fixtures (the operator looks up the kinds it
# watches once, at start) and torn down after them.
@pytest.fixture(scope="module", autouse=True)
def leader_worker_sets(kube_cluster, k):
    if not kube_cluster.local:
        if not k.run("api-resources", "--api-group=leaderworkerset.x-k8s.io", "-o", "name").stdout.strip():
            pytest.skip("the cluster in $KUBECONFIG does not serve LeaderWorkerSet: install it there")
        yield
        return
    layout = Layout.default()
    lws.install(layout)
    try:
        yield
    finally:
        lws.uninstall(layout)


def env(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


def completion(pod: dict) -> str:
    client = OpenAI(base_url=f"http://{pod['status']['podIP']}:8000/v1", api_key="unused", max_retries=0, timeout=120)
    return client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=4).choices[0].text


def ready_group(k: Cluster, namespace: str) -> list[dict]:
    """The group's pods, leader first, once both are Ready."""
    pods = sorted(engine_pods(k, namespace, NAME), key=lambda p: p["metadata"]["labels"].get(WORKER_INDEX_LABEL, ""))
    ok = len(pods) == 2 and all(any(c["type"] == "Ready" and c["status"] == "True"
                                    for c in p["status"].get("conditions", [])) for p in pods)
    return pods if ok else []


def test_a_replica_spanning_two_pods_is_one_group_that_serves_and_restarts_as_a_whole(k, pod_runner, operator,
                                                                                      namespace):
    k.apply(sdep_on_runner(pod_runner, NAME, namespace, {"tokenBudget": 128}, "64Mi", replicas=1,
                           parallelism=TP2_PP2_ON_TWO_PODS))
    status = wait_phase(k, namespace, NAME, "Ready", timeout=LOAD_TIMEOUT)["status"]
    assert status["readyReplicas"] == 1 and status["selector"].endswith(f"{WORKER_INDEX_LABEL}=0")

    group = k.get("leaderworkerset", namespace, GROUP)
    assert group["spec"]["leaderWorkerTemplate"]["size"] == 2
    assert group["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert group["status"]["readyReplicas"] == 1
    assert k.get("service", namespace, f"{NAME}-ranks") is None, "LeaderWorkerSet's own headless Service finds rank 0"
    assert not [s for s in k.items("statefulsets", namespace) if s["metadata"]["name"].startswith(f"{NAME}-0")]
    assert k.get("service", namespace, NAME)["spec"]["selector"][WORKER_INDEX_LABEL] == "0"

    leader, worker = ready_group(k, namespace)
    assert (leader["metadata"]["name"], worker["metadata"]["name"]) == (f"{GROUP}-0", f"{GROUP}-0-1")
    assert env(worker)["LWS_LEADER_ADDRESS"] == f"{GROUP}-0.{GROUP}.{namespace}"
    assert (env(worker)["LWS_GROUP_SIZE"], env(worker)["LWS_WORKER_INDEX"]) == ("2", "1")
    assert completion(leader)

    # One pod goes: LeaderWorkerSet recreates the whole group (a rank cannot rejoin), which serves again.
    k.run("delete", "pod", worker["metadata"]["name"], "-n", namespace, "--wait=false")
    before = {leader["metadata"]["uid"], worker["metadata"]["uid"]}

    def recreated() -> list[dict]:
        pods = ready_group(k, namespace)
        return pods if pods and not before & {p["metadata"]["uid"] for p in pods} else []

    leader, _ = wait_until("the whole group recreated and ready", recreated, timeout=LOAD_TIMEOUT, every=2)
    assert completion(leader)
    wait_phase(k, namespace, NAME, "Ready", timeout=60)


def test_a_template_change_rolls_every_group_through_leader_worker_set(k, operator, namespace):
    """On kwok's nodes, whose pods run nothing and turn ready at once: two groups of two pods, and
    a template change that LeaderWorkerSet rolls group by group. (Not through the pod runner: a
    surge group's leader would listen on rank 0's port beside the old leader's, and pods there
    share one network.)"""
    name = "rolled"
    k.apply(sdep(name, namespace, replicas=2, parallelism=TP2_PP2_ON_TWO_PODS))
    generation = wait_phase(k, namespace, name, "Ready", timeout=120)["metadata"]["generation"]
    old = engine_pods(k, namespace, name)
    assert sorted(p["metadata"]["name"] for p in old) == [f"{name}-lws-0", f"{name}-lws-0-1", f"{name}-lws-1",
                                                          f"{name}-lws-1-1"]

    k.patch("sdep", namespace, name, {"spec": {"engine": {"maxNumSeqs": 32}}})
    status = wait_phase(k, namespace, name, "Ready", timeout=180, generation=generation + 1)["status"]
    assert status["readyReplicas"] == 2
    new = wait_until("the old pods gone", lambda: (lambda pods: pods if len(pods) == 4 else None)(
        engine_pods(k, namespace, name)), timeout=60)
    assert not {p["metadata"]["uid"] for p in old} & {p["metadata"]["uid"] for p in new}, "every group was replaced"
    for pod in new:
        args = pod["spec"]["containers"][0]["args"]
        assert args[args.index("--max-num-seqs") + 1] == "32", pod["metadata"]["name"]
    group = k.get("leaderworkerset", namespace, f"{name}-lws")["status"]
    assert (group["replicas"], group["updatedReplicas"], group["readyReplicas"]) == (2, 2, 2)
