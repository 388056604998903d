"""Builders of SarathiDeployment objects as the API server returns them (defaults filled in)."""

import copy

from sarathi_operator.spec import API_VERSION, KIND, with_defaults


def make_sdep(name="chat", namespace="ml", **spec) -> dict:
    base = {
        "model": {"name": "chat", "source": "smollm2-135m-instruct"},
        "image": "registry.example/sarathi:1",
    }
    for key, value in spec.items():
        base[key] = copy.deepcopy(value)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": 1},
        "spec": with_defaults(base),
    }
