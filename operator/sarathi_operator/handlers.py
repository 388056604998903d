"""kopf handlers, thin: every trigger becomes a reconcile pass of the SarathiDeployment it
concerns (reconcile.py). Importing this module registers them."""

import logging
import os

import kopf
from kubernetes.client.exceptions import ApiException

from .names import MANAGED_BY_LABEL, OPERATOR, owner_name
from .spec import GROUP, PLURAL, VERSION

CHILDREN = (
    ("apps/v1", "deployments"),
    ("apps/v1", "statefulsets"),
    ("v1", "services"),
    ("policy/v1", "poddisruptionbudgets"),
    ("batch/v1", "jobs"),  # a model download finishing lets the workloads start
    # Watched where the cluster serves it when the operator starts (kopf looks up resources once).
    ("leaderworkerset.x-k8s.io/v1", "leaderworkersets"),
)
RETRY_SECONDS = 5


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    # kopf's bookkeeping goes to annotations under our group: the status schema is ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # The reconciler posts the Events users need; kopf's own only when a handler fails.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = OPERATOR
    # The CRD is installed before the operator starts, so no list/watch of CRDs or namespaces
    # (and no RBAC for them) is needed.
    settings.scanning.disabled = True
    # Watch only our children, filtered by the API server rather than in the operator.
    for api_version, plural in CHILDREN:
        settings.watching.label_selectors[api_version, plural] = f"{MANAGED_BY_LABEL}={OPERATOR}"


@kopf.on.login()
def login(**kwargs) -> kopf.ConnectionInfo | None:
    # kopf's default login goes through the kubernetes client, which reads $KUBECONFIG once, at
    # import; `--kubeconfig` sets the variable later, so read the file itself, at login time.
    if os.environ.get("KUBECONFIG"):
        return kopf.login_with_kubeconfig(**kwargs)
    return kopf.login_via_client(**kwargs)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def sarathideployment_changed(namespace: str, name: str, memo: kopf.Memo, **_) -> None:
    try:
        await memo.reconciler.reconcile(namespace, name)
    except ApiException as e:
        raise kopf.TemporaryError(f"Kubernetes API: {e.status} {e.reason}", delay=RETRY_SECONDS) from e


async def child_changed(body: kopf.Body, namespace: str, memo: kopf.Memo, **_) -> None:
    """A child changed, was deleted or reports new status: reconcile its owner, which
    recreates it, takes back drift, and refreshes the owner's status."""
    owner = owner_name(body)
    if owner:
        await memo.reconciler.reconcile(namespace, owner)


for _api_version, _plural in CHILDREN:
    kopf.on.event(_api_version, _plural)(child_changed)
