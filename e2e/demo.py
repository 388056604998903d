"""`make demo` (`python -m e2e.demo`): the main job on this machine, from nothing to an answer.

1. the local Kubernetes cluster (e2e/cluster; built from source on first use, then cached),
2. the local pod runner (e2e/podrunner) as node `demo-runner`, which runs the pods bound to
   it as processes of this checkout (there is no container runtime here),
3. the operator installed by the Helm chart, watching namespace `sarathi-demo`; its pod runs
   on the runner too, as its own ServiceAccount,
4. a SarathiDeployment of the bundled SmolLM2-135M-Instruct on CPU, in the operator's default
   engine image, its API behind a key the demo keeps in a Secret,
5. a question through the OpenAI API of its engine with that key, then its status.

Everything is left running so it can be explored; `make demo-down` (`python -m e2e.demo down`)
removes the deployment and the operator, stops the pod runner with its processes, and stops
the cluster.
"""

import base64
import json
import os
import secrets
import subprocess
import urllib.error
import urllib.request
import sys
import time
from pathlib import Path

import yaml

from e2e.cluster import build, cluster
from e2e.cluster.layout import Layout
from e2e.cluster.ui import say, step
from e2e.podrunner.node import pod_placement

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "sarathi-operator"
NAMESPACE = "sarathi-demo"
RELEASE = "sarathi-operator"
NODE = "demo-runner"
NAME = "chat"
API_KEY_SECRET = "chat-api-key"
ENGINE_IMAGE = "sarathi-engine:0.1.0"  # the pod runner runs this checkout in its place
QUESTION = "What is the capital of France?"
READY_TIMEOUT = 600


class Tools:
    """kubectl and helm (the pinned builds) against the demo's cluster."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.env = {**os.environ, "KUBECONFIG": str(layout.kubeconfig)}

    def run(self, tool: str, *args: str, input: str | None = None, check: bool = True) -> str:
        result = subprocess.run([str(build.binary(tool)), *args], input=input, env=self.env, capture_output=True,
                                text=True, timeout=600)
        if check and result.returncode:
            raise SystemExit(f"{tool} {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def kubectl(self, *args: str, **kw) -> str:
        return self.run("kubectl", *args, **kw)

    def json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def podrunner(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "e2e.podrunner", *args, "--node", NODE,
                        "--kubeconfig", str(self.layout.kubeconfig)], cwd=ROOT, check=True)


def deployment_manifest() -> dict:
    node_selector, tolerations = pod_placement(NODE)
    return {
        "apiVersion": "serving.sarathi.dev/v1alpha1",
        "kind": "SarathiDeployment",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {  # no image: the operator's engine image (chart_values)
            "model": {"name": NAME, "source": "smollm2-135m-instruct"},
            "auth": {"apiKeySecret": {"name": API_KEY_SECRET, "key": "key"}},
            "replicas": 1,
            "engine": {"tokenBudget": 512, "maxModelLen": 2048,
                       "extraArgs": ["--device", "cpu", "--kv-cache-memory", "256MiB"]},
            "slo": {"tbtP99Ms": 200},
            "nodeSelector": node_selector,
            "tolerations": tolerations,
        },
    }


def chart_values() -> dict:
    node_selector, tolerations = pod_placement(NODE)
    return {"watchNamespaces": [NAMESPACE], "engineImage": ENGINE_IMAGE, "nodeSelector": node_selector,
            "tolerations": tolerations}


def api_key(tools: Tools) -> str:
    """The key in the demo's Secret, made once: running pods read it when they started."""
    found = tools.kubectl("get", "secret", API_KEY_SECRET, "-n", NAMESPACE, "-o", "json", "--ignore-not-found")
    if found.strip():
        return base64.b64decode(json.loads(found)["data"]["key"]).decode()
    key = secrets.token_urlsafe(24)
    tools.kubectl("create", "secret", "generic", API_KEY_SECRET, "-n", NAMESPACE, f"--from-literal=key={key}")
    return key


def wait_ready(tools: Tools, status) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        obj = tools.json("get", "sdep", NAME, "-n", NAMESPACE)
        st = obj.get("status", {})
        status.detail = f"phase {st.get('phase', '-')}, {st.get('readyReplicas', 0)}/{obj['spec']['replicas']} ready"
        if st.get("phase") == "Ready" and st.get("observedGeneration") == obj["metadata"]["generation"]:
            return obj
        time.sleep(1)
    raise SystemExit(f"{NAME} not Ready after {READY_TIMEOUT}s: {obj.get('status')}")


def describe_status(status: dict) -> str:
    lines = [f"status: phase {status['phase']}, {status.get('readyReplicas', 0)}/{status['replicas']} replicas ready, "
             f"token budget {status.get('tokenBudget')} in force"]
    lines += [f"  {c['type']}={c['status']} ({c['reason']}: {c['message']})" for c in status.get("conditions", [])]
    return "\n".join(lines)


def status_without_key(pod_ip: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{pod_ip}:8000/v1/models", timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def ask(pod_ip: str, key: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://{pod_ip}:8000/v1", api_key=key, timeout=120)
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=32, temperature=0)
    return reply.choices[0].message.content


def up() -> int:
    layout = Layout.default()
    say("== the local cluster (the first run builds Kubernetes from source: minutes; later runs reuse it)")
    with cluster.locked(layout):
        cluster.up(layout)
    tools = Tools(layout)
    with step(f"pod runner as node {NODE}, running pods as local processes"):
        tools.podrunner("start")
    with step(f"operator installed by Helm into {NAMESPACE} (its pod must turn Ready)"):
        tools.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Namespace",
                                                              "metadata": {"name": NAMESPACE}}))
        tools.run("helm", "upgrade", "--install", RELEASE, str(CHART), "-n", NAMESPACE, "-f", "-",
                  "--wait", "--timeout", "5m", input=yaml.safe_dump(chart_values()))
    with step(f"API key in Secret {API_KEY_SECRET}"):
        key = api_key(tools)
    with step(f"SarathiDeployment {NAME} (smollm2-135m-instruct on CPU) Ready") as status:
        tools.kubectl("apply", "-f", "-", input=json.dumps(deployment_manifest()))
        wait_ready(tools, status)
    [pod] = [p for p in tools.json("get", "pods", "-n", NAMESPACE, "-l", f"serving.sarathi.dev/deployment={NAME}")["items"]
             if "deletionTimestamp" not in p["metadata"]]
    with step(f"a request to the engine at {pod['status']['podIP']}:8000 with the API key"):
        answer = ask(pod["status"]["podIP"], key)
        refused = status_without_key(pod["status"]["podIP"])
    print(f"\nQ: {QUESTION}\nA: {answer}\n")
    print(f"API key (Secret {API_KEY_SECRET}, spec.auth.apiKeySecret): sent as 'Authorization: Bearer {key}'; "
          f"/v1/models without it answered {refused}\n")
    print(tools.kubectl("get", "sdep,pods", "-n", NAMESPACE, "-o", "wide"))
    print(describe_status(tools.json("get", "sdep", NAME, "-n", NAMESPACE)["status"]) + "\n")
    say(f"""Left running for you to explore:
  export KUBECONFIG={layout.kubeconfig}
  export PATH={build.bin_dir()}:$PATH
  kubectl get sdep,pods -n {NAMESPACE} -o wide
  curl http://{pod['status']['podIP']}:8000/metrics | grep sarathi_token_budget
  curl http://{pod['status']['podIP']}:8000/v1/models -H 'Authorization: Bearer {key}'
  kubectl patch sdep {NAME} -n {NAMESPACE} --type merge -p '{{"spec":{{"engine":{{"tokenBudget":256}}}}}}'
Pod output: .cache/podrunner/{NODE}/<namespace>_<pod>_<uid>/container.log
Clean up (deployment, operator, pod runner and its processes, cluster): make demo-down""")
    return 0


def down() -> int:
    layout = Layout.default()
    tools = Tools(layout)
    if cluster.running(layout):
        with step("SarathiDeployment and operator removed"):
            tools.kubectl("delete", "sdep", NAME, "-n", NAMESPACE, "--ignore-not-found")
            tools.run("helm", "uninstall", RELEASE, "-n", NAMESPACE, "--wait", check=False)
            tools.kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=false")
    with step(f"pod runner {NODE} and its processes stopped"):
        tools.podrunner("stop")
    with cluster.locked(layout):
        cluster.down(layout)
    return 0


def main(argv: list[str]) -> int:
    if argv not in ([], ["down"]):
        raise SystemExit("usage: python -m e2e.demo [down]")
    return down() if argv else up()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
