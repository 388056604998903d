"""The autotuner inside the operator: a kopf daemon per SarathiDeployment whose
`spec.autotune.enabled` is true. kopf starts it when the flag turns on (or the operator starts
and finds it on) and stops it when the flag turns off or the resource goes.

Every `spec.autotune.intervalSeconds` it runs one pass (tuner.py) over the ready serving pods,
records on each pod the budget its engine now runs (the annotation the reconciler reads for
`status.tokenBudget`, see budget.py), writes the autotuner's status fields and Events, and asks
the reconciler for a pass when a pod's budget changed. A restarted operator resumes from the
status (record.resume). Once the flag is off, the reconciler owns the live budget again.
"""

import asyncio
import base64
import logging
import time

import aiohttp
import kopf
from kubernetes.client.exceptions import ApiException

from .. import budget, names, pods
from ..reconcile import Reconciler
from ..spec import API_VERSION, GROUP, KIND, PLURAL, VERSION, layout, with_defaults
from . import record
from .decide import Config
from .tuner import Tuner

log = logging.getLogger(__name__)

# Bounds when the spec gives none (each widened to include the spec's starting budget).
DEFAULT_MIN_BUDGET = 32
DEFAULT_MAX_BUDGET = 8192


def enabled(spec: dict, **_) -> bool:
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


@kopf.daemon(GROUP, VERSION, PLURAL, when=enabled, cancellation_timeout=30)
async def autotune(namespace: str, name: str, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_) -> None:
    try:
        await DeploymentTuner(memo.reconciler, namespace, name).run(stopped)
    finally:
        record.forget_metrics(namespace, name)


class DeploymentTuner:
    def __init__(self, reconciler: Reconciler, namespace: str, name: str):
        self.reconciler, self.kube = reconciler, reconciler.kube
        self.namespace, self.name = namespace, name
        self.tuner: Tuner | None = None

    async def run(self, stopped: kopf.DaemonStopped) -> None:
        async with aiohttp.ClientSession() as session:
            while not stopped:
                started = time.monotonic()
                sdep = await asyncio.to_thread(self.kube.get, API_VERSION, KIND, self.namespace, self.name)
                if sdep is None or not enabled(sdep["spec"]):
                    return
                spec = with_defaults(sdep["spec"])
                try:
                    await self.one_pass(session, sdep, spec)
                except ApiException as e:
                    log.warning("autotune %s/%s: Kubernetes API: %s %s", self.namespace, self.name, e.status, e.reason)
                await stopped.wait(max(0.0, spec["autotune"]["intervalSeconds"] - (time.monotonic() - started)))

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
        patch = record.status_patch(result, status.get("tuningHistory", []), config.min_samples)
        await asyncio.to_thread(self.kube.patch_status, sdep, patch)
        event = record.event(result, status)
        if event:
            await asyncio.to_thread(self.kube.post_event, sdep, *event)
        record.metrics(self.namespace, self.name, result, config.min_samples)
        if annotate:
            # status.tokenBudget is the reconciler's: it follows the pods' records.
            await self.reconciler.reconcile(self.namespace, self.name)

    def _admin_token(self) -> str | None:
        secret = self.kube.get("v1", "Secret", self.namespace, names.admin_secret(self.name))
        data = (secret or {}).get("data", {})
        return base64.b64decode(data[names.ADMIN_TOKEN_KEY]).decode() if names.ADMIN_TOKEN_KEY in data else None
