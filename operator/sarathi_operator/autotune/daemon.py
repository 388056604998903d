"""The autotuner inside the operator: one task per SarathiDeployment whose
`spec.autotune.enabled` is true, started by the reconciler's passes (which run on the resource's
creation and changes, on the operator's start and every resync), ending by itself once the flag
is off, the resource is gone, or a new resource took its name.

Not a kopf daemon: kopf puts a finalizer on every resource that has one, and the operator keeps
deletion working without it, even while the operator is down.

Every `spec.autotune.intervalSeconds` a task runs one pass (tuner.py) over the ready serving
pods, writes the autotuner's status fields (the loop's state among them) and Events, and asks
the reconciler for a pass when the margin changed: the reconciler pushes it to the engines, the
one push path (settings.py). A restarted operator resumes from the status (record.resume).
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
from kubernetes.client.exceptions import ApiException

from .. import names, pods
from ..kube import Kube
from ..spec import API_VERSION, KIND, with_defaults
from . import record
from .loop import LoopConfig
from .tuner import Tuner

log = logging.getLogger(__name__)


def enabled(spec: dict) -> bool:
    return bool(spec.get("autotune", {}).get("enabled"))


def config_from_spec(spec: dict) -> LoopConfig:
    """spec: with defaults."""
    return LoopConfig(slo=spec["slo"]["tbtP99Ms"] / 1000)


def engine_urls(serving_pods: list[dict]) -> dict[str, str]:
    """{pod name: base URL} of the pods that serve now."""
    return {
        p["metadata"]["name"]: f"http://{p['status']['podIP']}:{names.HTTP_PORT}"
        for p in serving_pods
        if pods.is_ready(p) and not pods.is_terminating(p) and p.get("status", {}).get("podIP")
    }


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
            self.tuner = Tuner(record.resume(status), spec["autotune"]["intervalSeconds"])
        was = self.tuner.state
        # The reconciler publishes which pods serve (it knows how the cluster runs the replicas).
        selector = names.selector_from_string(status.get("selector", ""))
        serving = await asyncio.to_thread(self.kube.select, "v1", "Pod", self.namespace, selector) if selector else []
        result = await self.tuner.step(session, engine_urls(serving), config, now)
        patch = record.status_patch(result, status, sdep["metadata"]["generation"])
        await asyncio.to_thread(self.kube.patch_status, sdep, patch)
        event = record.event(result, was)
        if event:
            await asyncio.to_thread(self.kube.post_event, sdep, *event)
        record.metrics(self.namespace, self.name, result)
        if result.decision.margin != result.decision.previous_margin:
            await self.reconcile(self.namespace, self.name)

