"""The operator through a SarathiDeployment's life against a real API server (issue 7):
rollouts, the live token budget, scaling and pruning, deletion, operator restarts (also
mid-reconcile), drift repair, and reconcile latency."""

import asyncio
import base64
import hashlib
import json
import statistics
import threading
import time

from aiohttp import web
from kubernetes import client, watch

from e2e.test_operator import (  # noqa: F401  (fixtures)
    OWNER_LABEL, Cluster, condition, crd, engine_pods, k, namespace, operator, operator_kubeconfig, owned_children,
    running, sdep, wait_phase, wait_until,
)

CHILD_KINDS = ("deployments", "services", "secrets", "poddisruptionbudgets")


def uids(pods: list[dict]) -> set[str]:
    return {p["metadata"]["uid"] for p in pods}


def args_of(pod: dict) -> str:
    return " ".join(pod["spec"]["containers"][0]["args"])


def reasons(k: Cluster, namespace: str, name: str) -> list[str]:
    return [e["reason"] for e in k.events(namespace, name)]


# ---------------------------------------------------------------- rollouts

def test_editing_max_num_seqs_rolls_the_pods(k, namespace, operator):
    k.apply(sdep("chat", namespace, replicas=2))
    wait_phase(k, namespace, "chat", "Ready")
    before = engine_pods(k, namespace, "chat")

    k.patch("sdep", namespace, "chat", {"spec": {"engine": {"maxNumSeqs": 64}}})
    obj = wait_phase(k, namespace, "chat", "Ready", generation=2)
    after = wait_until("only new pods", lambda: (lambda p: len(p) == 2 and running(p) and p)(engine_pods(k, namespace, "chat")))
    assert not uids(before) & uids(after), "every pod was replaced"
    assert all("--max-num-seqs 64" in args_of(p) for p in after)
    assert obj["status"]["readyReplicas"] == 2
    assert "Progressing" in reasons(k, namespace, "chat")


def test_multi_pod_replicas_roll_one_whole_replica_at_a_time(k, namespace, operator):
    layout = {"tensor": 2, "pipeline": 2, "gpusPerNode": 2}  # 2 pods of 2 GPUs per replica
    k.apply(sdep("mp", namespace, replicas=2, parallelism=layout))
    wait_phase(k, namespace, "mp", "Ready")
    before = uids(engine_pods(k, namespace, "mp"))
    assert len(before) == 4

    k.patch("sdep", namespace, "mp", {"spec": {"engine": {"maxNumSeqs": 32}}})
    most_down = 0
    while True:
        pods = engine_pods(k, namespace, "mp")
        down = {r for r in ("mp-0", "mp-1")
                if sum(p["metadata"]["name"].startswith(r + "-") and p["status"].get("phase") == "Running"
                       and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
                       for p in pods) < 2}
        most_down = max(most_down, len(down))
        obj = k.get("sdep", namespace, "mp")
        if obj["status"].get("phase") == "Ready" and obj["status"].get("observedGeneration") == 2 and not down:
            break
        time.sleep(0.1)
    after = engine_pods(k, namespace, "mp")
    assert len(after) == 4 and not before & uids(after), "every rank of every replica was restarted"
    assert all("--max-num-seqs 32" in args_of(p) for p in after)
    assert most_down <= 1, "a rollout never takes more than one replica out of service"
    assert reasons(k, namespace, "mp").count("RestartingReplica") == 2


# ---------------------------------------------------------------- live token budget

class StubEngines:
    """HTTP servers on the pods' IPs that answer the engine's admin API (/admin/config),
    standing in for engines, which kwok's fake nodes do not run."""

    def __init__(self, ips: list[str], token: str):
        self.ips, self.token = ips, token
        self.settings = {ip: {"token_budget": None, "tbt_slo_ms": None, "slo_margin": 1.0} for ip in ips}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def _app(self, ip: str) -> web.Application:
        async def config(request):
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                return web.json_response({"error": "unauthorised"}, status=401)
            if request.method == "PATCH":
                self.settings[ip].update(await request.json())
            return web.json_response(self.settings[ip])

        app = web.Application()
        app.router.add_route("*", "/admin/config", config)
        return app

    @property
    def budgets(self) -> dict:
        return {ip: s["token_budget"] for ip, s in self.settings.items()}

    async def _start(self):
        self.runners = []
        for ip in self.ips:
            runner = web.AppRunner(self._app(ip))
            await runner.setup()
            await web.TCPSite(runner, ip, 8000).start()
            self.runners.append(runner)

    async def _stop(self):
        for runner in self.runners:
            await runner.cleanup()

    def __enter__(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def admin_token(k: Cluster, namespace: str, name: str) -> str:
    return base64.b64decode(k.get("secret", namespace, f"{name}-admin")["data"]["token"]).decode()


def test_a_token_budget_change_alone_is_applied_live_without_restarting_pods(k, namespace, operator):
    k.apply(sdep("live", namespace, replicas=2, engine={"tokenBudget": 2048}))
    wait_phase(k, namespace, "live", "Ready")
    pods = engine_pods(k, namespace, "live")
    template_before = k.get("deployment", namespace, "live")["spec"]["template"]

    with StubEngines([p["status"]["podIP"] for p in pods], admin_token(k, namespace, "live")) as engines:
        k.patch("sdep", namespace, "live", {"spec": {"engine": {"tokenBudget": 1024}}})
        obj = wait_until("budget 1024 in force", lambda: (lambda o: o["status"].get("tokenBudget") == 1024
                         and o["status"]["phase"] == "Ready" and o)(k.get("sdep", namespace, "live")))
        assert set(engines.budgets.values()) == {1024}

    assert obj["status"]["observedGeneration"] == 2
    assert uids(engine_pods(k, namespace, "live")) == uids(pods), "no pod was restarted"
    assert k.get("deployment", namespace, "live")["spec"]["template"] == template_before, "the template did not change"
    assert len(k.items("replicasets", namespace, f"{OWNER_LABEL}=live")) == 1
    for pod in engine_pods(k, namespace, "live"):
        record = json.loads(pod["metadata"]["annotations"]["serving.sarathi.dev/live-engine-settings"])
        assert record["settings"]["token_budget"] == 1024
    assert "SettingsApplied" in reasons(k, namespace, "live")

    # With no engine answering, the change is reported pending and retried.
    k.patch("sdep", namespace, "live", {"spec": {"engine": {"tokenBudget": 1536}}})
    pending = wait_phase(k, namespace, "live", "Progressing", generation=3)
    progressing = condition(pending, "Progressing")
    assert progressing["reason"] == "SettingsPending"
    assert all(f"settings not yet applied on pod {p['metadata']['name']}" in progressing["message"]
               for p in pods)
    assert pending["status"]["tokenBudget"] == 1024, "the budget in force is still the old one"

    with StubEngines([p["status"]["podIP"] for p in pods], admin_token(k, namespace, "live")) as engines:
        wait_until("the retry to land", lambda: k.get("sdep", namespace, "live")["status"].get("tokenBudget") == 1536,
                   timeout=30)
        assert set(engines.budgets.values()) == {1536}
    assert uids(engine_pods(k, namespace, "live")) == uids(pods)

    # Above the 2048 the engines started with (and warmed up for), the pods start again with it.
    k.patch("sdep", namespace, "live", {"spec": {"engine": {"tokenBudget": 4096}}})
    wait_until("a template that starts engines at 4096", lambda: "4096" in k.get(
        "deployment", namespace, "live")["spec"]["template"]["spec"]["containers"][0]["args"], timeout=30)


# ---------------------------------------------------------------- scale and prune

def test_the_scale_subresource_scales_replicas(k, namespace, operator):
    k.apply(sdep("sc", namespace))
    wait_phase(k, namespace, "sc", "Ready")
    k.run("scale", "sdep", "sc", "--replicas", "3", "-n", namespace)
    obj = wait_phase(k, namespace, "sc", "Ready", generation=2)
    assert (obj["status"]["replicas"], obj["status"]["readyReplicas"]) == (3, 3)
    scale = k.json("get", "sdep", "sc", "-n", namespace, "--subresource", "scale")
    assert (scale["spec"]["replicas"], scale["status"]["replicas"]) == (3, 3)
    selected = k.items("pods", namespace, scale["status"]["selector"])
    assert len(selected) == 3


def test_scale_down_and_a_layout_change_prune_what_the_plan_drops(k, namespace, operator):
    k.apply(sdep("pr", namespace, replicas=2, parallelism={"tensor": 2, "pipeline": 2, "gpusPerNode": 2}))
    wait_phase(k, namespace, "pr", "Ready")
    assert {s["metadata"]["name"] for s in k.items("statefulsets", namespace)} == {"pr-0", "pr-1"}

    k.patch("sdep", namespace, "pr", {"spec": {"replicas": 1}})
    wait_phase(k, namespace, "pr", "Ready", generation=2)
    wait_until("pr-1 pruned", lambda: {s["metadata"]["name"] for s in k.items("statefulsets", namespace)} == {"pr-0"})
    wait_until("its pods gone", lambda: len(engine_pods(k, namespace, "pr")) == 2)

    k.patch("sdep", namespace, "pr", {"spec": {"parallelism": {"gpusPerNode": 8}}})  # now one 4-GPU pod
    obj = wait_phase(k, namespace, "pr", "Ready", generation=3)
    wait_until("StatefulSets pruned", lambda: not k.items("statefulsets", namespace))
    assert k.get("service", namespace, "pr-ranks") is None
    [pod] = wait_until("one pod", lambda: (lambda p: len(p) == 1 and running(p) and p)(engine_pods(k, namespace, "pr")))
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert obj["status"]["selector"] == f"{OWNER_LABEL}=pr,app.kubernetes.io/component=engine"
    assert reasons(k, namespace, "pr").count("Pruned") >= 3  # pr-1, pr-0, pr-ranks


# ---------------------------------------------------------------- deletion

def test_deleting_the_resource_removes_every_child(k, namespace, operator):
    k.apply(sdep("gone", namespace, replicas=2))
    wait_phase(k, namespace, "gone", "Ready")
    assert all(owned_children(k, namespace, "gone")[kind] for kind in CHILD_KINDS)

    k.run("delete", "sdep", "gone", "-n", namespace)
    wait_until("every child garbage-collected",
               lambda: not any(owned_children(k, namespace, "gone").values()) and not engine_pods(k, namespace, "gone"),
               timeout=60)


# ---------------------------------------------------------------- operator restarts and drift

def snapshot(k: Cluster, namespace: str, name: str) -> dict[str, list[str]]:
    return {kind: sorted(c["metadata"]["name"] for c in items)
            for kind, items in owned_children(k, namespace, name).items() if items}


def assert_exactly_one_of_everything(k: Cluster, namespace: str, name: str, uid: str, replicas: int):
    children = owned_children(k, namespace, name)
    for kind in CHILD_KINDS:
        assert len(children[kind]) == 1, (kind, [c["metadata"]["name"] for c in children[kind]])
        [ref] = children[kind][0]["metadata"]["ownerReferences"]
        assert ref["uid"] == uid, kind
    assert len(children["replicasets"]) == 1, "no second rollout"
    assert len(engine_pods(k, namespace, name)) == replicas


def test_an_operator_killed_mid_reconcile_resumes_without_duplicates(k, kube_cluster, namespace, operator):
    """SIGKILL the operator the moment its first child appears, then restart it."""
    mid_way = 0
    for attempt in range(4):
        name = f"kill{attempt}"
        seen_first = threading.Event()

        def kill_on_first_child():
            with kube_cluster.api_client() as api:
                for event in watch.Watch().stream(client.CoreV1Api(api).list_namespaced_secret, namespace=namespace,
                                                  label_selector=f"{OWNER_LABEL}={name}", timeout_seconds=30):
                    if event["type"] == "ADDED":
                        operator.kill()
                        seen_first.set()
                        return

        watcher = threading.Thread(target=kill_on_first_child)
        watcher.start()
        time.sleep(0.3)  # the watch is open
        k.apply(sdep(name, namespace, replicas=2))
        watcher.join(40)
        assert seen_first.is_set(), "the operator never created a child"

        at_kill = snapshot(k, namespace, name)
        full = {"deployments", "services", "secrets", "poddisruptionbudgets"}
        mid_way += not full <= set(at_kill)
        token_at_kill = admin_token(k, namespace, name) if "secrets" in at_kill else None

        operator.start()
        obj = wait_phase(k, namespace, name, "Ready")
        assert_exactly_one_of_everything(k, namespace, name, obj["metadata"]["uid"], replicas=2)
        if token_at_kill:
            assert admin_token(k, namespace, name) == token_at_kill, "the admin token is generated once"
        print(f"attempt {attempt}: children at kill {at_kill}")
    assert mid_way, "no kill landed before the last child was created"


def test_restarting_a_settled_operator_changes_nothing(k, namespace, operator):
    k.apply(sdep("calm", namespace, replicas=2))
    wait_phase(k, namespace, "calm", "Ready")
    versions = {kind: [c["metadata"]["resourceVersion"] for c in items]
                for kind, items in owned_children(k, namespace, "calm").items()}
    pods = uids(engine_pods(k, namespace, "calm"))

    operator.stop()
    operator.start()
    time.sleep(7)  # resume, plus one resync pass
    after = {kind: [c["metadata"]["resourceVersion"] for c in items]
             for kind, items in owned_children(k, namespace, "calm").items()}
    assert after == versions, "server-side apply of an unchanged plan writes nothing"
    assert uids(engine_pods(k, namespace, "calm")) == pods


def test_children_deleted_or_edited_by_hand_are_restored(k, namespace, operator):
    k.apply(sdep("heal", namespace, replicas=2))
    obj = wait_phase(k, namespace, "heal", "Ready")
    before = {kind: items[0]["metadata"]["uid"] for kind, items in owned_children(k, namespace, "heal").items()
              if kind in ("deployments", "services", "poddisruptionbudgets")}

    for kind in ("service", "poddisruptionbudget", "deployment"):
        k.run("delete", f"{kind}/heal", "-n", namespace)

    def restored():
        children = owned_children(k, namespace, "heal")
        return all(children[kind] and children[kind][0]["metadata"]["uid"] != uid for kind, uid in before.items())

    wait_until("deleted children recreated", restored, timeout=30)
    wait_phase(k, namespace, "heal", "Ready")
    assert_exactly_one_of_everything(k, namespace, "heal", obj["metadata"]["uid"], replicas=2)

    k.run("scale", "deployment", "heal", "--replicas", "5", "-n", namespace)
    k.patch("service", namespace, "heal", {"spec": {"ports": [{"name": "http", "port": 9999, "targetPort": "http"}]}})
    # Apply takes back replicas; the port clash (ours renamed by another writer) needs an overwrite.
    wait_until("drift taken back", lambda: k.get("deployment", namespace, "heal")["spec"]["replicas"] == 2
               and [p["port"] for p in k.get("service", namespace, "heal")["spec"]["ports"]] == [8000], timeout=30)
    wait_until("extra pods gone", lambda: len(engine_pods(k, namespace, "heal")) == 2, timeout=30)
    assert "Replaced" in reasons(k, namespace, "heal")
    wait_phase(k, namespace, "heal", "Ready")


def test_a_deleted_admin_secret_is_recreated_and_the_pods_run_its_token(k, namespace, operator):
    k.apply(sdep("tok", namespace))
    wait_phase(k, namespace, "tok", "Ready")
    old_uid = k.get("secret", namespace, "tok-admin")["metadata"]["uid"]

    k.run("delete", "secret", "tok-admin", "-n", namespace)
    wait_until("a new Secret (found by the periodic resync)",
               lambda: (k.get("secret", namespace, "tok-admin") or {"metadata": {"uid": old_uid}})["metadata"]["uid"] != old_uid,
               timeout=30)

    def pods_run_the_current_token():
        digest = hashlib.sha256(admin_token(k, namespace, "tok").encode()).hexdigest()[:16]
        pods = engine_pods(k, namespace, "tok")
        return len(pods) == 1 and running(pods) and all(
            p["metadata"]["annotations"]["serving.sarathi.dev/admin-token-sha256"] == digest for p in pods)

    wait_until("pods on the token in the Secret", pods_run_the_current_token, timeout=30)
    wait_phase(k, namespace, "tok", "Ready")


# ---------------------------------------------------------------- latency

class Stopwatch:
    """Watches the children of one resource and notes when each first appears. Each watch
    starts from a list's resourceVersion, so nothing created after start() is missed and
    nothing is timed by when its watch happened to open."""

    def __init__(self, kube_cluster, namespace: str, name: str):
        self.kube, self.namespace, self.name = kube_cluster, namespace, name
        self.seen: dict[str, float] = {}
        self.threads = []

    def _watch(self, key, list_fn, done, opened: threading.Event):
        kwargs = {"namespace": self.namespace}
        if key != "ready":
            kwargs["label_selector"] = f"{OWNER_LABEL}={self.name}"
        with self.kube.api_client() as api:
            listing = list_fn(api)(**kwargs)
            version = listing["metadata"]["resourceVersion"] if isinstance(listing, dict) else listing.metadata.resource_version
            opened.set()
            for event in watch.Watch().stream(list_fn(api), resource_version=version, timeout_seconds=60, **kwargs):
                if done(event["object"]):
                    self.seen.setdefault(key, time.perf_counter())
                    return

    def start(self):
        def exists(obj):
            return True

        def pod_running(pod):
            return pod.status.phase == "Running"

        def sdep_ready(obj):
            return obj["metadata"]["name"] == self.name and obj.get("status", {}).get("phase") == "Ready"

        def list_sdeps(api):
            def list_fn(**kw):
                return client.CustomObjectsApi(api).list_namespaced_custom_object(
                    "serving.sarathi.dev", "v1alpha1", kw.pop("namespace"), "sarathideployments", **kw)
            return list_fn

        watched = [
            ("deployment", lambda api: client.AppsV1Api(api).list_namespaced_deployment, exists),
            ("service", lambda api: client.CoreV1Api(api).list_namespaced_service, exists),
            ("secret", lambda api: client.CoreV1Api(api).list_namespaced_secret, exists),
            ("pdb", lambda api: client.PolicyV1Api(api).list_namespaced_pod_disruption_budget, exists),
            ("pod", lambda api: client.CoreV1Api(api).list_namespaced_pod, pod_running),
            ("ready", list_sdeps, sdep_ready),
        ]
        for key, list_fn, done in watched:
            opened = threading.Event()
            thread = threading.Thread(target=self._watch, args=(key, list_fn, done, opened))
            thread.start()
            self.threads.append(thread)
            assert opened.wait(20), f"{key} watch did not open"

    def join(self):
        for thread in self.threads:
            thread.join(70)


def test_reconcile_latency(k, kube_cluster, namespace, operator, capsys):
    """Apply to children created, to pods Running, to status Ready; five resources in turn."""
    figures = []
    for i in range(5):
        name = f"lat{i}"
        stopwatch = Stopwatch(kube_cluster, namespace, name)
        stopwatch.start()
        with kube_cluster.api_client() as api:
            applied = time.perf_counter()
            client.CustomObjectsApi(api).create_namespaced_custom_object(
                "serving.sarathi.dev", "v1alpha1", namespace, "sarathideployments", sdep(name, namespace))
        stopwatch.join()
        seen = stopwatch.seen
        children = ("deployment", "service", "secret", "pdb")
        assert set(children) | {"pod", "ready"} <= set(seen), seen
        figures.append({
            "children": max(seen[c] for c in children) - applied,
            "pod_running": seen["pod"] - applied,
            "ready": seen["ready"] - applied,
        })
    summary = {key: (statistics.median(f[key] for f in figures), max(f[key] for f in figures)) for key in figures[0]}
    passes = {line.split()[0]: float(line.split()[1]) for line in operator.metrics().splitlines()
              if line.startswith("sarathi_operator_reconcile_seconds_") and line.split()[0].endswith(("_sum", "_count"))}
    mean_pass = passes["sarathi_operator_reconcile_seconds_sum"] / passes["sarathi_operator_reconcile_seconds_count"]
    with capsys.disabled():
        print("\nreconcile latency over 5 resources (median / max, seconds):")
        for key, (median, worst) in summary.items():
            print(f"  apply -> {key:12s} {median:.3f} / {worst:.3f}")
        print(f"  one reconcile pass (operator histogram): mean {mean_pass * 1000:.1f} ms over "
              f"{passes['sarathi_operator_reconcile_seconds_count']:.0f} passes")
    assert summary["children"][1] < 5, "children within seconds of the apply"
    assert summary["ready"][1] < 15
