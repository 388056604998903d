"""Pure functions that turn a SarathiDeployment into the manifests of its children.

Every child is named after the resource and controlled by it, so deleting the resource
deletes them all:

  <name>-admin   Secret               the admin API token (generated once, by the caller)
  <name>-ranks   Service (headless)   rank discovery, when a replica spans pods as StatefulSets
  <name>         Service              the OpenAI API on the serving (rank-0) pods
  <name>         PodDisruptionBudget  at most one engine pod evicted at a time
  <name>         InferencePool        the serving pods for a Gateway API inference gateway, when
                                      spec.gateway.inferencePool asks and the cluster serves the API
  <name>-model-cache  PersistentVolumeClaim  the model cache, when spec.model.cache.size asks
  <name>-model-<digest>  Job          downloads an hf:// source into its cache, once
  <name>         Deployment           when a replica is one pod
  <name>-lws     LeaderWorkerSet      when a replica spans pods and the cluster serves them: one
                                      group per replica, started, restarted and rolled as a whole
  <name>-<i>     StatefulSet          one per replica when a replica spans pods, otherwise

`spec` is always the defaulted spec (spec.with_defaults). Each workload is built once per pass,
without the live settings (settings.py); its rollout hash is the digest of that template, and the
settings its pods start with are then written in.
"""

import base64
import copy
import hashlib
import json

from . import names, settings
from .names import CONTAINER, DIST_PORT, HTTP_PORT
from .spec import (
    GPU_RESOURCE, MODEL_DIR, OPERATOR_VOLUMES, Layout, ModelSource, download_job, layout, leader_worker_set_name,
    model_cache_claim, model_source, statefulset_name,
)

# Long enough for the engine to drain in-flight requests after SIGTERM.
TERMINATION_GRACE_SECONDS = 120


def children(sdep: dict, spec: dict, *, token: str, desired: dict, existing: dict[str, dict],
             inference_pools: bool = False, leader_worker_sets: bool = False) -> list[dict]:
    """Every child of the resource, workloads last. desired: the live settings (settings.py);
    existing: the workloads there are, by name (their pods keep the settings they started with
    while nothing else in their template changes); inference_pools, leader_worker_sets: the
    cluster serves InferencePools (the Gateway API Inference Extension's CRD is installed),
    LeaderWorkerSets."""
    lay = layout(spec["parallelism"], leader_worker_sets)
    children = [build_secret(sdep, token)]
    if lay.multi_pod and not lay.gang:
        children.append(build_ranks_service(sdep))
    children += [build_service(sdep, lay), build_pdb(sdep)]
    if spec["gateway"]["inferencePool"] and inference_pools:
        children.append(build_inference_pool(sdep, spec, lay))
    if spec["model"].get("cache", {}).get("size"):
        children.append(build_model_cache_claim(sdep, spec))
    if model_source(sdep["metadata"]["name"], spec["model"]).cached:
        children.append(build_download_job(sdep, spec))
    workloads = []
    for workload in build_workloads(sdep, spec, lay, token_digest(token)):
        meta = workload["metadata"]
        kept = settings.started_with(existing.get(meta["name"]), meta["annotations"][names.ROLLOUT_HASH])
        if kept is not None and not settings.live_reachable(kept, desired):
            kept = None  # its pods must start again with the new settings
        workloads.append(with_settings(workload, kept or desired, len(spec["engine"]["extraArgs"])))
    return children + workloads


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def engine_args(spec: dict, model_path: str) -> list[str]:
    """The `sarathi serve` arguments but the live settings; extraArgs come last so they can add
    flags we do not model."""
    engine, par = spec["engine"], spec["parallelism"]
    args = [
        "serve",
        "--model", model_path,
        "--served-model-name", spec["model"]["name"],
        "--host", "0.0.0.0",
        "--port", str(HTTP_PORT),
        "--policy", engine["policy"],
    ]
    for key, flag in (("maxNumSeqs", "--max-num-seqs"), ("maxModelLen", "--max-model-len")):
        if key in engine:
            args += [flag, str(engine[key])]
    args += [
        "--dtype", engine["dtype"],
        "--tensor-parallel-size", str(par["tensor"]),
        "--pipeline-parallel-size", str(par["pipeline"]),
        # Every pod is given GPUs: an engine that cannot use them must fail, not serve on the CPU.
        "--device", "cuda",
        "--stall-timeout", str(spec["probes"]["stallTimeoutSeconds"]),
    ]
    return args + list(engine["extraArgs"])


def _metadata(sdep: dict, name: str, **extra: dict) -> dict:
    meta = sdep["metadata"]
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": names.labels(meta["name"]),
        "ownerReferences": [names.owner_reference(sdep)],
        **extra,
    }


def build_secret(sdep: dict, token: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _metadata(sdep, names.admin_secret(sdep["metadata"]["name"])),
        "data": {names.ADMIN_TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def build_service(sdep: dict, lay: Layout) -> dict:
    name = sdep["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(sdep, name),
        "spec": {
            "selector": names.serving_selector(name, lay),
            "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http"}],
        },
    }


def build_ranks_service(sdep: dict) -> dict:
    name = sdep["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(sdep, names.ranks_service(name)),
        "spec": {
            "clusterIP": "None",
            # Ranks find rank 0 while starting up, before any of them is ready.
            "publishNotReadyAddresses": True,
            "selector": names.pod_selector(name),
            "ports": [{"name": "dist", "port": DIST_PORT, "targetPort": "dist"}],
        },
    }


def build_pdb(sdep: dict) -> dict:
    name = sdep["metadata"]["name"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(sdep, name),
        "spec": {
            # One pod at a time: in a multi-pod replica one pod takes the whole replica down,
            # so this also bounds voluntary disruption to one replica.
            "maxUnavailable": 1,
            # A pod that is not ready serves nothing; never let it block a node drain.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
            "selector": {"matchLabels": names.pod_selector(name)},
        },
    }


INFERENCE_POOL_API = "inference.networking.k8s.io/v1"
LEADER_WORKER_SET_API = "leaderworkerset.x-k8s.io/v1"
ENDPOINT_PICKER_PORT = 9002  # the Gateway API Inference Extension's default


def build_inference_pool(sdep: dict, spec: dict, lay: Layout) -> dict:
    """The Gateway API Inference Extension's InferencePool over the pods that serve the API (rank
    0 of each multi-pod replica), on the OpenAI port, with the endpoint picker the spec names."""
    name = sdep["metadata"]["name"]
    pool = {"selector": {"matchLabels": names.serving_selector(name, lay)}, "targetPorts": [{"number": HTTP_PORT}]}
    picker = spec["gateway"].get("endpointPicker")
    if picker:
        pool["endpointPickerRef"] = {"kind": "Service", "name": picker["name"],
                                     "port": {"number": picker.get("port", ENDPOINT_PICKER_PORT)},
                                     "failureMode": picker.get("failureMode", "FailClose")}
    return {"apiVersion": INFERENCE_POOL_API, "kind": "InferencePool", "metadata": _metadata(sdep, name), "spec": pool}


def build_workloads(sdep: dict, spec: dict, lay: Layout, admin_digest: str) -> list[dict]:
    """The workloads without the live settings, each with its rollout hash."""
    if lay.gang:
        return [build_leader_worker_set(sdep, spec, lay, admin_digest)]
    if lay.multi_pod:
        return [build_statefulset(sdep, spec, lay, admin_digest, replica) for replica in range(spec["replicas"])]
    return [build_deployment(sdep, spec, lay, admin_digest)]


def with_settings(workload: dict, live: dict, extra_args: int) -> dict:
    """The workload whose pods start with these live settings: flags before the spec's extraArgs
    (the last extra_args arguments), and the pod template's and workload's annotation."""
    out = json.loads(json.dumps(workload))
    encoded = settings.encode(live)
    out["metadata"]["annotations"][names.SETTINGS] = encoded
    template = pod_template(out)
    template["metadata"]["annotations"][names.SETTINGS] = encoded
    container = template["spec"]["containers"][0]
    cut = len(container["args"]) - extra_args
    container["args"] = container["args"][:cut] + settings.flags(live) + container["args"][cut:]
    return out


def pod_template(workload: dict) -> dict:
    """The template a workload's pods are made from (one for all pods of a LeaderWorkerSet)."""
    if workload["kind"] == "LeaderWorkerSet":
        return workload["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    return workload["spec"]["template"]


def _workload_metadata(sdep: dict, name: str, template: dict) -> dict:
    return _metadata(sdep, name, annotations={names.ROLLOUT_HASH: digest(template)})


def build_deployment(sdep: dict, spec: dict, lay: Layout, admin_digest: str) -> dict:
    name = sdep["metadata"]["name"]
    template = build_pod_template(sdep, spec, lay, admin_digest)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _workload_metadata(sdep, name, template),
        "spec": {
            "replicas": spec["replicas"],
            "selector": {"matchLabels": names.pod_selector(name)},
            # A rollout never lowers serving capacity: a new replica must be ready before an
            # old one goes. This needs one replica's worth of spare GPUs.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": template,
        },
    }


def build_statefulset(sdep: dict, spec: dict, lay: Layout, admin_digest: str, replica: int) -> dict:
    name = sdep["metadata"]["name"]
    sts_name = statefulset_name(name, replica)
    template = build_pod_template(sdep, spec, lay, admin_digest, replica)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _workload_metadata(sdep, sts_name, template),
        "spec": {
            "replicas": lay.pods_per_replica,
            "serviceName": names.ranks_service(name),
            # All ranks start together: rank 0 waits for the others to join its process group.
            "podManagementPolicy": "Parallel",
            # A rank cannot rejoin a running process group, so pods are never replaced one by
            # one: the operator restarts all ranks of a replica together (rollout.py).
            "updateStrategy": {"type": "OnDelete"},
            "selector": {"matchLabels": {**names.pod_selector(name), names.REPLICA_LABEL: str(replica)}},
            "template": template,
        },
    }


def build_leader_worker_set(sdep: dict, spec: dict, lay: Layout, admin_digest: str) -> dict:
    """One LeaderWorkerSet group per replica, every pod from one template: pod 0 (the leader)
    runs rank 0 and serves the API. LeaderWorkerSet schedules and restarts a group as a whole and
    rolls one group at a time, a new group ready before an old one goes (maxSurge 1)."""
    name = sdep["metadata"]["name"]
    template = build_pod_template(sdep, spec, lay, admin_digest)
    return {
        "apiVersion": LEADER_WORKER_SET_API,
        "kind": "LeaderWorkerSet",
        "metadata": _workload_metadata(sdep, leader_worker_set_name(name), template),
        "spec": {
            "replicas": spec["replicas"],
            # Rank 0 waits for the others to join its process group: all pods start together.
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {"type": "RollingUpdate",
                                "rollingUpdateConfiguration": {"maxUnavailable": 0, "maxSurge": 1}},
            "leaderWorkerTemplate": {
                "size": lay.pods_per_replica,
                # A rank cannot rejoin a running process group: one pod's restart restarts its group.
                "restartPolicy": "RecreateGroupOnPodRestart",
                "workerTemplate": template,
            },
        },
    }


def build_pod_template(sdep: dict, spec: dict, lay: Layout, admin_digest: str, replica: int | None = None) -> dict:
    name = sdep["metadata"]["name"]
    source = model_source(name, spec["model"])
    pod_labels = {**spec["podLabels"], **names.labels(name), **names.pod_selector(name)}
    if replica is not None:
        pod_labels[names.REPLICA_LABEL] = str(replica)

    volumes = [
        # NCCL and torch's shared-memory transport outgrow the container runtime's 64 MiB /dev/shm.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts = [
        {"name": "dshm", "mountPath": OPERATOR_VOLUMES["dshm"]},
    ]
    init_containers = []
    resources = spec["resources"]
    if source.pvc_claim:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": source.pvc_claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": MODEL_DIR, "readOnly": True})
    elif source.downloads_per_pod:
        volumes.append({"name": "model", "emptyDir": {"sizeLimit": source.disk_size} if source.disk_size else {}})
        mounts.append({"name": "model", "mountPath": MODEL_DIR, "readOnly": True})
        init_containers.append(_downloader(spec, source))
        if source.disk_size:
            # The download fills the pod's ephemeral storage: ask for it, unless the spec does.
            requests = {EPHEMERAL_STORAGE: source.disk_size, **resources.get("requests", {})}
            resources = {**resources, "requests": requests}

    container = {
        "name": CONTAINER,
        "image": spec["image"],
        "imagePullPolicy": spec["imagePullPolicy"],
        "command": ["sarathi"],
        "args": engine_args(spec, source.path),
        "ports": [{"name": "http", "containerPort": HTTP_PORT}]
        + ([{"name": "dist", "containerPort": DIST_PORT}] if lay.multi_pod else []),
        "env": _engine_env(name, lay, replica) + _api_key_env(spec) + list(spec["env"]),
        "resources": _resources(resources, lay.gpus_per_pod),
        # Loading weights and warming up can take many minutes: liveness starts once the engine is
        # ready, and from then on fails when it stalls (/health, --stall-timeout).
        "startupProbe": _probe("/ready", period=STARTUP_PERIOD,
                               failures=-(-spec["probes"]["startupTimeoutSeconds"] // STARTUP_PERIOD)),
        "livenessProbe": _probe("/health", period=10, failures=3),
        "readinessProbe": _probe("/ready", period=5, failures=2),
        "volumeMounts": mounts + list(spec["volumeMounts"]),
        **_security_context(spec),
    }
    pod_spec = {
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": volumes + list(spec["volumes"]),
    }
    if init_containers:
        pod_spec["initContainers"] = init_containers
    pod_spec.update(_pod_fields(spec))
    if "serviceAccountName" not in pod_spec:
        pod_spec["automountServiceAccountToken"] = False  # the engine never calls the Kubernetes API
    return {
        "metadata": {
            "labels": pod_labels,
            "annotations": {
                **spec["podAnnotations"],
                # A new admin token (the Secret was recreated) must reach the pods: roll them.
                names.ADMIN_TOKEN_DIGEST: admin_digest,
            },
        },
        "spec": pod_spec,
    }


EPHEMERAL_STORAGE = "ephemeral-storage"
DOWNLOADER = "model-download"
DOWNLOAD_RETRIES = 4  # the download Job's backoffLimit


def _downloader(spec: dict, source: ModelSource) -> dict:
    """The container that fills MODEL_DIR from the Hub: once per folder (`sarathi model download`)."""
    return {
        "name": DOWNLOADER,
        "image": spec["image"],
        "imagePullPolicy": spec["imagePullPolicy"],
        "command": ["sarathi", "model", "download", source.hf_repo, "--local-dir", source.path],
        "env": list(spec["env"]),
        "volumeMounts": [{"name": "model", "mountPath": MODEL_DIR}],
        **_security_context(spec),
    }


def build_model_cache_claim(sdep: dict, spec: dict) -> dict:
    """The claim for spec.model.cache.size."""
    cache = spec["model"]["cache"]
    claim = {
        "accessModes": [cache.get("accessMode", "ReadWriteMany")],
        "resources": {"requests": {"storage": cache["size"]}},
    }
    if cache.get("storageClassName"):
        claim["storageClassName"] = cache["storageClassName"]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _metadata(sdep, model_cache_claim(sdep["metadata"]["name"])), "spec": claim}


# What a download Job's pod takes from the spec's pod fields: where it may run and how it pulls
# and runs the image; not the engine's runtime class or its spread over nodes.
DOWNLOAD_POD_FIELDS = ("nodeSelector", "tolerations", "affinity", "priorityClassName", "serviceAccountName",
                       "imagePullSecrets", "securityContext")


def build_download_job(sdep: dict, spec: dict) -> dict:
    """The Job that downloads an hf:// source into its cache. Its name carries the digest of its
    pod template, which a Job cannot change: another source or setting is another Job."""
    name = sdep["metadata"]["name"]
    source = model_source(name, spec["model"])
    downloader = _downloader(spec, source)
    pod = {
        "restartPolicy": "Never",
        "containers": [downloader],
        "volumes": [{"name": "model", "persistentVolumeClaim": {"claimName": source.pvc_claim}}],
        **{k: v for k, v in _pod_fields(spec).items() if k in DOWNLOAD_POD_FIELDS},
    }
    if "serviceAccountName" not in pod:
        pod["automountServiceAccountToken"] = False
    template = {"metadata": {"labels": {**names.labels(name), names.COMPONENT_LABEL: DOWNLOADER}}, "spec": pod}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(sdep, download_job(name, digest(template))),
        "spec": {"backoffLimit": DOWNLOAD_RETRIES, "template": template},
    }


# Pod fields the spec passes through as they are, by the pod spec's own name, when set.
POD_FIELDS = {"nodeSelector": "nodeSelector", "tolerations": "tolerations", "affinity": "affinity",
              "topologySpreadConstraints": "topologySpreadConstraints", "priorityClassName": "priorityClassName",
              "runtimeClassName": "runtimeClassName", "serviceAccountName": "serviceAccountName",
              "imagePullSecrets": "imagePullSecrets", "podSecurityContext": "securityContext"}


def _pod_fields(spec: dict) -> dict:
    return {field: copy.deepcopy(spec[key]) for key, field in POD_FIELDS.items() if spec.get(key)}


def _security_context(spec: dict) -> dict:
    """The container's securityContext, for the engine and the model download step alike."""
    return {"securityContext": copy.deepcopy(spec["securityContext"])} if spec.get("securityContext") else {}


def _engine_env(name: str, lay: Layout, replica: int | None) -> list[dict]:
    env = [{
        "name": "SARATHI_ADMIN_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": names.admin_secret(name), "key": names.ADMIN_TOKEN_KEY}},
    }]
    # A LeaderWorkerSet's pods get LWS_WORKER_INDEX, LWS_GROUP_SIZE and LWS_LEADER_ADDRESS from it.
    if lay.multi_pod and not lay.gang:
        rank0 = f"{statefulset_name(name, replica)}-0"
        env += [
            {"name": "RANK", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{names.POD_INDEX_LABEL}']"}}},
            {"name": "WORLD_SIZE", "value": str(lay.pods_per_replica)},
            {"name": "MASTER_ADDR", "value": f"{rank0}.{names.ranks_service(name)}"},
            {"name": "MASTER_PORT", "value": str(DIST_PORT)},
        ]
    return env


def _api_key_env(spec: dict) -> list[dict]:
    secret = spec.get("auth", {}).get("apiKeySecret")
    if not secret:
        return []
    return [{"name": "SARATHI_API_KEY", "valueFrom": {"secretKeyRef": {"name": secret["name"], "key": secret["key"]}}}]


def _resources(overrides: dict, gpus: int) -> dict:
    # Extended resources cannot be overcommitted: requests must equal limits.
    return {
        "requests": {**overrides.get("requests", {}), GPU_RESOURCE: gpus},
        "limits": {**overrides.get("limits", {}), GPU_RESOURCE: gpus},
    }


STARTUP_PERIOD = 10  # seconds between startup probes


def _probe(path: str, *, period: int, failures: int) -> dict:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }
