"""The operator's only door to the Kubernetes API: plain dicts in and out.

Children are written with server-side apply under one field manager, so a repeated apply is
a no-op, a restarted operator converges without duplicates, and drift in any field the
operator sets is taken back.
"""

import datetime
import json
import secrets

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .names import OPERATOR
from .spec import API_VERSION, PLURAL

FIELD_MANAGER = OPERATOR
REQUEST_TIMEOUT = 30

_PLURALS = {
    "Secret": "secrets",
    "Service": "services",
    "Pod": "pods",
    "Event": "events",
    "Deployment": "deployments",
    "StatefulSet": "statefulsets",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "InferencePool": "inferencepools",
    "LeaderWorkerSet": "leaderworkersets",
    "Job": "jobs",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "SarathiDeployment": PLURAL,
}


def load_api_client(kubeconfig: str | None) -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig."""
    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            pass
    return config.new_client_from_config(config_file=kubeconfig)


def path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    url = f"{prefix}/namespaces/{namespace}/{_PLURALS[kind]}"
    return f"{url}/{name}" if name else url


class Kube:
    def __init__(self, api: client.ApiClient):
        self.api = api

    def _request(self, method: str, url: str, *, query=None, body=None, content_type="application/json"):
        request = self.api.param_serialize(
            method=method,
            resource_path=url,
            query_params=query or [],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*request, _request_timeout=REQUEST_TIMEOUT)
        response.read()
        text = response.data.decode() if response.data else ""
        if not 200 <= response.status <= 299:
            raise ApiException(http_resp=response)
        return json.loads(text) if text else None

    def serves(self, api_version: str, kind: str) -> bool:
        """Whether the API server serves this kind (its CRD is installed), from discovery."""
        try:
            resources = self._request("GET", f"/apis/{api_version}")
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return any(r.get("kind") == kind for r in resources.get("resources", []))

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        try:
            return self._request("GET", path(api_version, kind, namespace, name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def select(self, api_version: str, kind: str, namespace: str, selector: dict) -> list[dict]:
        query = [("labelSelector", ",".join(f"{k}={v}" for k, v in selector.items()))]
        items = self._request("GET", path(api_version, kind, namespace), query=query)["items"]
        # List items carry neither apiVersion nor kind.
        return [{"apiVersion": api_version, "kind": kind, **item} for item in items]

    def list_sarathideployments(self, namespace: str | None) -> list[dict]:
        """Every SarathiDeployment, in one namespace or in all."""
        url = f"/apis/{API_VERSION}/namespaces/{namespace}/{PLURAL}" if namespace else f"/apis/{API_VERSION}/{PLURAL}"
        return self._request("GET", url)["items"]

    def apply(self, manifest: dict) -> dict:
        meta = manifest["metadata"]
        return self._request(
            "PATCH",
            path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"]),
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            body=manifest,
            content_type="application/apply-patch+yaml",
        )

    def valid_when_new(self, manifest: dict) -> bool:
        """Whether the API server would accept the manifest as a new object (a dry-run create;
        validation runs before the name clash is found)."""
        meta = manifest["metadata"]
        try:
            self._request("POST", path(manifest["apiVersion"], manifest["kind"], meta["namespace"]),
                          query=[("dryRun", "All")], body=manifest)
        except ApiException as e:
            if e.status == 409:
                return True
            if e.status in (400, 422):
                return False
            raise
        return True

    def replace(self, manifest: dict) -> dict:
        """Overwrites an object with the manifest, dropping fields other writers added."""
        meta = manifest["metadata"]
        url = path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
        current = self._request("GET", url)
        body = {**manifest, "metadata": {**meta, "resourceVersion": current["metadata"]["resourceVersion"]}}
        return self._request("PUT", url, query=[("fieldManager", FIELD_MANAGER)], body=body)

    def merge_patch(self, api_version: str, kind: str, namespace: str, name: str, patch: dict) -> dict:
        return self._request(
            "PATCH", path(api_version, kind, namespace, name), body=patch, content_type="application/merge-patch+json"
        )

    def patch_status(self, sdep: dict, status: dict) -> dict:
        meta = sdep["metadata"]
        return self._request(
            "PATCH",
            path(API_VERSION, "SarathiDeployment", meta["namespace"], meta["name"]) + "/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    def delete(self, api_version: str, kind: str, namespace: str, name: str, uid: str | None = None) -> None:
        """Deletes unless already gone; with uid, only that incarnation of the object."""
        body = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self._request("DELETE", path(api_version, kind, namespace, name), body=body)
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    def post_event(self, obj: dict, type_: str, reason: str, message: str) -> None:
        meta = obj["metadata"]
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj["apiVersion"],
                "kind": obj["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": OPERATOR},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self._request("POST", path("v1", "Event", meta["namespace"]), body=event)
