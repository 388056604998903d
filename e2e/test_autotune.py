"""Autotuning end to end (issue 9): a SarathiDeployment of the bundled smollm2-135m-instruct run
by the local pod runner as a real `sarathi serve` process on CPU, chat-like load from the
benchmark's generator, the operator under its own ServiceAccount.

One story, in order, because the engine loads its model once:
1. With an SLO nothing breaks, the autotuner holds at the starting budget (the maximum) and
   reports the P99 TBT it achieves there.
2. The SLO is tightened to well under a third of that, so far that the budget must go below
   most chat prompts: within TIGHT_INTERVALS intervals the budget has shrunk and the P99 TBT of
   a window under the new budget is within the SLO. The history, the Events, the engine's own
   gauge and status.tokenBudget show each step.
3. The operator is killed and restarted: the autotuner resumes from the status.
4. The SLO is relaxed past the starting P99: the budget grows, every grow for prefill waiting,
   and TTFT falls: the median TTFT of probe requests over TTFT_INTERVALS intervals once the
   tight phase's backlog has drained, against the same late in the tight phase. The load's own
   requests' TTFT is shown too, not asserted: its median over some 16 requests of mixed prompt
   lengths follows the mix as much as the budget (0.93 -> 1.09 s in one CI run).
5. Autotuning is switched off: its status goes, the spec's budget is back on the engine.
"""

import asyncio
import json
import statistics
import threading
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e.test_operator import (  # noqa: F401  (fixtures)
    Cluster, Operator, crd, engine_pods, fresh_namespace, k, operator_kubeconfig, sdep_on_runner, wait_until,
)
from sarathi_engine.bench import loadgen
from sarathi_engine.bench.experiment import WorkloadSpec
from sarathi_operator.autotune.benchmark import prefill_rate
from sarathi_operator.autotune.aggregate import Snapshot, parse
from sarathi_operator.autotune.record import parse_iso

pytestmark = pytest.mark.serving

NAME = "tuned"
INTERVAL = 5
START_BUDGET = 512
TIGHT_INTERVALS = 14
GROW_INTERVALS = 48  # 15.8, 17.0, 23.0 and 34.0 in four runs: grows from a backlog at a small budget wait for gaps
TTFT_INTERVALS = 12
TIGHT_CHUNK = 48  # tokens: the tight SLO is twice what a chunk of this size takes at the idle prefill rate
LOAD_TIMEOUT = 300
UTILISATION = 0.25  # of the engine's prefill rate, so the budget binds without a growing queue
SCALE = 0.125
MAX_MODEL_LEN = 1024


class BackgroundLoad:
    """The benchmark's load generator streaming Poisson chat-like requests from a thread until
    stopped; finished requests land in records."""

    def __init__(self, url: str, model: str, tokens_per_second: float, seconds: float, seed: int = 0):
        chat = WorkloadSpec("sharegpt4", SCALE, MAX_MODEL_LEN, 4000, seed)
        work = sum(s.prompt_len + s.output_len for s in chat.requests()) / chat.num_requests
        self.qps = UTILISATION * tokens_per_second / work
        self.load = chat.load(self.qps, count=int(self.qps * seconds))
        self.url, self.model = url, model
        self.records: list[loadgen.RequestRecord] = []
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self.began = time.perf_counter()  # run_load's send times count from here, to within milliseconds
        self._task = self._loop.create_task(loadgen.run_load(self.url, self.model, self.load, continuous_usage=False,
                                                             on_done=self.records.append))
        self._started.set()
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            # The requests in flight too, so their connections close and the engine aborts them.
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def start(self) -> None:
        self._thread.start()
        self._started.wait(10)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(30)

    def ttfts(self, since: float, until: float) -> list[float]:
        """TTFTs of the finished requests sent between two time.perf_counter() readings."""
        return [r.ttft for r in self.records if r.ok and since <= self.began + r.send_time < until]


class Timeline:
    """Steps with their time since the start, shown as they happen (the closing note's figures)."""

    def __init__(self, began: float, capsys):
        self.began, self.capsys = began, capsys

    def append(self, step: str) -> None:
        with self.capsys.disabled():
            print(f"\nautotune e2e {time.monotonic() - self.began:6.0f} s  {step}", flush=True)


@pytest.fixture(scope="module")
def namespace(k, crd, pod_runner):
    with fresh_namespace(k) as name:
        yield name


@pytest.fixture(scope="module")
def operator(operator_kubeconfig, namespace, tmp_path_factory):
    op = Operator(operator_kubeconfig, namespace, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.stop()
    print(f"--- operator log ({op.log}) ---\n{op.log.read_text()[-8000:]}")


def status(k: Cluster, namespace: str) -> dict:
    return k.get("sdep", namespace, NAME).get("status", {})


def engine_metrics(ip: str) -> Snapshot:
    with urllib.request.urlopen(f"http://{ip}:8000/metrics", timeout=10) as resp:
        return parse(resp.read().decode())


def engine_budget(ip: str) -> int:
    return engine_metrics(ip).token_budget


def engine_waiting(ip: str) -> float:
    with urllib.request.urlopen(f"http://{ip}:8000/metrics", timeout=10) as resp:
        families = text_string_to_metric_families(resp.read().decode())
    return sum(s.value for f in families if f.name == "sarathi_num_requests_waiting" for s in f.samples)


def probe_ttft(ip: str, model: str, seconds: float, every: float = 5.0, prompt_len: int = 128) -> list[float]:
    """TTFT of one probe request (a fixed prompt, one output token) every `every` seconds for
    `seconds`, through the benchmark's streaming client: what a new request waits under the
    budget and load of the moment."""
    prompt = list(range(2000, 2000 + prompt_len))

    async def probes() -> list[float]:
        ttfts = []
        async with loadgen.client_session(120) as session:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                started = time.monotonic()
                record = await loadgen.stream_completion(
                    session, f"http://{ip}:8000", loadgen.completion_payload(model, prompt, 1, False),
                    loadgen.RequestRecord(len(ttfts), prompt_len, 1, 0.0))
                assert record.ok, record.error
                ttfts.append(record.ttft)
                await asyncio.sleep(max(0.0, every - (time.monotonic() - started)))
        return ttfts

    return asyncio.run(probes())


def set_slo(k: Cluster, namespace: str, ms: float) -> float:
    k.patch("sdep", namespace, NAME, {"spec": {"slo": {"tbtP99Ms": ms}}})
    return time.time()


def wait_status(k: Cluster, namespace: str, what: str, ready, timeout: float) -> dict:
    """The status once ready(status) holds; on timeout the failure shows the last status."""
    last = {}

    def check():
        nonlocal last
        last = status(k, namespace)
        return ready(last)

    try:
        wait_until(what, check, timeout=timeout, every=1)
    except AssertionError as e:
        raise AssertionError(f"{e}\nlast status: {json.dumps(last, indent=1)}") from None
    return last


def since(st: dict, t: float) -> bool:
    """The latest observed window of token gaps ended at or after t (to the second)."""
    observed = st.get("observed", {})
    return observed.get("actedOn") == "tbtP99Ms" and parse_iso(observed["time"]) >= int(t)


def test_the_autotuner_holds_a_tight_slo_and_grows_the_budget_when_it_is_relaxed(
        k, pod_runner, operator, namespace, capsys):
    began = time.monotonic()
    k.apply(sdep_on_runner(
        pod_runner, NAME, namespace,
        {"tokenBudget": START_BUDGET, "maxModelLen": MAX_MODEL_LEN, "dtype": "float32"}, "512MiB",
        slo={"tbtP99Ms": 600000},
        autotune={"enabled": True, "minTokenBudget": 32, "maxTokenBudget": START_BUDGET, "intervalSeconds": INTERVAL},
    ))
    wait_status(k, namespace, "Ready", lambda s: s.get("phase") == "Ready", timeout=LOAD_TIMEOUT)
    (pod,) = engine_pods(k, namespace, NAME)
    ip = pod["status"]["podIP"]
    timeline = Timeline(began, capsys)
    timeline.append("Ready")
    # The machine's speed varies many times over with what else runs on it: the load follows it.
    rate = asyncio.run(prefill_rate(f"http://{ip}:8000", NAME))
    load = BackgroundLoad(f"http://{ip}:8000", NAME, rate, seconds=1200)
    timeline.append(f"prefill {rate:.0f} tokens/s idle: {load.qps:.2f} req/s")
    load.start()
    try:
        # 1. At the maximum: the P99 TBT the starting budget achieves, over three windows.
        windows: dict[str, float] = {}
        loaded = time.time()

        def three_windows(s: dict) -> bool:
            if since(s, loaded + INTERVAL):
                windows[s["observed"]["time"]] = s["observed"]["tbtP99Ms"]
            return len(windows) >= 3

        st = wait_status(k, namespace, "three full windows at the starting budget", three_windows, timeout=180)
        start_p99 = max(windows.values())
        assert st["autotune"]["targetTokenBudget"] == START_BUDGET and st["autotune"]["lastDecision"].startswith("hold")
        assert "tuningHistory" not in st
        timeline.append(f"P99 TBT {start_p99:.0f} ms at budget {START_BUDGET} (windows: {sorted(windows.values())})")

        # 2. Tight: at most a third of it, and small enough that the budget must go below the
        # probe's 128 tokens, where it costs TTFT. An iteration takes about budget / rate plus the
        # decodes riding along (about 75 ms with the CPU kernels), so twice a 48-token chunk's time
        # holds budgets up to about 80. Twice a 64-token chunk's time let the budget settle at 160
        # in a run here, and in a CI run the probes' median rose once relaxed (0.74 -> 0.97 s).
        tight = round(min(start_p99 / 3, 2000 * TIGHT_CHUNK / rate))
        tightened = set_slo(k, namespace, tight)
        timeline.append(f"SLO tightened to {tight} ms")

        def met(s: dict) -> bool:
            history = s.get("tuningHistory", [])
            return bool(history) and s["autotune"]["targetTokenBudget"] < START_BUDGET \
                and since(s, parse_iso(history[-1]["time"]) + 1) and s["observed"]["tbtP99Ms"] <= tight

        st = wait_status(k, namespace, f"P99 TBT within {tight} ms", met, timeout=TIGHT_INTERVALS * INTERVAL)
        met_at, tight_since = time.time(), time.perf_counter()
        tuned = st["autotune"]["targetTokenBudget"]
        intervals = (met_at - tightened) / INTERVAL
        timeline.append(f"SLO {tight} ms met at budget {tuned} after "
                        f"{intervals:.1f} intervals: {st['observed']}")
        shrinks = [h for h in st["tuningHistory"] if h["action"] == "shrink"]
        assert shrinks and all(f"exceeds the SLO {tight} ms" in h["reason"] for h in shrinks)
        assert shrinks[0]["previousTokenBudget"] == START_BUDGET and shrinks[-1]["tokenBudget"] == tuned
        wait_until("the engine and status.tokenBudget on the tuned budget",
                   lambda: engine_budget(ip) == tuned and status(k, namespace).get("tokenBudget") == tuned,
                   timeout=4 * INTERVAL)
        messages = [e["message"] for e in k.events(namespace, NAME) if e["reason"] == "TokenBudgetTuned"]
        for h in shrinks:
            assert any(m.startswith(f"token budget {h['previousTokenBudget']} -> {h['tokenBudget']}: ")
                       for m in messages), (h, messages)
        assert f'sarathi_operator_autotune_token_budget{{name="{NAME}",namespace="{namespace}"}}' in operator.metrics()

        # 3. A restarted operator resumes from the status, not from the spec's budget.
        settled = status(k, namespace)["autotune"]["targetTokenBudget"]
        operator.kill()
        operator.start()
        before = status(k, namespace)["autotune"]["lastDecisionTime"]
        st = wait_status(k, namespace, "a pass of the restarted operator",
                         lambda s: s["autotune"]["lastDecisionTime"] != before, timeout=6 * INTERVAL)
        assert st["autotune"]["targetTokenBudget"] <= settled * 1.5 and engine_budget(ip) < START_BUDGET
        timeline.append(f"operator restarted, resumed at "
                        f"{st['autotune']['targetTokenBudget']}")
        # Late in the tight phase, so the probes see the queue a small budget builds.
        budget_before_probes = engine_budget(ip)
        tight_ttft = probe_ttft(ip, NAME, TTFT_INTERVALS * INTERVAL)
        tight_budgets = (budget_before_probes, engine_budget(ip))

        # 4. Relaxed past the starting P99: the budget grows back.
        relaxed_slo = round(start_p99 * 2)
        relaxed, tight_until = set_slo(k, namespace, relaxed_slo), time.perf_counter()
        low = st["autotune"]["targetTokenBudget"]
        st = wait_status(k, namespace, "the budget grown",
                         lambda s: s["autotune"]["targetTokenBudget"] >= min(START_BUDGET, 8 * low),
                         timeout=GROW_INTERVALS * INTERVAL)
        grown_at = time.time()
        grows = [h for h in st["tuningHistory"] if h["action"] == "grow"]
        assert grows and all("prefill is waiting" in h["reason"] for h in grows)
        timeline.append(f"SLO {relaxed_slo} ms: grew to "
                        f"{st['autotune']['targetTokenBudget']} after {(grown_at - relaxed) / INTERVAL:.1f} intervals")
        # TTFT of the relaxed steady state, not of the backlog left by the tight phase.
        wait_until("the tight phase's backlog drained", lambda: engine_waiting(ip) == 0,
                   timeout=GROW_INTERVALS * INTERVAL, every=0.5)
        relaxed_since, budget_before_probes = time.perf_counter(), engine_budget(ip)
        relaxed_ttft = probe_ttft(ip, NAME, TTFT_INTERVALS * INTERVAL)
        relaxed_budgets = (budget_before_probes, engine_budget(ip))
        timeline.append(f"median TTFT of a 128-token probe {statistics.median(tight_ttft):.2f} s (tight, "
                        f"{len(tight_ttft)} probes, budget {tight_budgets[0]} -> {tight_budgets[1]}) -> "
                        f"{statistics.median(relaxed_ttft):.2f} s (relaxed, {len(relaxed_ttft)}, "
                        f"budget {relaxed_budgets[0]} -> {relaxed_budgets[1]})")
        time.sleep(10)  # the last requests sent in the window finish
        tight_load = load.ttfts(tight_since, tight_until)
        relaxed_load = load.ttfts(relaxed_since, relaxed_since + TTFT_INTERVALS * INTERVAL)
        timeline.append(f"median TTFT of the load's requests {statistics.median(tight_load):.2f} s (tight, "
                        f"{len(tight_load)} requests) -> {statistics.median(relaxed_load):.2f} s (relaxed, "
                        f"{len(relaxed_load)})")
        # On this CPU a budget of 32 or 64 pays the per-iteration overhead several times per prompt
        # and queues the load; between about 224 and 512 TTFT moved less than its noise, and an
        # SLO of a third of the starting P99 did not show it (docs/autotune.md). The probes are the
        # measure: one fixed prompt, so the budget and the queue are all that change.
        assert statistics.median(relaxed_ttft) < statistics.median(tight_ttft)
    finally:
        load.stop()

    # 5. Off: the reconciler owns the budget again and the autotuner's status goes.
    k.patch("sdep", namespace, NAME, {"spec": {"autotune": {"enabled": False}}})
    wait_until("the autotuner's status cleared and the spec's budget live",
               lambda: "autotune" not in status(k, namespace) and engine_budget(ip) == START_BUDGET,
               timeout=6 * INTERVAL)
    assert status(k, namespace)["tuningHistory"]
    gaps = np.concatenate([r.tbts for r in load.records if r.ok])
    timeline.append(f"autotune off; {len(load.records)} requests, "
                    f"{gaps.size} token gaps served")
    timeline.append("history:\n  " + "\n  ".join(json.dumps(h) for h in status(k, namespace)["tuningHistory"]))
