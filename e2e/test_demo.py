"""What `make demo` (e2e/demo.py) applies stays valid: its SarathiDeployment passes the API
server's schema and the operator's own checks, and its chart values pass the chart's schema.
The flow itself is the one test_serving.py runs end to end."""

import subprocess

import yaml

from e2e import demo
from e2e.test_chart import CHART, helm  # noqa: F401  (fixture)
from e2e.test_operator import crd, k, scratch_namespace  # noqa: F401  (fixtures)
from sarathi_operator.spec import validate, with_defaults


def test_demo_deployment_is_accepted_by_the_api_server_and_the_operator(k, scratch_namespace):  # noqa: F811
    manifest = demo.deployment_manifest()
    manifest["metadata"]["namespace"] = scratch_namespace
    result = k.run("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(manifest), check=False)
    assert result.returncode == 0, result.stderr
    assert "image" not in manifest["spec"]  # the operator's engine image, from the chart's values
    assert validate(manifest["metadata"]["name"], with_defaults(manifest["spec"], demo.chart_values()["engineImage"])) == []


def test_demo_chart_values_pass_the_charts_schema(helm, tmp_path):  # noqa: F811
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(demo.chart_values()))
    result = subprocess.run([helm, "lint", "--strict", str(CHART), "-f", str(values)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_demo_status_lines_name_the_phase_counts_budget_and_conditions():
    text = demo.describe_status({"phase": "Ready", "replicas": 1, "readyReplicas": 1, "tokenBudget": 512,
                                 "conditions": [{"type": "Ready", "status": "True", "reason": "ReplicasReady",
                                                 "message": "1/1 replicas ready"}]})
    assert text.splitlines() == ["status: phase Ready, 1/1 replicas ready, token budget 512 in force",
                                 "  Ready=True (ReplicasReady: 1/1 replicas ready)"]
