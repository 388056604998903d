import base64
import json

from sdeps import make_sdep

from sarathi_operator import build, names, settings
from sarathi_operator.spec import layout

TOKEN = "s3cret"


def built(obj, existing=None, **served):
    return build.children(obj, obj["spec"], token=TOKEN, desired=settings.desired(obj["spec"], obj.get("status", {})),
                          existing=existing or {}, **served)


def children(obj, existing=None, **served):
    return {(c["kind"], c["metadata"]["name"]): c for c in built(obj, existing, **served)}


def engine(workload):
    [container] = build.pod_template(workload)["spec"]["containers"]
    return container


def env(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def flag(args, name):
    return args[args.index(name) + 1]


def test_single_pod_replica_is_a_deployment_with_its_services():
    plan = children(make_sdep(replicas=3))
    assert set(plan) == {
        ("Secret", "chat-admin"), ("Service", "chat"),
        ("PodDisruptionBudget", "chat"), ("Deployment", "chat"),
    }
    assert list(plan)[-1] == ("Deployment", "chat"), "workloads are applied last"
    assert plan[("Deployment", "chat")]["spec"]["replicas"] == 3


def test_every_child_is_owned_labelled_and_namespaced():
    for child in built(make_sdep()):
        meta = child["metadata"]
        assert meta["namespace"] == "ml"
        assert meta["ownerReferences"] == [{
            "apiVersion": "serving.sarathi.dev/v1alpha1", "kind": "SarathiDeployment", "name": "chat",
            "uid": "uid-chat", "controller": True, "blockOwnerDeletion": True,
        }]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "sarathi-operator"
        assert meta["labels"]["app.kubernetes.io/instance"] == "chat"
        assert meta["labels"][names.DEPLOYMENT_LABEL] == "chat"


def test_tp2_pod_requests_two_gpus_and_gets_the_engine_flags():
    obj = make_sdep(parallelism={"tensor": 2}, engine={"tokenBudget": 1024, "maxNumSeqs": 64})
    container = engine(children(obj)[("Deployment", "chat")])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert container["command"] == ["sarathi"]
    args = container["args"]
    assert args[0] == "serve"
    assert flag(args, "--tensor-parallel-size") == "2"
    assert flag(args, "--pipeline-parallel-size") == "1"
    assert flag(args, "--token-budget") == "1024"
    assert flag(args, "--max-num-seqs") == "64"
    assert "--max-model-len" not in args
    assert flag(args, "--model") == "smollm2-135m-instruct"
    assert flag(args, "--served-model-name") == "chat"
    assert (flag(args, "--host"), flag(args, "--port"), flag(args, "--policy")) == ("0.0.0.0", "8000", "sarathi")


def test_extra_args_come_after_the_managed_flags():
    obj = make_sdep(engine={"extraArgs": ["--enable-prefix-caching"]})
    assert engine(children(obj)[("Deployment", "chat")])["args"][-1] == "--enable-prefix-caching"


def test_pod_has_probes_admin_token_and_drain_time():
    workload = children(make_sdep())[("Deployment", "chat")]
    pod = workload["spec"]["template"]["spec"]
    container = engine(workload)
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    # startup: until the engine has loaded and warmed up, for as long as spec.probes allows
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/ready" and startup["periodSeconds"] * startup["failureThreshold"] == 1800
    args = container["args"]
    assert flag(args, "--device") == "cuda" and flag(args, "--stall-timeout") == "120"
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]
    assert env(container)["SARATHI_ADMIN_TOKEN"] == {"secretKeyRef": {"name": "chat-admin", "key": "token"}}
    assert "RANK" not in env(container)
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert pod["automountServiceAccountToken"] is False


def test_an_api_key_secret_reaches_the_engine_as_its_env():
    container = engine(children(make_sdep(auth={"apiKeySecret": {"name": "keys", "key": "chat"}}))[
        ("Deployment", "chat")])
    assert env(container)["SARATHI_API_KEY"] == {"secretKeyRef": {"name": "keys", "key": "chat"}}
    assert "SARATHI_API_KEY" not in env(engine(children(make_sdep())[("Deployment", "chat")]))


def test_probe_timeouts_follow_the_spec():
    container = engine(children(make_sdep(probes={"startupTimeoutSeconds": 3605, "stallTimeoutSeconds": 45}))[
        ("Deployment", "chat")])
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3605 > startup["periodSeconds"] * (
        startup["failureThreshold"] - 1)
    assert flag(container["args"], "--stall-timeout") == "45"


def test_user_env_resources_node_selector_and_tolerations_reach_the_pod():
    toleration = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}
    obj = make_sdep(
        env=[{"name": "HF_TOKEN", "value": "x"}],
        resources={"limits": {"memory": "32Gi"}, "requests": {"cpu": "4"}},
        nodeSelector={"gpu": "a100"},
        tolerations=[toleration],
    )
    workload = children(obj)[("Deployment", "chat")]
    container = engine(workload)
    assert env(container)["HF_TOKEN"] == "x"
    assert container["resources"] == {
        "requests": {"cpu": "4", "nvidia.com/gpu": 1},
        "limits": {"memory": "32Gi", "nvidia.com/gpu": 1},
    }
    assert workload["spec"]["template"]["spec"]["nodeSelector"] == {"gpu": "a100"}
    assert workload["spec"]["template"]["spec"]["tolerations"] == [toleration]


def test_pod_fields_reach_every_pod_beside_the_operators_own():
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}}
    spread = [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway",
               "labelSelector": {"matchLabels": {names.DEPLOYMENT_LABEL: "chat"}}}]
    multi = {"tensor": 8, "pipeline": 2}
    for parallelism, kind, name, lws in (({}, "Deployment", "chat", False), (multi, "StatefulSet", "chat-0", False),
                                         (multi, "LeaderWorkerSet", "chat-lws", True)):
        obj = make_sdep(
            parallelism=parallelism, affinity=affinity, topologySpreadConstraints=spread,
            priorityClassName="inference", runtimeClassName="nvidia", serviceAccountName="engine",
            imagePullSecrets=[{"name": "registry"}], podLabels={"team": "ml"}, podAnnotations={"owner": "ml"},
            podSecurityContext={"runAsNonRoot": True, "fsGroup": 1000},
            securityContext={"allowPrivilegeEscalation": False},
            volumes=[{"name": "cache", "emptyDir": {}}], volumeMounts=[{"name": "cache", "mountPath": "/cache"}],
        )
        obj["spec"]["model"] |= {"source": "hf://org/model", "diskSize": "1Gi"}
        workload = children(obj, leader_worker_sets=lws)[(kind, name)]
        template = build.pod_template(workload)
        pod = template["spec"]
        assert pod["affinity"] == affinity and pod["topologySpreadConstraints"] == spread
        assert pod["priorityClassName"] == "inference" and pod["runtimeClassName"] == "nvidia"
        assert pod["serviceAccountName"] == "engine" and "automountServiceAccountToken" not in pod
        assert pod["imagePullSecrets"] == [{"name": "registry"}]
        assert pod["securityContext"] == {"runAsNonRoot": True, "fsGroup": 1000}
        assert template["metadata"]["labels"]["team"] == "ml"
        assert template["metadata"]["labels"][names.DEPLOYMENT_LABEL] == "chat"
        assert template["metadata"]["annotations"]["owner"] == "ml"
        assert names.ADMIN_TOKEN_DIGEST in template["metadata"]["annotations"]
        assert [v["name"] for v in pod["volumes"]] == ["dshm", "model", "cache"]
        assert {"name": "cache", "mountPath": "/cache"} in engine(workload)["volumeMounts"]
        for container in pod["containers"] + pod["initContainers"]:
            assert container["securityContext"] == {"allowPrivilegeEscalation": False}


def test_a_pod_without_a_service_account_mounts_no_token():
    pod = children(make_sdep())[("Deployment", "chat")]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert not {"affinity", "priorityClassName", "serviceAccountName", "securityContext"} & set(pod)


def test_an_inference_pool_selects_the_serving_pods_where_the_cluster_serves_the_api():
    obj = make_sdep(gateway={"inferencePool": True, "endpointPicker": {"name": "chat-epp"}})
    assert ("InferencePool", "chat") not in children(obj)  # the CRD is not installed
    pool = {(c["kind"], c["metadata"]["name"]): c for c in build.children(
        obj, obj["spec"], token=TOKEN, desired=settings.desired(obj["spec"], {}), existing={},
        inference_pools=True)}[("InferencePool", "chat")]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"] == {
        "selector": {"matchLabels": names.serving_selector("chat", layout(obj["spec"]["parallelism"]))},
        "targetPorts": [{"number": 8000}],
        "endpointPickerRef": {"kind": "Service", "name": "chat-epp", "port": {"number": 9002}, "failureMode": "FailClose"},
    }
    multi = make_sdep(parallelism={"tensor": 8, "pipeline": 2}, gateway={"inferencePool": True})
    [pool] = [c for c in build.children(multi, multi["spec"], token=TOKEN, desired=settings.desired(multi["spec"], {}),
                                        existing={}, inference_pools=True) if c["kind"] == "InferencePool"]
    assert pool["spec"]["selector"]["matchLabels"][names.POD_INDEX_LABEL] == "0"  # rank 0 serves
    assert "endpointPickerRef" not in pool["spec"]


def test_deployment_rolls_without_losing_capacity():
    strategy = children(make_sdep())[("Deployment", "chat")]["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_service_targets_the_openai_port_of_engine_pods():
    plan = children(make_sdep())
    service = plan[("Service", "chat")]
    template_labels = plan[("Deployment", "chat")]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]
    assert service["spec"]["selector"].items() <= template_labels.items()


def test_secret_holds_the_given_token():
    secret = children(make_sdep())[("Secret", "chat-admin")]
    assert base64.b64decode(secret["data"]["token"]).decode() == TOKEN


def test_tp4_pp4_on_8_gpu_nodes_is_a_statefulset_per_replica_with_ranks_wired():
    obj = make_sdep(parallelism={"tensor": 4, "pipeline": 4, "gpusPerNode": 8}, replicas=2)
    plan = children(obj)
    assert ("Deployment", "chat") not in plan
    assert ("Service", "chat-ranks") in plan
    for replica in (0, 1):
        sts = plan[("StatefulSet", f"chat-{replica}")]
        assert sts["spec"]["replicas"] == 2
        assert sts["spec"]["serviceName"] == "chat-ranks"
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        assert sts["spec"]["updateStrategy"] == {"type": "OnDelete"}
        container = engine(sts)
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert flag(container["args"], "--tensor-parallel-size") == "4"
        assert flag(container["args"], "--pipeline-parallel-size") == "4"
        wired = env(container)
        assert wired["RANK"] == {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
        assert wired["WORLD_SIZE"] == "2"
        assert wired["MASTER_ADDR"] == f"chat-{replica}-0.chat-ranks"
        assert wired["MASTER_PORT"] == "29500"
        assert {"name": "dist", "containerPort": 29500} in container["ports"]
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert labels[names.REPLICA_LABEL] == str(replica)


def test_multi_pod_service_selects_only_rank_zero():
    obj = make_sdep(parallelism={"tensor": 4, "pipeline": 4})
    plan = children(obj)
    assert plan[("Service", "chat")]["spec"]["selector"][names.POD_INDEX_LABEL] == "0"
    ranks = plan[("Service", "chat-ranks")]["spec"]
    assert ranks["clusterIP"] == "None" and ranks["publishNotReadyAddresses"] is True
    assert names.POD_INDEX_LABEL not in ranks["selector"]


def test_tp4_pp4_where_leader_worker_sets_are_served_is_one_group_per_replica_from_one_template():
    obj = make_sdep(parallelism={"tensor": 4, "pipeline": 4, "gpusPerNode": 8}, replicas=3, engine={"tokenBudget": 256})
    plan = children(obj, leader_worker_sets=True)
    assert [key for key in plan if key[0] in ("StatefulSet", "Deployment", "LeaderWorkerSet")] == [
        ("LeaderWorkerSet", "chat-lws")]
    assert ("Service", "chat-ranks") not in plan, "LeaderWorkerSet's own headless Service names the leader"
    lws = plan[("LeaderWorkerSet", "chat-lws")]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1" and lws["spec"]["replicas"] == 3
    assert lws["spec"]["startupPolicy"] == "LeaderCreated"
    assert lws["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"] == {"maxUnavailable": 0, "maxSurge": 1}
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] == 2 and "leaderTemplate" not in group, "the leader runs the same command"
    container = engine(lws)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert flag(container["args"], "--token-budget") == "256", "the live settings are in the template"
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(env(container))
    assert {"name": "dist", "containerPort": 29500} in container["ports"]
    labels = group["workerTemplate"]["metadata"]["labels"]
    assert names.REPLICA_LABEL not in labels and labels[names.DEPLOYMENT_LABEL] == "chat"
    assert group["workerTemplate"]["metadata"]["annotations"][names.SETTINGS] == lws["metadata"]["annotations"][names.SETTINGS]
    assert plan[("Service", "chat")]["spec"]["selector"][names.WORKER_INDEX_LABEL] == "0"


def test_a_replica_on_one_node_stays_a_deployment_where_leader_worker_sets_are_served():
    plan = children(make_sdep(parallelism={"tensor": 2, "pipeline": 1}), leader_worker_sets=True)
    assert ("Deployment", "chat") in plan and ("LeaderWorkerSet", "chat-lws") not in plan


def test_pvc_source_mounts_the_claim_read_only():
    obj = make_sdep(model={"name": "llama", "source": "pvc://weights/llama-3-8b"})
    workload = children(obj)[("Deployment", "chat")]
    pod = workload["spec"]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in pod["volumes"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in engine(workload)["volumeMounts"]
    assert flag(engine(workload)["args"], "--model") == "/models/llama-3-8b"
    assert "initContainers" not in pod


def test_hf_source_downloads_in_an_init_container_into_ephemeral_storage_of_the_models_size():
    obj = make_sdep(model={"name": "smol", "source": "hf://HuggingFaceTB/SmolLM2-135M", "diskSize": "2Gi"},
                    env=[{"name": "HF_TOKEN", "value": "t"}])
    workload = children(obj)[("Deployment", "chat")]
    pod = workload["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    target = "/models/HuggingFaceTB/SmolLM2-135M"
    assert init["command"] == ["sarathi", "model", "download", "HuggingFaceTB/SmolLM2-135M", "--local-dir", target]
    assert init["env"] == [{"name": "HF_TOKEN", "value": "t"}]
    assert flag(engine(workload)["args"], "--model") == target
    assert {"name": "model", "emptyDir": {"sizeLimit": "2Gi"}} in pod["volumes"]
    assert engine(workload)["resources"]["requests"]["ephemeral-storage"] == "2Gi"
    assert not any(c["kind"] in ("Job", "PersistentVolumeClaim") for c in built(obj))

    own = make_sdep(model={"name": "smol", "source": "hf://org/m", "diskSize": "2Gi"},
                    resources={"requests": {"ephemeral-storage": "5Gi", "cpu": "4"}})
    requests = engine(children(own)[("Deployment", "chat")])["resources"]["requests"]
    assert requests["ephemeral-storage"] == "5Gi" and requests["cpu"] == "4", "the spec's own request wins"


def download_job(obj):
    [job] = [c for c in built(obj) if c["kind"] == "Job"]
    return job


def test_a_cached_hf_source_is_downloaded_once_by_a_job_and_mounted_read_only_by_the_pods():
    placement = {"nodeSelector": {"pool": "cpu"}, "tolerations": [{"operator": "Exists"}]}
    obj = make_sdep(model={"name": "smol", "source": "hf://org/m", "cache": {"claimName": "models"}},
                    env=[{"name": "HF_TOKEN", "value": "t"}], runtimeClassName="nvidia",
                    topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}],
                    **placement)
    workload = children(obj)[("Deployment", "chat")]
    pod = workload["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in engine(workload)["volumeMounts"]
    assert "ephemeral-storage" not in engine(workload)["resources"]["requests"]

    job = download_job(obj)
    assert job["metadata"]["name"].startswith("chat-model-") and len(job["metadata"]["name"]) == len("chat-model-") + 8
    template = job["spec"]["template"]
    [downloader] = template["spec"]["containers"]
    assert downloader["command"] == ["sarathi", "model", "download", "org/m", "--local-dir", "/models/org/m"]
    assert downloader["env"] == [{"name": "HF_TOKEN", "value": "t"}]
    assert template["spec"]["volumes"] == [{"name": "model", "persistentVolumeClaim": {"claimName": "models"}}]
    assert template["spec"]["restartPolicy"] == "Never"
    assert template["spec"]["nodeSelector"] == placement["nodeSelector"]
    assert "runtimeClassName" not in template["spec"] and "topologySpreadConstraints" not in template["spec"]
    assert template["metadata"]["labels"][names.COMPONENT_LABEL] == "model-download", "not an engine pod"
    assert not any(c["kind"] == "PersistentVolumeClaim" for c in built(obj)), "an existing claim is not created"

    assert download_job(obj) == job, "the same spec, the same Job"
    other = make_sdep(model={"name": "smol", "source": "hf://org/m", "cache": {"claimName": "models"}},
                      env=[{"name": "HF_TOKEN", "value": "other"}], runtimeClassName="nvidia", **placement)
    assert download_job(other)["metadata"]["name"] != job["metadata"]["name"], "a Job's template cannot change"


def test_a_sized_cache_is_a_claim_the_operator_creates():
    obj = make_sdep(model={"name": "smol", "source": "hf://org/m", "cache": {"size": "100Gi", "storageClassName": "nfs"}})
    claim = children(obj)[("PersistentVolumeClaim", "chat-model-cache")]
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "100Gi"}},
                             "storageClassName": "nfs"}
    assert claim["metadata"]["ownerReferences"][0]["name"] == "chat"
    pod = children(obj)[("Deployment", "chat")]["spec"]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "chat-model-cache", "readOnly": True}} in pod["volumes"]
    rwo = make_sdep(model={"name": "smol", "source": "hf://org/m", "cache": {"size": "1Gi", "accessMode": "ReadWriteOnce"}})
    assert children(rwo)[("PersistentVolumeClaim", "chat-model-cache")]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_pdb_allows_one_disruption_and_never_blocks_on_unready_pods():
    pdb = children(make_sdep())[("PodDisruptionBudget", "chat")]["spec"]
    assert pdb["maxUnavailable"] == 1 and pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["selector"]["matchLabels"] == names.pod_selector("chat")


def rollout_hash(obj):
    return children(obj)[("Deployment", "chat")]["metadata"]["annotations"][names.ROLLOUT_HASH]


def test_the_rollout_hash_ignores_the_live_settings_only():
    base = rollout_hash(make_sdep())
    assert rollout_hash(make_sdep(engine={"tokenBudget": 4096})) == base
    tuned = make_sdep(slo={"tbtP99Ms": 100}, autotune={"enabled": True})
    tuned["status"] = {"autotune": {"state": {"margin": 0.7, "infeasible": False}}}
    assert rollout_hash(tuned) == base
    assert rollout_hash(make_sdep(engine={"maxNumSeqs": 8})) != base
    other_token = build.children(make_sdep(), make_sdep()["spec"], token="other", desired=settings.desired(
        make_sdep()["spec"], {}), existing={})[-1]
    assert other_token["metadata"]["annotations"][names.ROLLOUT_HASH] != base


def test_new_workloads_start_with_the_desired_settings_as_flags_and_annotations():
    obj = make_sdep(engine={"tokenBudget": 300, "extraArgs": ["--seed", "3"]}, slo={"tbtP99Ms": 150},
                    autotune={"enabled": True})
    obj["status"] = {"autotune": {"state": {"margin": 0.8, "infeasible": False}}}
    workload = children(obj)[("Deployment", "chat")]
    wanted = {"token_budget": 300, "tbt_slo_ms": 150, "slo_margin": 0.8}
    assert json.loads(workload["metadata"]["annotations"][names.SETTINGS]) == wanted
    assert json.loads(workload["spec"]["template"]["metadata"]["annotations"][names.SETTINGS]) == wanted
    args = engine(workload)["args"]
    assert (flag(args, "--token-budget"), flag(args, "--tbt-slo-ms"), flag(args, "--slo-margin")) == ("300", "150", "0.8")
    assert args[-2:] == ["--seed", "3"]  # extraArgs stay last


def test_a_settings_only_change_keeps_the_settings_the_pods_started_with():
    running = children(make_sdep())[("Deployment", "chat")]
    changed = make_sdep(engine={"tokenBudget": 256})
    kept = children(changed, existing={"chat": running})[("Deployment", "chat")]
    assert kept == running  # no rollout: the reconciler pushes 256 live
    rolled = make_sdep(engine={"tokenBudget": 256, "maxNumSeqs": 8})
    fresh = children(rolled, existing={"chat": running})[("Deployment", "chat")]
    assert flag(engine(fresh)["args"], "--token-budget") == "256"  # rolls anyway, with the new budget


def test_a_budget_above_the_started_one_rolls_the_pods():
    """Their engines warmed up for 512 and refuse more live."""
    running = children(make_sdep())[("Deployment", "chat")]
    raised = children(make_sdep(engine={"tokenBudget": 1024}), existing={"chat": running})[("Deployment", "chat")]
    assert flag(engine(raised)["args"], "--token-budget") == "1024"
    assert raised["spec"]["template"] != running["spec"]["template"]


def test_multi_pod_scale_up_starts_new_replicas_with_the_desired_settings():
    before = make_sdep(parallelism={"tensor": 4, "pipeline": 4}, replicas=1)
    running = children(before)[("StatefulSet", "chat-0")]
    after = make_sdep(parallelism={"tensor": 4, "pipeline": 4}, replicas=2, engine={"tokenBudget": 256})
    planned = children(after, existing={"chat-0": running})
    assert flag(engine(planned[("StatefulSet", "chat-0")])["args"], "--token-budget") == "512"
    assert flag(engine(planned[("StatefulSet", "chat-1")])["args"], "--token-budget") == "256"


def test_children_are_deterministic():
    obj = make_sdep(parallelism={"tensor": 4, "pipeline": 4}, replicas=3)
    assert built(obj) == built(obj)
    assert layout(obj["spec"]["parallelism"]).pods_per_replica == 2


def test_the_engine_cli_accepts_the_rendered_arguments():
    """The contract with `sarathi serve`, checked against the engine's own parser."""
    from sarathi_engine.cli import build_parser

    obj = make_sdep(
        parallelism={"tensor": 4, "pipeline": 4},
        engine={"policy": "vllm", "tokenBudget": 2048, "maxNumSeqs": 128, "maxModelLen": 8192, "dtype": "bfloat16"},
    )
    args = engine(children(obj)[("StatefulSet", "chat-0")])["args"]
    parsed = build_parser().parse_args(args)
    tuned = make_sdep(slo={"tbtP99Ms": 120}, autotune={"enabled": True})
    tuned["status"] = {"autotune": {"state": {"margin": 0.75, "infeasible": False}}}
    planned = build_parser().parse_args(engine(children(tuned)[("Deployment", "chat")])["args"])
    assert (planned.tbt_slo_ms, planned.slo_margin) == (120, 0.75)
    assert (parsed.command, parsed.model, parsed.served_model_name, parsed.host, parsed.port) == (
        "serve", "smollm2-135m-instruct", "chat", "0.0.0.0", 8000)
    assert (parsed.policy, parsed.token_budget, parsed.max_num_seqs, parsed.max_model_len, parsed.dtype) == (
        "vllm", 2048, 128, 8192, "bfloat16")
    assert (parsed.tensor_parallel_size, parsed.pipeline_parallel_size) == (4, 4)


def test_the_serving_selector_published_in_the_status_reads_back_as_the_selector():
    for lws in (False, True):
        selector = names.serving_selector("chat", layout({"tensor": 8, "pipeline": 2, "gpusPerNode": 8}, lws))
        assert names.selector_from_string(names.selector_string(selector)) == selector
    assert names.selector_from_string("") == {}
