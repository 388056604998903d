"""The operator side of the autotuner, without a cluster: the controller's settings from the
spec, which pods it tunes and records, the budget new pods start with, and the task per resource."""

import asyncio
import json

import pytest

from sarathi_operator import budget, names
from sarathi_operator.autotune.daemon import Autotuners, config_from_spec, enabled, engine_urls, to_annotate
from sarathi_operator.spec import with_defaults


def spec(**autotune) -> dict:
    return with_defaults({"model": {"name": "m", "source": "smollm2-135m-instruct"}, "image": "i",
                          "engine": {"tokenBudget": 512}, "slo": {"tbtP99Ms": 250},
                          "autotune": {"enabled": True, **autotune}})


def pod(name, ip="127.1.0.5", ready=True, live=None, terminating=False) -> dict:
    annotations = {names.TOKEN_BUDGET: "512"}
    if live:
        annotations[names.LIVE_TOKEN_BUDGET] = json.dumps({"tokenBudget": live, "containerID": "c://1"})
    metadata = {"name": name, "annotations": annotations, **({"deletionTimestamp": "now"} if terminating else {})}
    return {"metadata": metadata, "status": {
        "podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "containerStatuses": [{"name": names.CONTAINER, "containerID": "c://1"}]}}


def test_settings_come_from_the_slo_and_the_bounds():
    config = config_from_spec(spec(minTokenBudget=64, maxTokenBudget=1024))
    assert (config.slo, config.min_budget, config.max_budget) == (0.25, 64, 1024)


def test_default_bounds_take_in_the_starting_budget():
    assert (lambda c: (c.min_budget, c.max_budget))(config_from_spec(spec())) == (32, 8192)
    tiny = spec()
    tiny["engine"]["tokenBudget"] = 16
    assert config_from_spec(tiny).min_budget == 16


def test_the_daemon_runs_only_while_enabled():
    assert enabled(spec())
    assert not enabled({"autotune": {"enabled": False}}) and not enabled({})


def test_only_ready_live_pods_with_an_ip_are_tuned():
    serving = [pod("a"), pod("b", ready=False), pod("c", ip=None), pod("d", terminating=True), pod("e", ip="127.1.0.9")]
    assert engine_urls(serving) == {"a": "http://127.1.0.5:8000", "e": "http://127.1.0.9:8000"}


def test_pods_are_recorded_once_their_engine_runs_the_target():
    serving = [pod("a"), pod("b", live=384), pod("c"), pod("d")]
    reported = {"a": 384, "b": 384, "c": 512}  # d could not be read
    assert [p["metadata"]["name"] for p in to_annotate(serving, reported, 384)] == ["a"]


@pytest.mark.parametrize("enabled_, status, expected", [
    (False, {"autotune": {"targetTokenBudget": 384}}, 512),
    (True, {"autotune": {"targetTokenBudget": 384}}, 384),
    (True, {}, 512),
])
def test_new_pods_start_from_the_tuned_budget_while_autotuning(enabled_, status, expected):
    s = spec()
    s["autotune"]["enabled"] = enabled_
    assert budget.start_budget(s, status) == expected


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
