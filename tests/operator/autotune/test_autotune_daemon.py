"""The operator side of the autotuner, without a cluster: the loop's settings from the spec,
which pods it reads, the live settings the engines get, and the task per resource."""

import asyncio

import pytest

from sarathi_operator import names, settings
from sarathi_operator.autotune.daemon import Autotuners, config_from_spec, enabled, engine_urls
from sarathi_operator.spec import with_defaults


def spec(**autotune) -> dict:
    return with_defaults({"model": {"name": "m", "source": "smollm2-135m-instruct"}, "image": "i",
                          "engine": {"tokenBudget": 512}, "slo": {"tbtP99Ms": 250},
                          "autotune": {"enabled": True, **autotune}})


def pod(name, ip="127.1.0.5", ready=True, terminating=False) -> dict:
    metadata = {"name": name, "annotations": {}, **({"deletionTimestamp": "now"} if terminating else {})}
    return {"metadata": metadata, "status": {
        "podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "containerStatuses": [{"name": names.CONTAINER, "containerID": "c://1"}]}}


def test_the_loop_takes_the_slo_from_the_spec():
    assert config_from_spec(spec()).slo == 0.25


def test_the_daemon_runs_only_while_enabled():
    assert enabled(spec())
    assert not enabled({"autotune": {"enabled": False}}) and not enabled({})


def test_only_ready_live_pods_with_an_ip_are_tuned():
    serving = [pod("a"), pod("b", ready=False), pod("c", ip=None), pod("d", terminating=True), pod("e", ip="127.1.0.9")]
    assert engine_urls(serving) == {"a": "http://127.1.0.5:8000", "e": "http://127.1.0.9:8000"}


@pytest.mark.parametrize("enabled_, status, expected", [
    (False, {"autotune": {"state": {"margin": 0.7, "infeasible": False}}},
     {"token_budget": 512, "tbt_slo_ms": None, "slo_margin": 1.0}),
    (True, {"autotune": {"state": {"margin": 0.7, "infeasible": False}}},
     {"token_budget": 512, "tbt_slo_ms": 250, "slo_margin": 0.7}),
    (True, {}, {"token_budget": 512, "tbt_slo_ms": 250, "slo_margin": 0.9}),
])
def test_the_engines_plan_for_the_slo_at_the_loops_margin_while_autotuning(enabled_, status, expected):
    s = spec()
    s["autotune"]["enabled"] = enabled_
    assert settings.desired(s, status) == expected


class FakeKube:
    """Serves one SarathiDeployment by name; counts reads."""

    def __init__(self, sdep):
        self.sdep, self.reads = sdep, 0

    def get(self, api_version, kind, namespace, name):
        self.reads += 1
        return self.sdep


def test_one_task_per_resource_which_ends_once_autotuning_is_off():
    async def scenario():
        kube = FakeKube({"metadata": {"uid": "u1"}, "spec": {"autotune": {"enabled": False}}})
        tuners = Autotuners(kube, reconcile=None)
        tuners.ensure("ns", "a")
        tuners.ensure("ns", "a")
        assert tuners.running() == [("ns", "a")]
        await asyncio.sleep(0.1)
        ended = tuners.running()
        kube.sdep = None  # deleted: a new task ends at once too
        tuners.ensure("ns", "a")
        await asyncio.sleep(0.1)
        return kube.reads, ended, tuners.running()

    reads, ended, after = asyncio.run(scenario())
    assert reads == 2 and ended == [] and after == []


def test_stopping_cancels_the_running_tasks():
    async def scenario():
        tuners = Autotuners(FakeKube(None), reconcile=None)
        started = asyncio.Event()

        async def forever(namespace, name):
            started.set()
            await asyncio.sleep(3600)

        tuners._run = forever
        tuners.ensure("ns", "a")
        await started.wait()
        await asyncio.wait_for(tuners.stop(), 5)
        return tuners._tasks[("ns", "a")].cancelled()

    assert asyncio.run(scenario())
