"""The shared model cache end to end (issue 19): an hf:// source with spec.model.cache is
downloaded once, by a Job, into a claim the engine pods mount; a re-created pod and a second
resource on the same claim start without downloading.

The claim is bound to a hostPath volume in a temporary folder, which the local pod runner maps
the pods' /models to. The Hub cannot be reached here, so the source is FAKE: `fake_hf` puts a
stand-in for the Hugging Face CLI first on the pods' PATH, which "downloads" by copying the
bundled model and notes every call.
"""

import os
import sys
import uuid
from pathlib import Path

import pytest
from openai import OpenAI

from e2e.module_fixtures import namespace, operator  # noqa: F401  (fixtures)
from e2e.test_operator import (  # noqa: F401  (fixtures)
    crd, engine_pods, k, operator_kubeconfig, sdep_on_runner, wait_until,
)
from sarathi_engine.model_store import DEFAULT_MODEL, DOWNLOADED_MARKER, resolve_model
from sarathi_operator.names import DEPLOYMENT_LABEL

pytestmark = pytest.mark.serving

NAME = "cached"
REPO = "fake-org/smollm2"
CLAIM = "models"
LOAD_TIMEOUT = 300


@pytest.fixture(scope="module")
def fake_hf(tmp_path_factory) -> tuple[Path, Path]:
    """(folder holding the fake `hf`, file of its calls). It copies the bundled model, prepared
    here, into --local-dir."""
    folder = tmp_path_factory.mktemp("fake-hf")
    calls = folder / "calls"
    script = folder / "hf"
    script.write_text("#!/bin/sh\n"
                      "# FAKE Hugging Face CLI for the e2e: `hf download REPO --local-dir DIR` copies the bundled model.\n"
                      f"echo \"$@\" >> {calls}\n"
                      "mkdir -p \"$4\"\n"
                      f"cp -r {resolve_model(DEFAULT_MODEL)}/. \"$4\"/\n")
    script.chmod(0o755)
    return folder, calls


@pytest.fixture(scope="module")
def cache_claim(k, namespace, tmp_path_factory) -> Path:
    """A claim bound to a hostPath volume in a temporary folder; returns the folder."""
    folder = tmp_path_factory.mktemp("model-cache")
    volume = f"model-cache-{uuid.uuid4().hex[:8]}"
    k.apply({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": volume},
             "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                      "hostPath": {"path": str(folder)}, "persistentVolumeReclaimPolicy": "Retain",
                      "claimRef": {"namespace": namespace, "name": CLAIM}}})
    k.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CLAIM, "namespace": namespace},
             "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": volume,
                      "resources": {"requests": {"storage": "1Gi"}}}})
    wait_until("the cache claim bound",
               lambda: (k.get("pvc", namespace, CLAIM) or {}).get("status", {}).get("phase") == "Bound")
    yield folder
    k.run("delete", "pv", volume, "--wait=false")


def cached_sdep(runner, name: str, namespace: str, fake_bin: Path, replicas: int) -> dict:
    manifest = sdep_on_runner(runner, name, namespace, {"tokenBudget": 128}, "64Mi", replicas=replicas,
                              model={"name": name, "source": f"hf://{REPO}", "cache": {"claimName": CLAIM}})
    path = f"{fake_bin}:{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    manifest["spec"]["env"].append({"name": "PATH", "value": path})
    return manifest


def ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def answers(pod: dict) -> str:
    client = OpenAI(base_url=f"http://{pod['status']['podIP']}:8000/v1", api_key="unused", max_retries=0, timeout=60)
    return client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=4).choices[0].text


def calls(fake: tuple[Path, Path]) -> list[str]:
    return fake[1].read_text().splitlines() if fake[1].exists() else []


def test_the_model_downloads_once_and_pods_start_from_the_cache(k, pod_runner, operator, namespace, fake_hf,
                                                                cache_claim):
    k.apply(cached_sdep(pod_runner, NAME, namespace, fake_hf[0], replicas=1))
    status = wait_until("the model cache ready", lambda: (k.get("sdep", namespace, NAME) or {}).get("status", {})
                        .get("modelCache", {}).get("state") == "Ready" and k.get("sdep", namespace, NAME)["status"],
                        timeout=LOAD_TIMEOUT)
    assert status["modelCache"]["claimName"] == CLAIM
    assert calls(fake_hf) == [f"download {REPO} --local-dir {cache_claim}/{REPO}"], "through the claim's path"
    assert (cache_claim / REPO / DOWNLOADED_MARKER).is_file() and (cache_claim / REPO / "config.json").is_file()

    [first] = wait_until("the engine ready", lambda: [p for p in engine_pods(k, namespace, NAME) if ready(p)],
                         timeout=LOAD_TIMEOUT)
    assert answers(first)
    engine_args = first["spec"]["containers"][0]["args"]
    assert engine_args[engine_args.index("--model") + 1] == f"/models/{REPO}"
    model_volume = next(v for v in first["spec"]["volumes"] if v["name"] == "model")
    assert model_volume["persistentVolumeClaim"] == {"claimName": CLAIM, "readOnly": True}

    # A re-created pod mounts the same claim and starts without a download.
    k.run("delete", "pod", first["metadata"]["name"], "-n", namespace, "--wait=false")
    [second] = wait_until("a re-created engine ready", lambda: [
        p for p in engine_pods(k, namespace, NAME) if ready(p) and p["metadata"]["uid"] != first["metadata"]["uid"]],
        timeout=LOAD_TIMEOUT)
    assert answers(second)
    assert len(calls(fake_hf)) == 1
    jobs = k.items("jobs", namespace, f"{DEPLOYMENT_LABEL}={NAME}")
    assert len(jobs) == 1 and jobs[0]["status"].get("succeeded") == 1

    # A second resource on the same claim: its own Job finds the model there and downloads nothing.
    k.apply(cached_sdep(pod_runner, "again", namespace, fake_hf[0], replicas=0))
    wait_until("the second resource's cache ready", lambda: (k.get("sdep", namespace, "again") or {})
               .get("status", {}).get("modelCache", {}).get("state") == "Ready", timeout=LOAD_TIMEOUT)
    assert len(calls(fake_hf)) == 1
    [job] = k.items("jobs", namespace, f"{DEPLOYMENT_LABEL}=again")
    [job_pod] = k.items("pods", namespace, f"job-name={job['metadata']['name']}")
    log = pod_runner.log_path(namespace, job_pod["metadata"]["name"]).read_text()
    assert f"{REPO}: already in {cache_claim}/{REPO}" in log
