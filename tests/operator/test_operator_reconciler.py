"""Serialisation and coalescing of reconcile passes (the pass itself is exercised in e2e)."""

import asyncio

import pytest

from sarathi_operator.reconcile import Reconciler


class Recording(Reconciler):
    def __init__(self):
        super().__init__(kube=None)
        self.passes = []
        self.running = 0
        self.most_at_once = 0

    async def _pass(self, namespace, name):
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        self.passes.append(name)
        await asyncio.sleep(0.02)
        self.running -= 1


def test_a_burst_of_triggers_costs_two_passes_and_never_runs_them_at_once():
    async def burst():
        r = Recording()
        await asyncio.gather(*(r.reconcile("ns", "a") for _ in range(10)))
        return r

    r = asyncio.run(burst())
    # The first runs at once; the nine that arrive meanwhile are covered by one more pass.
    assert r.passes == ["a", "a"]
    assert r.most_at_once == 1


def test_different_resources_reconcile_concurrently():
    async def two():
        r = Recording()
        await asyncio.gather(r.reconcile("ns", "a"), r.reconcile("ns", "b"))
        return r

    r = asyncio.run(two())
    assert sorted(r.passes) == ["a", "b"] and r.most_at_once == 2


def test_a_trigger_after_a_pass_runs_a_new_pass():
    async def sequential():
        r = Recording()
        await r.reconcile("ns", "a")
        await r.reconcile("ns", "a")
        return r

    assert asyncio.run(sequential()).passes == ["a", "a"]


def test_a_failing_pass_raises_to_its_caller_and_the_next_trigger_retries():
    class Failing(Recording):
        async def _pass(self, namespace, name):
            await super()._pass(namespace, name)
            if len(self.passes) == 1:
                raise RuntimeError("api down")

    async def scenario():
        r = Failing()
        with pytest.raises(RuntimeError):
            await r.reconcile("ns", "a")
        await r.reconcile("ns", "a")
        return r

    assert asyncio.run(scenario()).passes == ["a", "a"]
