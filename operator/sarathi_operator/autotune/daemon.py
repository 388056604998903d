"""The autotuner inside the operator: one task per SarathiDeployment whose
`spec.autotune.enabled` is true, started by the reconciler's passes (which run on the resource's
creation and changes, on the operator's start and every resync), ending by itself once the flag
is off, the resource is gone, or a new resource took its name.

Not a kopf daemon: kopf puts a finalizer on every resource that has one, and the operator keeps
deletion working without it, even while the operator is down.

Every `spec.autotune.intervalSeconds` a task runs one pass (tuner.py) over the ready serving
pods, records on each pod the budget its engine now runs (the annotation the reconciler reads
for `status.tokenBudget`, see budget.py), writes the autotuner's status fields and Events, and
asks the reconciler for a pass when a pod's budget changed. A restarted operator resumes from
the status (record.resume). Once the flag is off, the reconciler owns the live budget again.
"""

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
from kubernetes.client.exceptions import ApiException

from .. import budget, names, pods
from ..kube import Kube
from ..spec import API_VERSION, KIND, layout, with_defaults
from . import record
from .decide import Config
from .tuner import Tuner

log = logging.getLogger(__name__)

# Bounds when the spec gives none (each widened to include the spec's starting budget).
DEFAULT_MIN_BUDGET = 32
DEFAULT_MAX_BUDGET = 8192


def enabled(spec: dict) -> bool:
    return bool(spec.get("autotune", {}).get("enabled"))


def config_from_spec(spec: dict) -> Config:
    """spec: with defaults."""
    tune, start = spec["autotune"], spec["engine"]["tokenBudget"]
    return Config(
        slo=spec["slo"]["tbtP99Ms"] / 1000,
        min_budget=tune.get("minTokenBudget", min(DEFAULT_MIN_BUDGET, start)),
        max_budget=tune.get("maxTokenBudget", max(DEFAULT_MAX_BUDGET, start)),
    )


def engine_urls(serving_pods: list[dict]) -> dict[str, str]:
    """{pod name: base URL} of the pods that serve now."""
    return {
        p["metadata"]["name"]: f"http://{p['status']['podIP']}:{names.HTTP_PORT}"
        for p in serving_pods
        if pods.is_ready(p) and not pods.is_terminating(p) and p.get("status", {}).get("podIP")
    }


def to_annotate(serving_pods: list[dict], reported: dict[str, int], target: int) -> list[dict]:
    """Pods whose engine runs the target while their record says otherwise."""
    return [p for p in serving_pods
            if reported.get(p["metadata"]["name"]) == target and budget.pod_token_budget(p) != target]


class Autotuners:
    """The running autotuning tasks, by resource."""

    def __init__(self, kube: Kube, reconcile: Callable[[str, str], Awaitable[None]]):
        self.kube, self.reconcile = kube, reconcile
        self._tasks: dict[tuple[str, str], asyncio.Task] = {}

    def ensure(self, namespace: str, name: str) -> None:
        """Starts the resource's task unless it runs."""
        key = (namespace, name)
        if key not in self._tasks or self._tasks[key].done():
            self._tasks[key] = asyncio.create_task(self._run(namespace, name), name=f"autotune {namespace}/{name}")

    async def _run(self, namespace: str, name: str) -> None:
        try:
            await DeploymentTuner(self.kube, self.reconcile, namespace, name).run()
        except Exception:
            log.exception("autotune %s/%s stopped; the next reconcile pass restarts it", namespace, name)
        finally:
            record.forget_metrics(namespace, name)
            if self._tasks.get((namespace, name)) is asyncio.current_task():
                del self._tasks[(namespace, name)]

    def running(self) -> list[tuple[str, str]]:
        return [key for key, task in self._tasks.items() if not task.done()]

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


class DeploymentTuner:
    def __init__(self, kube: Kube, reconcile: Callable[[str, str], Awaitable[None]], namespace: str, name: str):
        self.kube, self.reconcile = kube, reconcile
        self.namespace, self.name = namespace, name
        self.tuner: Tuner | None = None

    async def run(self) -> None:
        uid = None
        async with aiohttp.ClientSession() as session:
            while True:
                started = time.monotonic()
                sdep = await asyncio.to_thread(self.kube.get, API_VERSION, KIND, self.namespace, self.name)
                if sdep is None or not enabled(sdep["spec"]) or uid not in (None, sdep["metadata"]["uid"]):
                    return
                uid = sdep["metadata"]["uid"]
                spec = with_defaults(sdep["spec"])
                try:
                    await self.one_pass(session, sdep, spec)
                except ApiException as e:
                    log.warning("autotune %s/%s: Kubernetes API: %s %s", self.namespace, self.name, e.status, e.reason)
                await asyncio.sleep(max(0.0, spec["autotune"]["intervalSeconds"] - (time.monotonic() - started)))

    async def one_pass(self, session: aiohttp.ClientSession, sdep: dict, spec: dict) -> None:
        config, status, now = config_from_spec(spec), sdep.get("status", {}), time.time()
        if self.tuner is None:
            self.tuner = Tuner(record.resume(status, spec, config, now), spec["autotune"]["intervalSeconds"])
        token = await asyncio.to_thread(self._admin_token)
        if token is None:
            log.info("autotune %s/%s: no admin token yet", self.namespace, self.name)
            return
        selector = names.serving_selector(self.name, layout(spec["parallelism"]))
        serving = await asyncio.to_thread(self.kube.select, "v1", "Pod", self.namespace, selector)
        result = await self.tuner.step(session, engine_urls(serving), token, config, now)

        annotate = to_annotate(serving, result.reported, result.decision.budget)
        for pod in annotate:
            await asyncio.to_thread(self.kube.merge_patch, "v1", "Pod", self.namespace, pod["metadata"]["name"],
                                    budget.live_budget_patch(pod, result.decision.budget))
        patch = record.status_patch(result, status.get("tuningHistory", []))
        await asyncio.to_thread(self.kube.patch_status, sdep, patch)
        event = record.event(result, status)
        if event:
            await asyncio.to_thread(self.kube.post_event, sdep, *event)
        record.metrics(self.namespace, self.name, result)
        if annotate:
            # status.tokenBudget is the reconciler's: it follows the pods' records.
            await self.reconcile(self.namespace, self.name)

    def _admin_token(self) -> str | None:
        secret = self.kube.get("v1", "Secret", self.namespace, names.admin_secret(self.name))
        data = (secret or {}).get("data", {})
        return base64.b64decode(data[names.ADMIN_TOKEN_KEY]).decode() if names.ADMIN_TOKEN_KEY in data else None
