"""The rules of a reconcile pass (plan.py), over worlds as the API server reports them.

`carried_out` plays the cluster: it applies a plan as the API server and the workload
controllers would, once they have caught up, so that a rollout can be followed pass by pass.
"""

import copy
import json
from dataclasses import replace

from sdeps import make_sdep

from sarathi_operator import names, settings
from sarathi_operator.build import pod_template
from sarathi_operator.plan import WORKLOADS, World, changes, plan, status_after
from sarathi_operator.rollout import REVISION_LABEL

NOW = "2026-01-01T00:00:00Z"
FRESH = "fresh-token"


def world(sdep, children=(), engine_pods=(), token=None, pools_served=False, lws_served=False) -> World:
    labelled = {}
    for child in children:
        labelled.setdefault(child["kind"], []).append(child)
    return World(sdep=sdep, admin_token=token, pools_served=pools_served, lws_served=lws_served, labelled=labelled,
                 engine_pods=list(engine_pods))


def decide(w: World):
    return plan(w, engine_image=None, fresh_token=FRESH, now=NOW)


def kinds(manifests):
    return [(m["kind"], m["metadata"]["name"]) for m in manifests]


def pod(workload, index, ready=True):
    """A pod of a workload as its controller makes it from the current template; the index of a
    LeaderWorkerSet's pod is (group, worker)."""
    template = pod_template(workload)
    labels = dict(template["metadata"]["labels"])
    owner = "ReplicaSet"
    name = f"{workload['metadata']['name']}-{index}"
    if workload["kind"] == "StatefulSet":
        labels |= {REVISION_LABEL: workload["status"]["updateRevision"], names.POD_INDEX_LABEL: str(index)}
        owner = "StatefulSet"
    elif workload["kind"] == "LeaderWorkerSet":
        group, worker = index
        labels |= {names.WORKER_INDEX_LABEL: str(worker), REVISION_LABEL: workload["status"]["revision"]}
        owner = "StatefulSet"
        name = f"{workload['metadata']['name']}-{group}" + (f"-{worker}" if worker else "")
        index = 10 * group + worker
    return {
        "metadata": {"name": name, "namespace": "ml", "uid": f"uid-{name}-{labels.get(REVISION_LABEL, '')}",
                     "labels": labels, "annotations": dict(template["metadata"].get("annotations", {})),
                     "ownerReferences": [{"kind": owner, "name": workload["metadata"]["name"]}]},
        "status": {"podIP": f"10.0.0.{index}",
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                   "containerStatuses": [{"name": names.CONTAINER, "containerID": f"c-{name}"}]},
    }


def carried_out(w: World, decided, sdep=None) -> World:
    """The world once the plan is carried out and every controller has caught up; pods restart
    only where a Deployment's template changed or the plan deleted them (StatefulSets roll
    OnDelete). sdep: the resource as the next pass reads it (its status written)."""
    sdep = copy.deepcopy(sdep or w.sdep)
    sdep["status"] = decided.status
    old = {(c["kind"], c["metadata"]["name"]): c for cs in w.labelled.values() for c in cs}
    restarted = {p["metadata"]["name"] for p in decided.restart_pods}
    pushed = {p["metadata"]["name"] for p in decided.push}
    children, pods = [], []
    for manifest in [m for stage in decided.apply for m in stage]:
        key = (manifest["kind"], manifest["metadata"]["name"])
        before = old.get(key)
        if before is not None and not (manifest["kind"] in WORKLOADS and changes(manifest, before)):
            children.append(before)
            continue
        generation = before["metadata"]["generation"] + 1 if before else 1
        child = copy.deepcopy(manifest)
        child["metadata"] |= {"uid": f"uid-{key[1]}", "generation": generation}
        if child["kind"] == "StatefulSet":
            revision = json.dumps(child["spec"]["template"], sort_keys=True)
            child["status"] = {"observedGeneration": generation, "updateRevision": str(hash(revision))}
        elif child["kind"] in ("Deployment", "LeaderWorkerSet"):
            n = child["spec"]["replicas"]
            child["status"] = {"observedGeneration": generation, "replicas": n, "readyReplicas": n,
                               "updatedReplicas": n}
            if child["kind"] == "LeaderWorkerSet":  # it recreates every group with the new template
                child["status"]["revision"] = str(hash(json.dumps(pod_template(child), sort_keys=True)))
        children.append(child)
    for lws in [c for c in children if c["kind"] == "LeaderWorkerSet"]:
        size = lws["spec"]["leaderWorkerTemplate"]["size"]
        pods += [pod(lws, (group, worker)) for group in range(lws["spec"]["replicas"]) for worker in range(size)]
    for workload in [c for c in children if c["kind"] in ("Deployment", "StatefulSet")]:
        mine = [p for p in w.engine_pods if p["metadata"]["ownerReferences"][0]["name"] == workload["metadata"]["name"]]
        fresh = workload is not old.get(("Deployment", workload["metadata"]["name"]), workload) or not mine
        for index in range(workload["spec"]["replicas"]):
            existing = next((p for p in mine if p["metadata"]["name"].endswith(f"-{index}")), None)
            if fresh or existing is None or existing["metadata"]["name"] in restarted:
                pods.append(pod(workload, index))
            elif existing["metadata"]["name"] in pushed:
                existing = copy.deepcopy(existing)
                existing["metadata"]["annotations"] |= settings.live_patch(existing, decided.settings)["metadata"]["annotations"]
                pods.append(existing)
            else:
                pods.append(existing)
    return world(sdep, children, pods, token=decided.token, pools_served=w.pools_served, lws_served=w.lws_served)


def settle(sdep, pools_served=False, lws_served=False) -> World:
    """A resource whose first pass has been carried out and has converged."""
    w = world(sdep, pools_served=pools_served, lws_served=lws_served)
    for _ in range(3):
        w = carried_out(w, decide(w))
    return w


def edited(w: World, **spec) -> World:
    sdep = make_sdep(**spec)
    sdep["metadata"]["generation"] = w.sdep["metadata"]["generation"] + 1
    sdep["status"] = w.sdep["status"]
    return replace(w, sdep=sdep)


def test_a_new_resource_applies_what_pods_reference_before_its_workload_and_is_pending():
    decided = decide(world(make_sdep(replicas=2)))
    assert kinds(decided.apply[0]) == [("Secret", "chat-admin"), ("Service", "chat"), ("PodDisruptionBudget", "chat")]
    assert kinds(decided.apply[1]) == [("Deployment", "chat")]
    assert decided.token == FRESH and not decided.prune and not decided.push and decided.restart is None
    assert decided.status["phase"] == "Pending" and decided.status["replicas"] == 0


def test_an_existing_admin_token_is_kept():
    assert decide(world(make_sdep(), token="kept")).token == "kept"


def test_a_converged_resource_plans_no_change_and_is_ready():
    w = settle(make_sdep(replicas=2))
    decided = decide(w)
    assert w.sdep["status"]["phase"] == "Ready"
    assert not any(changes(m, next(c for c in w.labelled["Deployment"])) for m in decided.apply[1])
    assert not decided.prune and not decided.push and decided.restart is None
    assert decided.status == w.sdep["status"], "a converged pass writes nothing new"


def test_a_template_change_is_progressing_in_the_pass_that_applies_it():
    w = edited(settle(make_sdep(replicas=2)), replicas=2, engine={"maxNumSeqs": 64})
    decided = decide(w)
    assert changes(decided.apply[1][0], w.labelled["Deployment"][0])
    assert decided.status["phase"] == "Progressing" and not decided.push
    assert carried_out(w, decided).sdep["status"]["phase"] == "Progressing"
    assert decide(carried_out(w, decided)).status["phase"] == "Ready"


def test_a_lower_token_budget_is_pushed_live_and_reported_once_it_lands():
    w = edited(settle(make_sdep(replicas=2)), replicas=2, engine={"tokenBudget": 256})
    decided = decide(w)
    assert not changes(decided.apply[1][0], w.labelled["Deployment"][0]), "no pod restarts"
    assert sorted(p["metadata"]["name"] for p in decided.push) == ["chat-0", "chat-1"]
    assert decided.settings["token_budget"] == 256
    assert decided.status["phase"] == "Ready" and decided.status["tokenBudget"] == 256

    one_failed = status_after(decided, {"chat-1": "connection refused"})
    assert one_failed["phase"] == "Progressing" and one_failed["tokenBudget"] == 512
    assert "settings not yet applied on pod chat-1: connection refused" in one_failed["conditions"][0]["message"]
    assert one_failed["conditions"][0]["reason"] == "SettingsPending"


def test_a_token_budget_above_the_one_pods_started_with_rolls_them_instead():
    w = edited(settle(make_sdep(replicas=2)), replicas=2, engine={"tokenBudget": 1024})
    decided = decide(w)
    assert changes(decided.apply[1][0], w.labelled["Deployment"][0]) and not decided.push
    assert decided.status["phase"] == "Progressing"


def test_pods_not_ready_yet_get_the_settings_from_their_flags_not_a_push():
    w = settle(make_sdep(replicas=2))
    w = replace(w, engine_pods=[pod(w.labelled["Deployment"][0], 0, ready=False), w.engine_pods[1]])
    decided = decide(edited(w, replicas=2, engine={"tokenBudget": 256}))
    assert [p["metadata"]["name"] for p in decided.push] == ["chat-1"]


MULTI = {"parallelism": {"tensor": 4, "pipeline": 4}}


def test_multi_pod_replicas_roll_one_whole_replica_at_a_time_and_never_in_the_pass_that_applies():
    w = edited(settle(make_sdep(replicas=2, **MULTI)), replicas=2, engine={"maxNumSeqs": 64}, **MULTI)
    restarts = []
    for _ in range(8):
        decided = decide(w)
        if any(changes(m, next(c for c in w.labelled["StatefulSet"] if c["metadata"]["name"] == m["metadata"]["name"]))
               for m in decided.apply[1]):
            assert decided.restart is None, "the StatefulSet controller must see the template first"
        if decided.restart:
            assert sorted(p["metadata"]["name"] for p in decided.restart_pods) == [
                f"{decided.restart}-0", f"{decided.restart}-1"], "whole replicas, every rank"
            restarts.append(decided.restart)
        w = carried_out(w, decided)
    assert restarts == ["chat-0", "chat-1"]
    assert w.sdep["status"]["phase"] == "Ready"


def test_a_stale_replica_waits_while_another_is_not_ready():
    w = edited(settle(make_sdep(replicas=2, **MULTI)), replicas=2, engine={"maxNumSeqs": 64}, **MULTI)
    w = carried_out(w, decide(w))  # the new templates are applied; every pod is stale now
    down = [p if p["metadata"]["name"] != "chat-1-1" else pod(w.labelled["StatefulSet"][1], 1, ready=False)
            for p in w.engine_pods]
    down[-1]["metadata"]["labels"][REVISION_LABEL] = "old"
    decided = decide(replace(w, engine_pods=down))
    assert decided.restart == "chat-1", "a stale replica that is already down goes first"


def test_scale_down_prunes_the_dropped_replica_and_is_progressing_meanwhile():
    w = edited(settle(make_sdep(replicas=2, **MULTI)), replicas=1, **MULTI)
    decided = decide(w)
    assert kinds(decided.prune) == [("StatefulSet", "chat-1")]
    assert decided.status["phase"] == "Progressing"


def test_a_layout_change_prunes_the_old_workloads_and_services():
    w = edited(settle(make_sdep(replicas=2, **MULTI)), replicas=2)
    decided = decide(w)
    assert sorted(kinds(decided.prune)) == [("Service", "chat-ranks"), ("StatefulSet", "chat-0"), ("StatefulSet", "chat-1")]
    assert kinds(decided.apply[1]) == [("Deployment", "chat")]


def env_names(workload):
    return [e["name"] for e in pod_template(workload)["spec"]["containers"][0]["env"]]


def test_where_the_cluster_serves_leader_worker_sets_a_multi_pod_replica_is_one_group():
    w = settle(make_sdep(replicas=2, **MULTI), lws_served=True)
    decided = decide(w)
    assert kinds(decided.apply[0]) == [("Secret", "chat-admin"), ("Service", "chat"), ("PodDisruptionBudget", "chat")]
    [lws] = decided.apply[1]
    assert (lws["kind"], lws["metadata"]["name"], lws["spec"]["replicas"]) == ("LeaderWorkerSet", "chat-lws", 2)
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] == 2 and group["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR"} & set(env_names(lws)), "LeaderWorkerSet sets LWS_* itself"
    service = decided.apply[0][1]
    assert service["spec"]["selector"][names.WORKER_INDEX_LABEL] == "0", "the groups' leaders serve"
    assert w.sdep["status"]["phase"] == "Ready" and w.sdep["status"]["readyReplicas"] == 2
    assert not decided.push and decided.restart is None
    assert w.sdep["status"]["selector"].endswith(f"{names.WORKER_INDEX_LABEL}=0")


def test_a_leader_worker_set_rolls_its_groups_itself_and_the_operator_restarts_nothing():
    w = edited(settle(make_sdep(replicas=2, **MULTI), lws_served=True), replicas=2, engine={"maxNumSeqs": 64}, **MULTI)
    decided = decide(w)
    assert changes(decided.apply[1][0], w.labelled["LeaderWorkerSet"][0])
    assert decided.restart is None and decided.restart_pods == []
    assert decided.status["phase"] == "Progressing"
    w = carried_out(w, decided)
    decided = decide(w)
    assert decided.restart is None and decided.status["phase"] == "Ready"


def test_a_lower_token_budget_reaches_the_group_leaders_live():
    w = edited(settle(make_sdep(replicas=2, **MULTI), lws_served=True), replicas=2, engine={"tokenBudget": 256}, **MULTI)
    decided = decide(w)
    assert sorted(p["metadata"]["name"] for p in decided.push) == ["chat-lws-0", "chat-lws-1"]
    assert not changes(decided.apply[1][0], w.labelled["LeaderWorkerSet"][0])


def test_statefulset_replicas_become_a_leader_worker_set_once_the_cluster_serves_them():
    w = replace(settle(make_sdep(replicas=2, **MULTI)), lws_served=True)
    decided = decide(w)
    assert kinds(decided.apply[1]) == [("LeaderWorkerSet", "chat-lws")]
    assert sorted(kinds(decided.prune)) == [("Service", "chat-ranks"), ("StatefulSet", "chat-0"), ("StatefulSet", "chat-1")]
    assert decided.restart is None and decided.status["phase"] == "Progressing"
    back = replace(carried_out(w, decided), lws_served=False)
    assert kinds(decide(back).apply[1]) == [("StatefulSet", "chat-0"), ("StatefulSet", "chat-1")]


def test_a_name_too_long_for_leader_worker_set_groups_fails_only_where_they_are_used():
    name = "a" * 48
    sdep = make_sdep(replicas=2, **MULTI)
    sdep["metadata"]["name"] = name
    assert decide(world(sdep)).status["phase"] == "Pending"
    failed = decide(world(sdep, lws_served=True)).status
    assert failed["phase"] == "Failed" and f"{name}-lws-1" in failed["conditions"][0]["message"]


def test_children_with_our_labels_that_another_resource_controls_are_never_pruned():
    w = settle(make_sdep())
    stranger = copy.deepcopy(w.labelled["Deployment"][0])
    stranger["metadata"] |= {"name": "chat-old", "ownerReferences": [
        {**names.owner_reference(w.sdep), "uid": "uid-of-a-deleted-chat"}]}
    w = replace(w, labelled={**w.labelled, "Deployment": w.labelled["Deployment"] + [stranger]})
    assert decide(w).prune == []


def test_an_invalid_spec_fails_naming_the_field_and_does_nothing():
    w = settle(make_sdep())
    decided = decide(edited(w, replicas=1, engine={"extraArgs": ["--token-budget=64"]}))
    assert decided.inputs is None and not decided.apply and not decided.prune and not decided.push
    assert decided.status["phase"] == "Failed"
    assert "spec.engine.extraArgs" in decided.status["conditions"][0]["message"]
    assert decided.status["readyReplicas"] == 1, "the last good spec's pods keep serving"


def test_an_inference_pool_is_planned_only_where_the_cluster_serves_it():
    sdep = make_sdep(gateway={"inferencePool": True})
    absent = decide(world(sdep))
    assert ("InferencePool", "chat") not in kinds(absent.apply[0])
    pool = next(c for c in absent.status["conditions"] if c["type"] == "InferencePoolReady")
    assert (pool["status"], pool["reason"]) == ("False", "CRDNotInstalled")
    assert absent.status["phase"] == "Pending", "the missing CRD does not fail the resource"

    served = settle(sdep, pools_served=True)
    assert ("InferencePool", "chat") in kinds(decide(served).apply[0])
    off = decide(edited(served, gateway={"inferencePool": False}))
    assert kinds(off.prune) == [("InferencePool", "chat")]
    assert all(c["type"] != "InferencePoolReady" for c in off.status["conditions"])


def test_an_edit_in_the_middle_of_a_rollout_restarts_nothing_until_its_templates_are_seen():
    w = edited(settle(make_sdep(replicas=2, **MULTI)), replicas=2, engine={"maxNumSeqs": 64}, **MULTI)
    w = carried_out(w, decide(w))  # the new templates are applied; every pod is stale now
    w = carried_out(w, decide(w))  # chat-0 restarted
    assert decide(w).restart == "chat-1", "without a new edit, the rollout goes on"
    again = decide(edited(w, replicas=2, engine={"maxNumSeqs": 32}, **MULTI))
    assert again.restart is None


CACHED = {"model": {"name": "m", "source": "hf://org/m", "cache": {"claimName": "models"}}}


def with_job(w: World, condition: str | None, **detail) -> World:
    """The world with its download Job finished (Complete or Failed), or still running (None)."""
    jobs = copy.deepcopy(w.labelled.get("Job", []))
    for job in jobs:
        job["status"] = {"conditions": [{"type": condition, "status": "True", **detail}]} if condition else {"active": 1}
    return replace(w, labelled={**w.labelled, "Job": jobs})


def cache_condition(st):
    return next(c for c in st["conditions"] if c["type"] == "ModelCacheReady")


def test_workloads_wait_for_the_model_cache_and_start_once_its_job_completed():
    first = decide(world(make_sdep(**CACHED)))
    assert [k for k, _ in kinds(first.apply[0])][-1] == "Job" and len(first.apply) == 1, "no workload yet"
    assert first.status["modelCache"]["state"] == "Downloading" and first.status["phase"] == "Pending"
    assert cache_condition(first.status)["reason"] == "Downloading"
    assert "model cache: Job chat-model-" in first.status["conditions"][0]["message"]

    w = with_job(carried_out(world(make_sdep(**CACHED)), first), None)
    assert len(decide(w).apply) == 1, "still downloading"
    ready = decide(with_job(w, "Complete"))
    assert kinds(ready.apply[1]) == [("Deployment", "chat")]
    assert ready.status["modelCache"] == {"state": "Ready", "claimName": "models", "job": kinds(first.apply[0])[-1][1],
                                          "message": "claim models holds the model"}
    assert cache_condition(ready.status)["status"] == "True"


def test_a_failed_download_says_why_and_starts_nothing():
    w = carried_out(world(make_sdep(**CACHED)), decide(world(make_sdep(**CACHED))))
    failed = decide(with_job(w, "Failed", reason="BackoffLimitExceeded", message="Job has reached the specified backoff limit"))
    assert len(failed.apply) == 1
    assert failed.status["modelCache"]["state"] == "Failed"
    assert cache_condition(failed.status)["reason"] == "DownloadFailed"
    assert "BackoffLimitExceeded: Job has reached the specified backoff limit" in failed.status["modelCache"]["message"]
    assert "delete the Job to try again" in failed.status["conditions"][0]["message"]


def settled_cached(**spec) -> World:
    w = world(make_sdep(**spec))
    w = with_job(carried_out(w, decide(w)), "Complete")
    for _ in range(3):
        w = with_job(carried_out(w, decide(w)), "Complete")
    return w


def test_a_new_source_downloads_while_the_old_pods_keep_serving():
    w = settled_cached(replicas=2, **CACHED)
    assert w.sdep["status"]["phase"] == "Ready"
    old_job = kinds(w.labelled["Job"])
    decided = decide(edited(w, replicas=2, model={**CACHED["model"], "source": "hf://org/next"}))
    assert kinds(decided.prune) == old_job, "the finished Job of the old source goes"
    assert len(decided.apply) == 1 and not any(k == "Deployment" for k, _ in kinds(decided.prune)), \
        "the Deployment is neither changed nor pruned while the new model downloads"
    assert decided.status["phase"] == "Progressing" and decided.status["readyReplicas"] == 2


def test_dropping_the_cache_prunes_its_job_and_claim_and_clears_its_status():
    sized = {"model": {"name": "m", "source": "hf://org/m", "cache": {"size": "10Gi"}}}
    w = settled_cached(**sized)
    assert sorted(kinds(w.labelled["PersistentVolumeClaim"])) == [("PersistentVolumeClaim", "chat-model-cache")]
    decided = decide(edited(w, model={"name": "m", "source": "hf://org/m", "diskSize": "1Gi"}))
    assert sorted(k for k, _ in kinds(decided.prune)) == ["Job", "PersistentVolumeClaim"]
    assert decided.status["modelCache"] is None, "removed by the status merge patch"
    assert all(c["type"] != "ModelCacheReady" for c in decided.status["conditions"])
