"""One reconcile pass over a SarathiDeployment, and the per-resource serialisation of passes.

A pass is level-triggered and idempotent, in three steps: `observe` reads the resource, its
labelled children and its pods; `plan.plan` decides, without I/O, what to apply, prune, restart
and push, and the status; `execute` carries that out with server-side apply, deletes, pushes of
the live settings to the running engines (settings.py: the one path for the spec's token budget
and the autotuner's SLO margin), and writes the status. Every trigger (create, update, resume, a
child's change, the periodic resync) runs the same pass.
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

import aiohttp
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter, Histogram

from . import admin, names, plan, settings, status
from .kube import Kube
from .spec import API_VERSION, KIND

log = logging.getLogger(__name__)

RECONCILE_SECONDS = Histogram(
    "sarathi_operator_reconcile_seconds", "Duration of one reconcile pass of a SarathiDeployment"
)
RECONCILE_ERRORS = Counter("sarathi_operator_reconcile_errors_total", "Reconcile passes that raised")


class ChildRejected(Exception):
    """The API server refused a child as invalid: the spec cannot be applied as it is."""


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
        world = await asyncio.to_thread(self.observe, namespace, name)
        if world is None:
            return
        decided = plan.plan(world, engine_image=self.engine_image, fresh_token=secrets.token_urlsafe(32), now=now())
        if decided.spec["autotune"]["enabled"] and self.on_autotune:
            self.on_autotune(namespace, name)
        await self.execute(world, decided)

    def observe(self, namespace: str, name: str) -> plan.World | None:
        """The resource, its admin token, its labelled children and its engine pods (blocking
        reads, independent ones at once); None when it is gone or going."""
        sdep = self.kube.get(API_VERSION, KIND, namespace, name)
        if sdep is None or "deletionTimestamp" in sdep["metadata"]:
            return None
        secret = self._pool.submit(self.kube.get, "v1", "Secret", namespace, names.admin_secret(name))
        engine_pods = self._pool.submit(self.kube.select, "v1", "Pod", namespace, names.pod_selector(name))
        pools_served = self.kube.serves(*plan.INFERENCE_POOL_KIND)
        lws_served = self.kube.serves(*plan.LEADER_WORKER_SET_KIND)
        kinds = plan.prunable(pools_served, lws_served)
        listed = self._pool.map(lambda kind: self.kube.select(*kind, namespace, {names.DEPLOYMENT_LABEL: name}), kinds)
        return plan.World(
            sdep=sdep,
            admin_token=_token(secret.result()),
            pools_served=pools_served,
            lws_served=lws_served,
            labelled={kind: children for (_, kind), children in zip(kinds, listed)},
            engine_pods=engine_pods.result(),
        )

    async def execute(self, world: plan.World, decided: plan.Plan) -> None:
        """Applies, prunes, restarts and pushes what the plan says, then writes its status."""
        sdep = world.sdep
        if decided.inputs is None:
            await self._write_status(sdep, decided.status)
            return
        try:
            await asyncio.to_thread(self._converge, sdep, decided)
        except ChildRejected as e:
            rejected = plan.failed(world, decided.spec, "ChildRejected", str(e), now())
            await self._write_status(sdep, rejected.status)
            return
        failures = await self._push_settings(sdep, decided)
        await self._write_status(sdep, plan.status_after(decided, failures))

    def _converge(self, sdep: dict, decided: plan.Plan) -> None:
        """Applies the children stage by stage, prunes, restarts a replica (blocking I/O)."""
        for stage in decided.apply:
            list(self._pool.map(lambda manifest: self._apply(sdep, manifest), stage))
        for child in decided.prune:
            meta = child["metadata"]
            self.kube.delete(child["apiVersion"], child["kind"], meta["namespace"], meta["name"], uid=meta["uid"])
            self.kube.post_event(sdep, "Normal", "Pruned", f"deleted {child['kind']} {meta['name']}: no longer in the plan")
        if decided.restart:
            for pod in decided.restart_pods:
                meta = pod["metadata"]
                self.kube.delete("v1", "Pod", meta["namespace"], meta["name"], uid=meta["uid"])
            self.kube.post_event(
                sdep, "Normal", "RestartingReplica",
                f"restarting all {len(decided.restart_pods)} pods of replica {decided.restart} to roll out the new template",
            )

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

    async def _push_settings(self, sdep: dict, decided: plan.Plan) -> dict[str, str]:
        """Sets the plan's live settings on the engines it names; returns, by pod, why a push
        failed."""
        if not decided.push:
            return {}
        target = decided.settings
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(
                *(admin.push_settings(session, admin.pod_url(p["status"]["podIP"]), decided.token, target)
                  for p in decided.push),
                return_exceptions=True,
            )
        applied, failures = [], {}
        for pod, result in zip(decided.push, results):
            pod_name = pod["metadata"]["name"]
            if isinstance(result, admin.AdminError):
                failures[pod_name] = str(result)
                continue
            if isinstance(result, BaseException):
                raise result
            await asyncio.to_thread(
                self.kube.merge_patch, "v1", "Pod", pod["metadata"]["namespace"], pod_name,
                settings.live_patch(pod, target),
            )
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


def _token(secret: dict | None) -> str | None:
    """The admin token an existing Secret holds: generated once, kept after."""
    if secret and names.ADMIN_TOKEN_KEY in secret.get("data", {}):
        return base64.b64decode(secret["data"][names.ADMIN_TOKEN_KEY]).decode()
    return None


def _message(e: ApiException) -> str:
    try:
        return json.loads(e.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(e.reason)
