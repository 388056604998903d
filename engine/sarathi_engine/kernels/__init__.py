"""The engine's CPU kernels (cpu_ops.cpp), as torch.ops.sarathi.*.

They are compiled once per source, flags and torch version into `$SARATHI_KERNELS_DIR` (default
`$SARATHI_CACHE/kernels/`) and loaded by every later start: `sarathi kernels` builds them ahead
(`make` does, and the engine image at build time, so that its runtime needs no compiler). Where
they cannot be used (a CPU without AVX2 and FMA, no C++ compiler, a failed build) the engine runs
on plain torch ops and `load()` says why.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("sarathi.kernels")

SOURCE = Path(__file__).with_name("cpu_ops.cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-std=c++20", "-shared", "-fPIC", "-fno-math-errno", "-Wall"]

_lock = threading.Lock()
_state: dict[str, str | None] = {}  # "reason": None once loaded, else why not


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def unusable_reason() -> str | None:
    """Why this machine cannot run the kernels at all, or None."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2 and FMA (torch reports {capability})"
    return None


def build_command(cxx: str, output: Path) -> list[str]:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = cpp_extension.library_paths()
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return [cxx, *FLAGS, abi, *includes, str(SOURCE), "-o", str(output),
            *[f"-L{p}" for p in libs], *[f"-Wl,-rpath,{p}" for p in libs], "-lc10", "-ltorch_cpu"]


def library_path() -> Path:
    """Where the build for this source, these flags and this torch lives."""
    from sarathi_engine.model_store import cache_dir

    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join([*FLAGS, torch.__version__]).encode())
    folder = Path(os.environ.get("SARATHI_KERNELS_DIR") or cache_dir() / "kernels")
    return folder / f"sarathi_cpu_ops-{key.hexdigest()[:16]}.so"


def build(cxx: str, output: Path) -> None:
    """Compile into a temporary file and move it into place, so concurrent builders never load a
    half-written library."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=output.parent)
    os.close(fd)
    try:
        result = subprocess.run(build_command(cxx, Path(partial)), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{first_errors(result.stderr)}")
        os.replace(partial, output)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def load() -> str | None:
    """Load the kernels, building them first if needed; None when torch.ops.sarathi is ready,
    otherwise the reason it is not (logged once)."""
    with _lock:
        if "reason" not in _state:
            _state["reason"] = _load()
            if _state["reason"] is not None:
                log.warning("CPU kernels unavailable, running on torch ops: %s", _state["reason"])
        return _state["reason"]


def _load() -> str | None:
    reason = unusable_reason()
    if reason:
        return reason
    path = library_path()
    try:
        if not path.exists():
            cxx = compiler()
            if cxx is None:
                return f"no C++ compiler to build {path.name} (set CXX, or install g++)"
            log.info("building the CPU kernels once into %s", path)
            build(cxx, path)
            for stale in path.parent.glob("sarathi_cpu_ops-*.so"):  # builds of older sources or torches
                if stale != path:
                    stale.unlink(missing_ok=True)
        torch.ops.load_library(str(path))
    except (RuntimeError, OSError) as error:
        return str(error)
    return None


def first_errors(stderr: str, count: int = 5) -> str:
    """The compiler's first error lines: the cause, before the notes that follow from it."""
    errors = [line for line in stderr.splitlines() if " error: " in line or line.startswith("error")]
    return "\n".join(errors[:count]) or stderr[-2000:]
