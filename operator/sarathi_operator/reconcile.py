"""One reconcile pass over a SarathiDeployment, and the per-resource serialisation of passes.

A pass is level-triggered and idempotent: read the resource, validate it, apply the plan
(build.py) with server-side apply, prune children the plan no longer holds, restart the next
stale multi-pod replica (rollout.py), push changed live settings to the running engines
(settings.py: the one path for the spec's token budget and the autotuner's SLO margin), and
write a status that matches what it saw (status.py). Every trigger (create,
update, resume, a child's change, the periodic resync) runs the same pass.
"""

import asyncio
import base64
import datetime
import json
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter, Histogram

from . import admin, build, names, pods, rollout, settings, status
from .autotune import record as autotune_record
from .kube import Kube
from .spec import API_VERSION, KIND, layout, validate, with_defaults

log = logging.getLogger(__name__)

RECONCILE_SECONDS = Histogram(
    "sarathi_operator_reconcile_seconds", "Duration of one reconcile pass of a SarathiDeployment"
)
RECONCILE_ERRORS = Counter("sarathi_operator_reconcile_errors_total", "Reconcile passes that raised")

# Children that can fall out of the plan (scale-down of multi-pod replicas, a layout change),
# besides an InferencePool where the cluster serves them.
_PRUNABLE = (("apps/v1", "Deployment"), ("apps/v1", "StatefulSet"), ("v1", "Service"))
_WORKLOADS = ("Deployment", "StatefulSet")


class ChildRejected(Exception):
    """The API server refused a child as invalid: the spec cannot be applied as it is."""


@dataclass
class Converged:
    token: str
    desired: dict  # the live settings every serving engine should run
    observed: tuple[int, int, bool]  # replicas, ready, rolling
    serving_pods: list[dict]
    pod_problems: list[str]
    inference_pool: status.Check | None  # when the spec asks for one


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reconciler:
    def __init__(self, kube: Kube, on_autotune: Callable[[str, str], None] | None = None,
                 engine_image: str | None = None):
        self.kube = kube
        self.engine_image = engine_image  # for a spec without an image of its own
        # Called on every pass over a resource that wants autotuning (autotune/daemon.py).
        self.on_autotune = on_autotune
        # Independent requests of one pass go out together.
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kube")
        self._locks: dict[tuple, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._requested: dict[tuple, int] = defaultdict(int)
        self._covered: dict[tuple, int] = defaultdict(int)

    async def reconcile(self, namespace: str, name: str) -> None:
        """Runs a pass unless one that started after this call already covers it: a burst of
        triggers costs one pass while another is running, not one pass each."""
        key = (namespace, name)
        self._requested[key] += 1
        ticket = self._requested[key]
        async with self._locks[key]:
            if self._covered[key] >= ticket:
                return
            self._covered[key] = self._requested[key]
            started = time.perf_counter()
            try:
                await self._pass(namespace, name)
            except Exception:
                RECONCILE_ERRORS.inc()
                raise
            finally:
                RECONCILE_SECONDS.observe(time.perf_counter() - started)

    async def resync_forever(self, namespaces: list[str] | None, interval: float) -> None:
        """Reconciles everything every interval: retries live settings that did not reach an
        engine and repairs children whose change events were missed."""
        while True:
            await asyncio.sleep(interval)
            for namespace in namespaces or [None]:
                try:
                    items = await asyncio.to_thread(self.kube.list_sarathideployments, namespace)
                except ApiException as e:
                    log.warning("resync: cannot list SarathiDeployments: %s", e.reason)
                    continue
                for item in items:
                    meta = item["metadata"]
                    try:
                        await self.reconcile(meta["namespace"], meta["name"])
                    except Exception:
                        log.exception("resync of %s/%s failed", meta["namespace"], meta["name"])

    async def _pass(self, namespace: str, name: str) -> None:
        sdep = await asyncio.to_thread(self.kube.get, API_VERSION, KIND, namespace, name)
        if sdep is None or "deletionTimestamp" in sdep["metadata"]:
            return
        spec = with_defaults(sdep["spec"], self.engine_image)
        if spec["autotune"]["enabled"] and self.on_autotune:
            self.on_autotune(namespace, name)
        problems = validate(name, spec)
        if problems:
            await self._write_status(sdep, self._failed(sdep, "InvalidSpec", "; ".join(problems)))
            return
        try:
            converged = await asyncio.to_thread(self._converge, sdep, spec)
        except ChildRejected as e:
            await self._write_status(sdep, self._failed(sdep, "ChildRejected", str(e)))
            return
        pending = await self._push_settings(sdep, converged)
        previous = sdep.get("status", {})
        replicas, ready, rolling = converged.observed
        obs = status.Observation(
            replicas=replicas,
            ready=ready,
            rolling=rolling,
            token_budget=settings.budget_in_force(
                converged.serving_pods, previous.get("tokenBudget"), converged.desired["token_budget"]
            ),
            settings_pending=pending,
            pod_problems=converged.pod_problems,
            inference_pool=converged.inference_pool,
        )
        lay = layout(spec["parallelism"])
        new = status.compute_status(
            previous=previous,
            generation=sdep["metadata"]["generation"],
            desired=spec["replicas"],
            obs=obs,
            selector=names.selector_string(names.serving_selector(name, lay)),
            now=now(),
        )
        if not spec["autotune"]["enabled"]:
            new.update(autotune_record.cleared(previous, new["conditions"]))
        await self._write_status(sdep, new)

    def _failed(self, sdep: dict, reason: str, message: str) -> dict:
        return status.failed_status(
            previous=sdep.get("status", {}),
            generation=sdep["metadata"]["generation"],
            reason=reason,
            message=message,
            now=now(),
        )

    def _converge(self, sdep: dict, spec: dict) -> Converged:
        """Applies the plan and prunes; returns what the workloads report (blocking I/O)."""
        meta = sdep["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        token = self._pool.submit(self._admin_token, namespace, name)
        pools_served = self.kube.serves(build.INFERENCE_POOL_API, "InferencePool")
        prunable = _PRUNABLE + (((build.INFERENCE_POOL_API, "InferencePool"),) if pools_served else ())
        listed = self._pool.map(
            lambda kind: self.kube.select(*kind, namespace, {names.DEPLOYMENT_LABEL: name}), prunable)
        owned = {kind: [c for c in children if names.is_controlled_by(c, sdep)]
                 for (_, kind), children in zip(prunable, listed)}
        token = token.result()
        existing = {w["metadata"]["name"]: w for w in owned["Deployment"] + owned["StatefulSet"]}
        desired = settings.desired(spec, sdep.get("status", {}))
        plan = build.plan(sdep, spec, token=token, desired=desired, existing=existing, inference_pools=pools_served)
        # Workloads go last, so what their pods mount and reference exists when pods start.
        applied = []
        for stage in ([m for m in plan if m["kind"] not in _WORKLOADS], [m for m in plan if m["kind"] in _WORKLOADS]):
            applied += self._pool.map(lambda manifest: self._apply(sdep, manifest), stage)
        self._prune(sdep, prunable, owned, {(c["kind"], c["metadata"]["name"]) for c in applied})

        lay = layout(spec["parallelism"])
        engine_pods = self.kube.select("v1", "Pod", namespace, names.pod_selector(name))
        workloads = [c for c in applied if c["kind"] in _WORKLOADS]
        if lay.multi_pod:
            groups = [rollout.replica_group(s, engine_pods) for s in workloads]
            victim = rollout.replica_to_restart(groups)
            if victim:
                self._restart_replica(sdep, victim, engine_pods)
            observed = status.observe_statefulsets(workloads, groups, spec["replicas"])
        else:
            observed = status.observe_deployment(workloads[0])
        serving = names.serving_selector(name, lay)
        serving_pods = [p for p in engine_pods if serving.items() <= p["metadata"].get("labels", {}).items()]
        problems = [p for p in map(pods.problem, engine_pods) if p]
        pool = status.inference_pool_check(name, pools_served) if spec["gateway"]["inferencePool"] else None
        return Converged(token, desired, observed, serving_pods, problems, pool)

    def _admin_token(self, namespace: str, name: str) -> str:
        """The token in the existing Secret, or a new one: it is generated only once."""
        secret = self.kube.get("v1", "Secret", namespace, names.admin_secret(name))
        if secret and names.ADMIN_TOKEN_KEY in secret.get("data", {}):
            return base64.b64decode(secret["data"][names.ADMIN_TOKEN_KEY]).decode()
        return secrets.token_urlsafe(32)

    def _apply(self, sdep: dict, manifest: dict) -> dict:
        try:
            return self.kube.apply(manifest)
        except ApiException as e:
            if e.status not in (400, 422):
                raise
            kind, child = manifest["kind"], manifest["metadata"]["name"]
            if not self.kube.valid_when_new(manifest):
                raise ChildRejected(f"the API server rejected {kind} {child}: {_message(e)}") from e
            # Valid on its own, so someone else's change to the child is at fault, one that apply
            # cannot take back because apply keeps what other writers own (say, a port added
            # under the name of ours): overwrite the child.
            self.kube.post_event(sdep, "Warning", "Replaced",
                                 f"overwrote {kind} {child}: changed by another writer beyond what apply restores")
            return self.kube.replace(manifest)

    def _prune(self, sdep: dict, prunable: tuple, owned: dict[str, list[dict]], keep: set[tuple[str, str]]) -> None:
        for api_version, kind in prunable:
            for child in owned[kind]:
                child_name = child["metadata"]["name"]
                if (kind, child_name) not in keep:
                    self.kube.delete(api_version, kind, child["metadata"]["namespace"], child_name,
                                     uid=child["metadata"]["uid"])
                    self.kube.post_event(sdep, "Normal", "Pruned", f"deleted {kind} {child_name}: no longer in the plan")

    def _restart_replica(self, sdep: dict, statefulset: str, engine_pods: list[dict]) -> None:
        victims = [p for p in engine_pods if pods.owned_by(p, "StatefulSet", statefulset)]
        for pod in victims:
            meta = pod["metadata"]
            self.kube.delete("v1", "Pod", meta["namespace"], meta["name"], uid=meta["uid"])
        self.kube.post_event(
            sdep, "Normal", "RestartingReplica",
            f"restarting all {len(victims)} pods of replica {statefulset} to roll out the new template",
        )

    async def _push_settings(self, sdep: dict, converged: Converged) -> list[str]:
        """Sets the desired live settings on ready engines that run others; returns what failed."""
        target = converged.desired
        stale = settings.pods_needing(converged.serving_pods, target)
        if not stale:
            return []
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(
                *(admin.push_settings(session, admin.pod_url(p["status"]["podIP"]), converged.token, target)
                  for p in stale),
                return_exceptions=True,
            )
        applied, failures = [], []
        for pod, result in zip(stale, results):
            pod_name = pod["metadata"]["name"]
            if isinstance(result, admin.AdminError):
                failures.append(f"settings not yet applied on pod {pod_name}: {result}")
                continue
            if isinstance(result, BaseException):
                raise result
            updated = await asyncio.to_thread(
                self.kube.merge_patch, "v1", "Pod", pod["metadata"]["namespace"], pod_name,
                settings.live_patch(pod, target),
            )
            converged.serving_pods[converged.serving_pods.index(pod)] = updated
            applied.append(f"{pod_name} ({settings.changes(settings.pod_settings(pod), target)})")
        if applied:
            await asyncio.to_thread(
                self.kube.post_event, sdep, "Normal", "SettingsApplied",
                f"engine settings applied live to {', '.join(applied)}",
            )
        return failures

    async def _write_status(self, sdep: dict, new: dict) -> None:
        previous = sdep.get("status", {})
        if all(previous.get(k) == v for k, v in new.items()):
            return
        await asyncio.to_thread(self.kube.patch_status, sdep, new)
        event = status.transition_event(previous, new)
        if event:
            await asyncio.to_thread(self.kube.post_event, sdep, *event)


def _message(e: ApiException) -> str:
    try:
        return json.loads(e.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(e.reason)
