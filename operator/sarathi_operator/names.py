"""Names, labels, selectors and annotation keys shared by the builders and the reconciler."""

from .spec import API_VERSION, GROUP, KIND, Layout

OPERATOR = "sarathi-operator"
CONTAINER = "engine"
HTTP_PORT = 8000
DIST_PORT = 29500

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
COMPONENT_LABEL = "app.kubernetes.io/component"
DEPLOYMENT_LABEL = f"{GROUP}/deployment"
REPLICA_LABEL = f"{GROUP}/replica"
# Set by the StatefulSet controller on each pod (GA since Kubernetes 1.32).
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
# Set by LeaderWorkerSet on each pod of a group: 0 is the leader.
WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"

ROLLOUT_HASH = f"{GROUP}/rollout-hash"
SETTINGS = f"{GROUP}/engine-settings"  # the live settings the pods start with (settings.py)
LIVE_SETTINGS = f"{GROUP}/live-engine-settings"  # those applied live to a pod's engine
ADMIN_TOKEN_DIGEST = f"{GROUP}/admin-token-sha256"

ADMIN_TOKEN_KEY = "token"


def admin_secret(name: str) -> str:
    return f"{name}-admin"


def ranks_service(name: str) -> str:
    return f"{name}-ranks"


def labels(name: str) -> dict:
    return {
        "app.kubernetes.io/name": "sarathi-engine",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/part-of": "sarathi",
        MANAGED_BY_LABEL: OPERATOR,
        DEPLOYMENT_LABEL: name,
    }


def pod_selector(name: str) -> dict:
    """Every engine pod of one SarathiDeployment, whatever its layout."""
    return {DEPLOYMENT_LABEL: name, COMPONENT_LABEL: "engine"}


def operator_pod_labels() -> set[str]:
    """Every label key the operator or its workloads put on an engine pod: spec.podLabels may set none."""
    return {*labels(""), *pod_selector(""), REPLICA_LABEL, POD_INDEX_LABEL, WORKER_INDEX_LABEL}


def serving_selector(name: str, lay: Layout) -> dict:
    """The pods that serve the OpenAI API: all of them, or rank 0 of each multi-pod replica (pod 0
    of its StatefulSet, or its LeaderWorkerSet group's leader)."""
    if lay.multi_pod:
        return {**pod_selector(name), (WORKER_INDEX_LABEL if lay.gang else POD_INDEX_LABEL): "0"}
    return pod_selector(name)


def selector_string(selector: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in selector.items())


def selector_from_string(text: str) -> dict:
    """The inverse of selector_string."""
    return dict(term.split("=", 1) for term in text.split(",") if term)


def owner_reference(sdep: dict) -> dict:
    meta = sdep["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _controller(child: dict) -> dict | None:
    for ref in child["metadata"].get("ownerReferences", []):
        if ref.get("controller") and ref.get("kind") == KIND and ref.get("apiVersion") == API_VERSION:
            return ref
    return None


def owner_name(child: dict) -> str | None:
    """The SarathiDeployment that controls a child, from its owner references."""
    ref = _controller(child)
    return ref["name"] if ref else None


def is_controlled_by(child: dict, sdep: dict) -> bool:
    """Controlled by this incarnation of the resource (not a deleted one of the same name)."""
    ref = _controller(child)
    return ref is not None and ref["uid"] == sdep["metadata"]["uid"]
