"""Autotuning end to end (issue 16): a SarathiDeployment of the bundled smollm2-135m-instruct run
by the local pod runner as a real `sarathi serve` process on CPU, chat-like load from the
benchmark's generator, the operator under its own ServiceAccount.

One story, in order, because the engine loads its model once:
1. With an SLO nothing breaks, the engine plans for it but the token budget (the cap) binds: the
   P99 TBT that the cap gives, over three windows.
2. The SLO is tightened to half a cap-sized chunk's time and a prompt of twice the cap is sent:
   within TIGHT_WINDOWS of the outer loop's windows, a window that began after the change holds
   its P99 within it, the planner having cut prefill chunks to fit. The engine's gauges (SLO,
   margin), status.autotune.state, the history and the Events agree.
3. The operator is killed and restarted: the loop resumes from exactly the saved state.
4. The SLO is relaxed past the cap's P99: a long prompt's chunks fill the whole cap again, and
   the margin does not wind up while the SLO limits nothing.
5. Autotuning is switched off: its status and condition go, the engine plans by the budget alone.
"""

import asyncio
import datetime
import json
import threading
import time
import urllib.request

import numpy as np
import pytest

from benchmarks.autotune import prefill_rate
from e2e.module_fixtures import namespace, operator  # noqa: F401  (fixtures)
from e2e.test_operator import (  # noqa: F401  (fixtures)
    Cluster, condition, crd, engine_pods, k, operator_kubeconfig, sdep_on_runner, wait_until,
)
from sarathi_engine.bench import loadgen
from sarathi_engine.bench.experiment import WorkloadSpec
from sarathi_operator.autotune.aggregate import Snapshot, parse
from sarathi_operator.autotune.loop import LoopState
from sarathi_operator.autotune.record import CONDITION

pytestmark = pytest.mark.serving

NAME = "tuned"
INTERVAL = 10  # a window needs 200 token gaps: 2-3 intervals of this load
CAP = 512  # the token budget
TIGHT_WINDOWS = 4  # of the outer loop's, to meet a tightened SLO
LOAD_TIMEOUT = 300
UTILISATION = 0.35  # of the engine's prefill rate: the cap binds without a growing queue
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


class Timeline:
    """Steps with their time since the start, shown as they happen (the closing note's figures)."""

    def __init__(self, began: float, capsys):
        self.began, self.capsys = began, capsys

    def append(self, step: str) -> None:
        with self.capsys.disabled():
            print(f"\nautotune e2e {time.monotonic() - self.began:6.0f} s  {step}", flush=True)


def status(k: Cluster, namespace: str) -> dict:
    return k.get("sdep", namespace, NAME).get("status", {})


def engine_metrics(ip: str) -> Snapshot:
    with urllib.request.urlopen(f"http://{ip}:8000/metrics", timeout=10) as resp:
        return parse(resp.read().decode())


def iterations_over(ip: str, tokens: float) -> float:
    """Iterations so far that held more than `tokens` tokens (a bucket bound of the histogram)."""
    with urllib.request.urlopen(f"http://{ip}:8000/metrics", timeout=10) as resp:
        text = resp.read().decode()
    buckets = {float(line.split('le="')[1].split('"')[0]): float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("sarathi_iteration_tokens_bucket")}
    return buckets[float("inf")] - buckets[tokens]


def long_prompt(ip: str, first: int, tokens: int = 2 * CAP - 24) -> None:
    """One prompt longer than the cap, one output token; `first`, its first token id, makes each
    call's prompt its own (a repeated one would come from the prefix cache)."""
    async def send():
        async with loadgen.client_session(120) as session:
            record = await loadgen.stream_completion(
                session, f"http://{ip}:8000", loadgen.completion_payload(NAME, list(range(first, first + tokens)), 1, False),
                loadgen.RequestRecord(0, tokens, 1, 0.0))
            assert record.ok, record.error

    asyncio.run(send())


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


def window_after(st: dict, t: float) -> bool:
    """The loop's latest window began after t: it ended at least one interval later (a window
    spans at least one interval between scrapes)."""
    observed = st.get("observed", {})
    return "time" in observed and parse_time(observed["time"]) - observed["windowSeconds"] >= int(t)


def parse_time(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc).timestamp()


def gauges_agree(ip: str, st: dict, slo_ms: float) -> bool:
    live = engine_metrics(ip).settings
    return live == {"token_budget": CAP, "tbt_slo_ms": slo_ms, "slo_margin": st["autotune"]["state"]["margin"]}


def test_the_engines_plan_for_the_slo_and_the_outer_loop_corrects_the_margin(k, pod_runner, operator, namespace,
                                                                           capsys):
    began = time.monotonic()
    loose = 600000
    k.apply(sdep_on_runner(
        pod_runner, NAME, namespace, {"tokenBudget": CAP, "maxModelLen": MAX_MODEL_LEN, "dtype": "float32"}, "512MiB",
        slo={"tbtP99Ms": loose}, autotune={"enabled": True, "intervalSeconds": INTERVAL},
    ))
    wait_status(k, namespace, "Ready", lambda s: s.get("phase") == "Ready", timeout=LOAD_TIMEOUT)
    (pod,) = engine_pods(k, namespace, NAME)
    ip = pod["status"]["podIP"]
    assert "--tbt-slo-ms" in pod["spec"]["containers"][0]["args"]  # planned from the start, calibrated
    timeline = Timeline(began, capsys)
    timeline.append("Ready")
    rate = asyncio.run(prefill_rate(f"http://{ip}:8000", NAME))
    load = BackgroundLoad(f"http://{ip}:8000", NAME, rate, seconds=900)
    timeline.append(f"prefill {rate:.0f} tokens/s idle: {load.qps:.2f} req/s")
    load.start()
    try:
        # 1. The cap binds: the P99 TBT it gives, over three windows.
        windows: dict[str, float] = {}
        loaded = time.time()

        def three_windows(s: dict) -> bool:
            if window_after(s, loaded):
                windows[s["observed"]["time"]] = s["observed"]["tbtP99Ms"]
            return len(windows) >= 3

        st = wait_status(k, namespace, "three windows under load", three_windows, timeout=20 * INTERVAL)
        cap_p99 = max(windows.values())
        assert st["autotune"]["state"] == {"margin": LoopState().margin, "infeasible": False}  # where it starts
        assert condition({"status": st}, CONDITION)["status"] == "True"
        timeline.append(f"P99 {cap_p99:.0f} ms at the cap {CAP} (windows: {sorted(windows.values())})")

        # 2. Tight: half the time of a chunk at the cap at the idle prefill rate, so that the long
        # prompt's chunks at the cap would break it twice over, while the decodes alone (about a
        # tenth of it here) fit. Not half the windows' P99: a window without a long prompt in it
        # can put that below what the decodes alone take.
        tight = round(500 * CAP / rate)
        tightened = set_slo(k, namespace, tight)
        wait_until("the tight SLO on the engine", lambda: engine_metrics(ip).settings["tbt_slo_ms"] == tight,
                   timeout=4 * INTERVAL)
        limited = engine_metrics(ip).limited
        # A prompt twice the cap: at the cap its chunks alone would take P99 past the SLO.
        long_one = threading.Thread(target=long_prompt, args=(ip, 3000))
        long_one.start()
        timeline.append(f"SLO tightened to {tight} ms; a {2 * CAP - 24}-token prompt sent")
        acted: set[str] = set()

        def met(s: dict) -> bool:
            if window_after(s, tightened):
                acted.add(s["observed"]["time"])
                assert len(acted) <= TIGHT_WINDOWS, f"not met within {TIGHT_WINDOWS} windows: {s['observed']}"
                return s["observed"]["tbtP99Ms"] <= tight
            return False

        st = wait_status(k, namespace, f"P99 within {tight} ms", met, timeout=(TIGHT_WINDOWS + 1) * 5 * INTERVAL)
        timeline.append(f"SLO {tight} ms met in window {len(acted)} after the change: {st['observed']}")
        long_one.join(60)
        assert engine_metrics(ip).limited > limited  # the planner cut chunks to fit
        wait_until("the engine's gauges agree with the status",
                   lambda: gauges_agree(ip, status(k, namespace), tight), timeout=4 * INTERVAL)
        st = status(k, namespace)
        history = st.get("tuningHistory", [])
        messages = [e["message"] for e in k.events(namespace, NAME) if e["reason"] == "SLOMarginTuned"]
        for h in history:
            assert any(m.startswith(f"SLO margin {h['previousMargin']:g} -> {h['margin']:g}: ") for m in messages)
        if history:
            assert history[-1]["margin"] == st["autotune"]["state"]["margin"]
        assert f'sarathi_operator_autotune_slo_margin{{name="{NAME}",namespace="{namespace}"}}' in operator.metrics()
        timeline.append(f"margin {st['autotune']['state']['margin']}; history: {[h['margin'] for h in history]}")

        # 3. A restarted operator resumes from exactly the saved state.
        saved = status(k, namespace)["autotune"]
        operator.kill()
        operator.start()
        st = wait_status(k, namespace, "a pass of the restarted operator",
                         lambda s: s["autotune"]["lastDecisionTime"] != saved["lastDecisionTime"],
                         timeout=6 * INTERVAL)
        after = st.get("tuningHistory", [])[len(history):]
        resumed_from = after[0]["previousMargin"] if after else st["autotune"]["state"]["margin"]
        assert resumed_from == saved["state"]["margin"], (saved, st["autotune"])
        timeline.append(f"operator restarted, resumed at margin {resumed_from}")

        # 4. Relaxed: a long prompt's chunks fill the cap again; the margin does not wind up.
        margin = status(k, namespace)["autotune"]["state"]["margin"]
        relaxed = round(max(cap_p99, 2 * tight) * 4)
        relaxed_at = set_slo(k, namespace, relaxed)
        wait_until("the relaxed SLO on the engine", lambda: engine_metrics(ip).settings["tbt_slo_ms"] == relaxed,
                   timeout=4 * INTERVAL)
        full = iterations_over(ip, CAP * 0.75)
        long_prompt(ip, 6000)
        assert iterations_over(ip, CAP * 0.75) > full, "no iteration held more than 3/4 of the cap"
        st = wait_status(k, namespace, "two windows at the relaxed SLO",
                         lambda s: window_after(s, relaxed_at + INTERVAL), timeout=12 * INTERVAL)
        assert st["autotune"]["state"]["margin"] == margin, "the margin wound up while the SLO limited nothing"
        timeline.append(f"SLO {relaxed} ms: the cap filled; margin {st['autotune']['state']['margin']}")
    finally:
        load.stop()

    # 5. Off: the autotuner's status and condition go; the engine plans by the budget alone.
    k.patch("sdep", namespace, NAME, {"spec": {"autotune": {"enabled": False}}})
    wait_until("the autotuner's status cleared and the engine back on the budget alone",
               lambda: "autotune" not in status(k, namespace)
               and engine_metrics(ip).settings == {"token_budget": CAP, "tbt_slo_ms": None, "slo_margin": 1.0},
               timeout=6 * INTERVAL)
    assert not condition({"status": status(k, namespace)}, CONDITION)
    gaps = np.concatenate([r.tbts for r in load.records if r.ok])
    timeline.append(f"autotune off; {len(load.records)} requests, {gaps.size} token gaps served")
    timeline.append("history:\n  " + "\n  ".join(json.dumps(h) for h in status(k, namespace).get("tuningHistory", [])))
