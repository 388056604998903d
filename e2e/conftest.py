"""Fixtures of the e2e suite beyond the cluster itself: the local pod runner, and the
`serving` marker for the tests where engines really serve (`pytest -m serving`)."""

import uuid

import pytest

from e2e.podrunner import Runner


def pytest_configure(config):
    config.addinivalue_line("markers", "serving: real engine pods, run by the local pod runner (e2e/podrunner)")
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (e2e/gpu); skipped without one")


@pytest.fixture(scope="session")
def pod_runner(kube_cluster, tmp_path_factory) -> Runner:
    """A pod runner with a node of its own; pods select it with runner.placement()."""
    runner = Runner(kube_cluster.kubeconfig, f"podrunner-{uuid.uuid4().hex[:6]}", tmp_path_factory.mktemp("podrunner"))
    runner.start()
    yield runner
    runner.stop()
    if runner.error:
        print(f"pod runner {runner.node_name}: last error: {runner.error}")
