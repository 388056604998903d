"""The SarathiDeployment spec as the operator reads it: defaults, pod layout, model location,
and the checks the CRD schema leaves to the operator.

The schema (crds/sarathideployments.yaml) rejects what a single field or a simple cross-field
rule can express. What is left here concerns what the operator renders: flags and env vars it
owns, the GPU count it derives, and the names of the children it creates.
"""

import copy
import re
from dataclasses import dataclass

GROUP = "serving.sarathi.dev"
VERSION = "v1alpha1"
KIND = "SarathiDeployment"
PLURAL = "sarathideployments"
API_VERSION = f"{GROUP}/{VERSION}"

BUILTIN_MODEL = "smollm2-135m-instruct"
MODEL_DIR = "/models"

# Mirrors the CRD's `default:` values (a unit test keeps them equal), so that an object stored
# before a default was added still renders the same.
DEFAULTS = {
    "imagePullPolicy": "IfNotPresent",
    "replicas": 1,
    "parallelism": {"tensor": 1, "pipeline": 1, "gpusPerNode": 8},
    "engine": {"policy": "sarathi", "tokenBudget": 512, "dtype": "auto", "extraArgs": []},
    "autotune": {"enabled": False, "intervalSeconds": 30},
    "probes": {"startupTimeoutSeconds": 1800, "stallTimeoutSeconds": 120},
    "gateway": {"inferencePool": False},
    "resources": {},
    "nodeSelector": {},
    "tolerations": [],
    "topologySpreadConstraints": [],
    "imagePullSecrets": [],
    "podLabels": {},
    "podAnnotations": {},
    "volumes": [],
    "volumeMounts": [],
    "env": [],
}

MANAGED_FLAGS = (
    "--model", "--served-model-name", "--host", "--port", "--policy", "--token-budget",
    "--tbt-slo-ms", "--slo-margin", "--max-num-seqs", "--max-model-len", "--dtype", "--tensor-parallel-size",
    "--pipeline-parallel-size", "--stall-timeout", "--api-key",
)
RESERVED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SARATHI_ADMIN_TOKEN", "SARATHI_API_KEY")
GPU_RESOURCE = "nvidia.com/gpu"

# A Service name is a DNS-1035 label; the longest Service suffix is "-ranks".
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = 63 - len("-ranks")
# A StatefulSet's pods carry `controller-revision-hash: <statefulset>-<10-char hash>`, a label
# value of at most 63 characters.
MAX_STATEFULSET_NAME = 52


def with_defaults(spec: dict, engine_image: str | None = None) -> dict:
    """The spec with every defaulted field filled in, the image from the operator's engine image
    when the spec names none; the input is left untouched."""
    merged = copy.deepcopy(DEFAULTS)
    if engine_image:
        merged["image"] = engine_image
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclass(frozen=True)
class Layout:
    """How one replica's GPUs are spread over pods, and what runs a replica that spans pods."""

    gpus_per_replica: int
    pods_per_replica: int
    gpus_per_pod: int
    gang: bool = False  # a multi-pod replica is one LeaderWorkerSet group, not a StatefulSet

    @property
    def multi_pod(self) -> bool:
        return self.pods_per_replica > 1


def layout(parallelism: dict, leader_worker_sets: bool = False) -> Layout:
    """A replica that fits one node is one pod; otherwise it fills whole nodes, one pod each, as
    one LeaderWorkerSet group where the cluster serves them (leader_worker_sets)."""
    gpus = parallelism["tensor"] * parallelism["pipeline"]
    per_node = parallelism["gpusPerNode"]
    if gpus <= per_node:
        return Layout(gpus, 1, gpus)
    return Layout(gpus, gpus // per_node, per_node, gang=leader_worker_sets)


@dataclass(frozen=True)
class ModelSource:
    """Where the engine finds its weights: `path` is what `--model` receives."""

    path: str
    pvc_claim: str | None = None  # mounted read-only at MODEL_DIR: a pvc:// source, or an hf:// cache
    hf_repo: str | None = None
    disk_size: str | None = None  # what the weights take on disk, when the spec says

    @property
    def downloads_per_pod(self) -> bool:
        """Each pod downloads into a volume of its own (an hf:// source without a cache)."""
        return self.hf_repo is not None and self.pvc_claim is None

    @property
    def cached(self) -> bool:
        """A Job downloads once into a claim the pods share (an hf:// source with a cache)."""
        return self.hf_repo is not None and self.pvc_claim is not None


def model_cache_claim(name: str) -> str:
    """The claim the operator creates for spec.model.cache.size."""
    return f"{name}-model-cache"


DOWNLOAD_JOB_DIGEST = 8


def download_job(name: str, template_digest: str) -> str:
    return f"{name}-model-{template_digest[:DOWNLOAD_JOB_DIGEST]}"


# A Job's name is a label value of its pods: at most 63 characters.
MAX_CACHED_NAME = 63 - len(download_job("", "0" * DOWNLOAD_JOB_DIGEST))


def model_source(name: str, model: dict) -> ModelSource:
    """name: the resource's; model: spec.model."""
    source = model["source"]
    if source.startswith("pvc://"):
        claim, _, path = source.removeprefix("pvc://").partition("/")
        return ModelSource(path=f"{MODEL_DIR}/{path}", pvc_claim=claim)
    if source.startswith("hf://"):
        repo = source.removeprefix("hf://")
        cache = model.get("cache")
        claim = (cache.get("claimName") or model_cache_claim(name)) if cache else None
        return ModelSource(path=f"{MODEL_DIR}/{repo}", pvc_claim=claim, hf_repo=repo, disk_size=model.get("diskSize"))
    return ModelSource(path=source)


def statefulset_name(name: str, replica: int) -> str:
    return f"{name}-{replica}"


def leader_worker_set_name(name: str) -> str:
    """Not the resource's own name: LeaderWorkerSet makes a headless Service of its name, and
    `<name>` is the API's Service."""
    return f"{name}-lws"


def gang_statefulset_name(name: str, replica: int) -> str:
    """The StatefulSet LeaderWorkerSet makes for the workers of one group (replica)."""
    return f"{leader_worker_set_name(name)}-{replica}"


def validate(name: str, spec: dict, leader_worker_sets: bool = False) -> list[str]:
    """Problems with a (defaulted) spec that the schema cannot see; empty when it can run.
    leader_worker_sets: multi-pod replicas are LeaderWorkerSet groups (longer names)."""
    problems = []
    if not _DNS1035.match(name) or len(name) > MAX_NAME:
        problems.append(
            f"metadata.name {name!r} must be a DNS-1035 label (lower-case letters, digits and "
            f"'-', starting with a letter) of at most {MAX_NAME} characters, because it names "
            f"the Services the operator creates"
        )
    lay = layout(spec["parallelism"], leader_worker_sets)
    if lay.multi_pod:
        last = max(spec["replicas"] - 1, 0)
        longest = gang_statefulset_name(name, last) if lay.gang else statefulset_name(name, last)
        if len(longest) > MAX_STATEFULSET_NAME:
            problems.append(
                f"metadata.name {name!r} is too long for a multi-pod replica: StatefulSet name "
                f"{longest!r} exceeds {MAX_STATEFULSET_NAME} characters"
            )
    if model_source(name, spec["model"]).cached and len(name) > MAX_CACHED_NAME:
        problems.append(
            f"metadata.name {name!r} is too long for a model cache: the download Job's name "
            f"(<name>-model-<8 hex digits>) must fit a 63-character label, so at most {MAX_CACHED_NAME} characters"
        )
    managed = [a for a in spec["engine"]["extraArgs"] if a.split("=", 1)[0] in MANAGED_FLAGS]
    if managed:
        problems.append(
            f"spec.engine.extraArgs must not set flags the operator manages: {', '.join(managed)}; "
            f"use the matching spec fields instead"
        )
    if spec["autotune"]["enabled"] and (spec["engine"]["policy"] != "sarathi" or spec["parallelism"]["pipeline"] > 1):
        problems.append(
            "spec.autotune needs spec.engine.policy sarathi and spec.parallelism.pipeline 1: the engines "
            "plan each iteration's prefill chunks for the SLO, which only the sarathi policy chunks, "
            "and not yet across pipeline stages"
        )
    if not spec.get("image"):
        problems.append("spec.image is not set and the operator has no default engine image: set spec.image, "
                        "or install the operator with one (the chart's engineImage, `sarathi operator --engine-image`)")
    problems += pod_field_conflicts(spec)
    reserved = [e["name"] for e in spec["env"] if e["name"] in RESERVED_ENV]
    if reserved:
        problems.append(f"spec.env must not set {', '.join(reserved)}: the operator sets them")
    for kind in ("limits", "requests"):
        if GPU_RESOURCE in spec["resources"].get(kind, {}):
            problems.append(
                f"spec.resources.{kind} must not set {GPU_RESOURCE}: it follows from "
                f"spec.parallelism (tensor x pipeline GPUs per replica)"
            )
    return problems


# The pod's own volumes and where they are mounted (build.py).
OPERATOR_VOLUMES = {"dshm": "/dev/shm", "model": MODEL_DIR}


def pod_field_conflicts(spec: dict) -> list[str]:
    """The spec's pod fields that would collide with what the operator sets on the pods: the
    labels it selects them by, its annotations, its volumes and their mount paths."""
    from . import names  # names builds on this module's constants

    problems = []
    owned_labels = sorted(set(spec["podLabels"]) & names.operator_pod_labels())
    if owned_labels:
        problems.append(f"spec.podLabels must not set {', '.join(owned_labels)}: the operator selects its pods by them")
    owned_annotations = sorted(k for k in spec["podAnnotations"] if k.startswith(GROUP + "/"))
    if owned_annotations:
        problems.append(f"spec.podAnnotations must not set {', '.join(owned_annotations)}: "
                        f"the operator owns the {GROUP}/ annotations")
    reserved = [v["name"] for v in spec["volumes"] if v["name"] in OPERATOR_VOLUMES]
    if reserved:
        problems.append(f"spec.volumes must not be named {', '.join(reserved)}: the operator's own volumes")
    defined = {v["name"] for v in spec["volumes"]}
    for i, mount in enumerate(spec["volumeMounts"]):
        if mount["name"] not in defined:
            problems.append(f"spec.volumeMounts[{i}] mounts volume {mount['name']!r}, which spec.volumes does not define")
        taken = [p for p in OPERATOR_VOLUMES.values() if _overlaps(mount["mountPath"], p)]
        if taken:
            problems.append(f"spec.volumeMounts[{i}].mountPath {mount['mountPath']!r} overlaps {taken[0]}, "
                            "where the operator mounts its own volume")
    return problems


def _overlaps(a: str, b: str) -> bool:
    """One path is the other or lies under it."""
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)
