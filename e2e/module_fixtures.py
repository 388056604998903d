"""The fixtures of e2e modules whose engines really serve through the pod runner: one namespace
and one operator watching it, for the whole module (starting engines is slow). A module imports
them with the fixtures they depend on (`k`, `crd`, `operator_kubeconfig` from test_operator).
"""

import pytest

from e2e.test_operator import fresh_namespace, operator_running


@pytest.fixture(scope="module")
def namespace(k, crd, pod_runner):
    with fresh_namespace(k) as name:
        yield name


@pytest.fixture(scope="module")
def operator(operator_kubeconfig, namespace, tmp_path_factory):
    with operator_running(operator_kubeconfig, namespace, tmp_path_factory.mktemp("operator") / "operator.log",
                          shown=8000) as op:
        yield op
