"""The decision of one reconcile pass, as a pure function: from what exists (`World`, read by
reconcile.observe) to what to do (`Plan`, carried out by reconcile.execute).

A plan says which children to apply (what pods reference first, workloads last), which owned
children to prune, which pods to delete to restart one multi-pod replica, which engines to set
the live settings on, and the status to write once that is done. Its rules:

  children  build.children: every child of the spec; an InferencePool only where the cluster
            serves the API; multi-pod replicas as one LeaderWorkerSet where the cluster serves
            that, else one StatefulSet each.
  prune     owned children (controlled by this incarnation of the resource) the plan no longer
            holds; children of others, even with our labels, are left alone.
  restart   rollout.replica_to_restart over multi-pod replicas run as StatefulSets, and never in
            a pass that changes a workload (its controller must see the new template before pods
            restart, or they come back with the old one) nor while the model downloads.
            LeaderWorkerSet restarts and rolls its groups itself.
  push      settings.pods_needing: ready serving pods whose engine runs other live settings and
            can take them live.
  cache     an hf:// source with a cache: a Job downloads it into the claim; until that Job has
            completed, no workload is applied (existing ones keep serving what they serve) and
            the status says the cache's state.
  status    computed from the observed workloads and pods as they will be once the plan is
            carried out: a workload the plan creates, changes or prunes is rolling, and pushed
            engines run the settings pushed to them (`status_after` re-derives it when some
            pushes fail).
"""

from dataclasses import dataclass, field, replace

from . import build, names, pods, rollout, settings, status
from .autotune import record as autotune_record
from .spec import layout, model_source, validate, with_defaults

INFERENCE_POOL_KIND = (build.INFERENCE_POOL_API, "InferencePool")
LEADER_WORKER_SET_KIND = (build.LEADER_WORKER_SET_API, "LeaderWorkerSet")
# Children that can fall out of the plan (scale-down of multi-pod replicas, a layout change,
# another model source, a cache dropped), besides InferencePools and LeaderWorkerSets where the
# cluster serves them.
PRUNABLE = (("apps/v1", "Deployment"), ("apps/v1", "StatefulSet"), ("v1", "Service"), ("batch/v1", "Job"),
            ("v1", "PersistentVolumeClaim"))
WORKLOADS = ("Deployment", "StatefulSet", "LeaderWorkerSet")


def prunable(pools_served: bool, lws_served: bool) -> tuple[tuple[str, str], ...]:
    """The (apiVersion, kind) of every child kind a pass lists and may prune."""
    served = ((INFERENCE_POOL_KIND, pools_served), (LEADER_WORKER_SET_KIND, lws_served))
    return PRUNABLE + tuple(kind for kind, is_served in served if is_served)


@dataclass(frozen=True)
class World:
    """What a pass observed: the resource, and what exists of its children and pods."""

    sdep: dict
    admin_token: str | None  # the token in the admin Secret, when there is one
    pools_served: bool  # the cluster serves InferencePools
    lws_served: bool  # the cluster serves LeaderWorkerSets
    labelled: dict[str, list[dict]]  # children carrying the resource's label, by kind
    engine_pods: list[dict]


@dataclass(frozen=True)
class StatusInputs:
    """What the status is computed from, kept so that it can be re-derived after the pushes."""

    previous: dict
    generation: int
    desired_replicas: int
    observed: tuple[int, int, bool]  # replicas, ready, rolling
    serving_pods: list[dict]  # as they will be once every push lands
    pod_problems: list[str]
    inference_pool: status.Check | None
    model_cache: dict | None
    selector: str
    autotuned: bool
    now: str


@dataclass(frozen=True)
class Plan:
    """What one pass does (apply, prune, restart, push, in that order) and the status it writes."""

    spec: dict  # with defaults
    token: str = ""  # the admin token the engines and the Secret carry
    settings: dict = field(default_factory=dict)  # the live settings every serving engine should run
    apply: list[list[dict]] = field(default_factory=list)  # stages, applied in order
    prune: list[dict] = field(default_factory=list)
    restart: str | None = None  # the multi-pod replica (StatefulSet) whose pods all restart now
    restart_pods: list[dict] = field(default_factory=list)
    push: list[dict] = field(default_factory=list)  # pods whose engines get `settings` live
    status: dict = field(default_factory=dict)  # once every push lands
    inputs: StatusInputs | None = None  # None: the spec failed; nothing to do but write status


def plan(world: World, *, engine_image: str | None, fresh_token: str, now: str) -> Plan:
    """What to do in this pass. fresh_token: the admin token to use when none exists yet."""
    sdep = world.sdep
    meta = sdep["metadata"]
    previous = sdep.get("status", {})
    spec = with_defaults(sdep["spec"], engine_image)
    problems = validate(meta["name"], spec, world.lws_served)
    if problems:
        return failed(world, spec, "InvalidSpec", "; ".join(problems), now)

    token = world.admin_token or fresh_token
    owned = {kind: [c for c in world.labelled.get(kind, []) if names.is_controlled_by(c, sdep)]
             for _, kind in prunable(world.pools_served, world.lws_served)}
    existing = {w["metadata"]["name"]: w for kind in WORKLOADS for w in owned.get(kind, [])}
    target = settings.desired(spec, previous)
    children = build.children(sdep, spec, token=token, desired=target, existing=existing,
                              inference_pools=world.pools_served, leader_worker_sets=world.lws_served)
    cache = model_cache(meta["name"], spec, children, owned)
    held = cache is not None and cache["state"] != "Ready"  # workloads wait for the model
    keep = {(c["kind"], c["metadata"]["name"]) for c in children}
    if held:
        keep |= {(kind, w["metadata"]["name"]) for kind in WORKLOADS for w in owned.get(kind, [])}
    prune = [c for kind, listed in owned.items() for c in listed if (kind, c["metadata"]["name"]) not in keep]
    workloads = [] if held else [c for c in children if c["kind"] in WORKLOADS]
    changing = [w["metadata"]["name"] for w in workloads if changes(w, existing.get(w["metadata"]["name"]))]
    # What runs now: the planned workloads that exist, or, while held, every existing one.
    current = list(existing.values()) if held else [
        existing[w["metadata"]["name"]] for w in workloads if w["metadata"]["name"] in existing]

    lay = layout(spec["parallelism"], world.lws_served)
    restart, restart_pods = None, []
    if lay.gang:
        replicas, ready, rolling = status.observe_leader_worker_set(current[0]) if current else (0, 0, True)
    elif lay.multi_pod:
        groups = [rollout.replica_group(s, world.engine_pods) for s in current]
        if not changing and not held:
            restart = rollout.replica_to_restart(groups)
            restart_pods = [p for p in world.engine_pods if pods.owned_by(p, "StatefulSet", restart)] if restart else []
        replicas, ready, rolling = status.observe_statefulsets(current, groups, spec["replicas"])
    else:
        replicas, ready, rolling = status.observe_deployment(current[0]) if current else (0, 0, True)
    rolling = rolling or held or bool(changing) or any(c["kind"] in WORKLOADS for c in prune)

    serving = names.serving_selector(meta["name"], lay)
    serving_pods = [p for p in world.engine_pods if serving.items() <= p["metadata"].get("labels", {}).items()]
    push = settings.pods_needing(serving_pods, target)
    pushed = {p["metadata"]["name"] for p in push}
    inputs = StatusInputs(
        previous=previous,
        generation=meta["generation"],
        desired_replicas=spec["replicas"],
        observed=(replicas, ready, rolling),
        serving_pods=[_with_live(p, target) if p["metadata"]["name"] in pushed else p for p in serving_pods],
        pod_problems=[p for p in map(pods.problem, world.engine_pods) if p],
        inference_pool=status.inference_pool_check(meta["name"], world.pools_served)
        if spec["gateway"]["inferencePool"] else None,
        model_cache=cache,
        selector=names.selector_string(serving),
        autotuned=spec["autotune"]["enabled"],
        now=now,
    )
    return Plan(
        spec=spec,
        token=token,
        settings=target,
        # Workloads go last, so what their pods mount and reference exists when pods start.
        apply=[stage for stage in ([c for c in children if c["kind"] not in WORKLOADS], workloads) if stage],
        prune=prune,
        restart=restart,
        restart_pods=restart_pods,
        push=push,
        status=_status(inputs, target, {}),
        inputs=inputs,
    )


def status_after(p: Plan, failures: dict[str, str]) -> dict:
    """The status once the plan is carried out, when the pushes to some pods failed
    (pod name -> why): those pods still run what they ran."""
    if not failures or p.inputs is None:
        return p.status
    originals = {q["metadata"]["name"]: q for q in p.push}
    serving = [originals.get(q["metadata"]["name"], q) if q["metadata"]["name"] in failures else q
               for q in p.inputs.serving_pods]
    return _status(replace(p.inputs, serving_pods=serving), p.settings, failures)


def failed(world: World, spec: dict, reason: str, message: str, now: str) -> Plan:
    """A plan that only reports that the spec cannot be applied; the children of the last good
    spec keep running."""
    sdep = world.sdep
    return Plan(spec=spec, status=status.failed_status(
        previous=sdep.get("status", {}), generation=sdep["metadata"]["generation"],
        reason=reason, message=message, now=now))


def model_cache(name: str, spec: dict, children: list[dict], owned: dict[str, list[dict]]) -> dict | None:
    """status.modelCache of an hf:// source with a cache, from its download Job; None without."""
    source = model_source(name, spec["model"])
    if not source.cached:
        return None
    [job] = [c["metadata"]["name"] for c in children if c["kind"] == "Job"]
    current = next((j for j in owned.get("Job", []) if j["metadata"]["name"] == job), None)
    return status.model_cache(current, source.pvc_claim, job)


def changes(wanted: dict, current: dict | None) -> bool:
    """Whether applying a workload changes what its pods run or how many there are: its
    template (rollout hash), the settings its pods start with, or its scale."""
    if current is None:
        return True
    have, want = current["metadata"].get("annotations", {}), wanted["metadata"]["annotations"]
    return (
        any(have.get(key) != want[key] for key in (names.ROLLOUT_HASH, names.SETTINGS))
        or current["spec"].get("replicas") != wanted["spec"]["replicas"]
    )


def _with_live(pod: dict, target: dict) -> dict:
    """The pod as it will be once `target` is applied live to its engine."""
    annotations = {**pod["metadata"].get("annotations", {}),
                   **settings.live_patch(pod, target)["metadata"]["annotations"]}
    return {**pod, "metadata": {**pod["metadata"], "annotations": annotations}}


def _status(inputs: StatusInputs, target: dict, failures: dict[str, str]) -> dict:
    replicas, ready, rolling = inputs.observed
    previous = inputs.previous
    obs = status.Observation(
        replicas=replicas,
        ready=ready,
        rolling=rolling,
        token_budget=settings.budget_in_force(inputs.serving_pods, previous.get("tokenBudget"),
                                              target["token_budget"]),
        settings_pending=[f"settings not yet applied on pod {pod}: {why}" for pod, why in failures.items()],
        pod_problems=inputs.pod_problems,
        inference_pool=inputs.inference_pool,
        model_cache=inputs.model_cache,
    )
    new = status.compute_status(previous=previous, generation=inputs.generation,
                                desired=inputs.desired_replicas, obs=obs, selector=inputs.selector, now=inputs.now)
    if not inputs.autotuned:
        new.update(autotune_record.cleared(previous, new["conditions"]))
    return new
