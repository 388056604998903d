"""Where the model runs and which attention backend runs it: explicit, checked choices.

`--device cuda` never falls back: when CUDA is not usable the engine stops with the reason. The
flash-attn backend is chosen only where it can run (it imports, compute capability >= 8.0,
float16 or bfloat16); otherwise the torch backend, with the reason logged. The decisions are
pure functions of what was found, so the rules are tested on a CPU with fakes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("sarathi.engine")

DEVICES = ("auto", "cuda", "cpu")
ATTENTION_BACKENDS = ("auto", "flash-attn", "torch")
FLASH_MIN_CAPABILITY = (8, 0)  # flash-attn 2 runs on Ampere and newer
FLASH_DTYPES = (torch.float16, torch.bfloat16)


class DeviceError(RuntimeError):
    """A device or backend was asked for that cannot run here; the message says why."""


@dataclass(frozen=True)
class CudaState:
    """What this process found about CUDA."""

    usable: bool
    reason: str  # why not, when not usable
    capability: tuple[int, int] | None = None  # of the first visible GPU


def probe_cuda() -> CudaState:
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return CudaState(False, f"this torch ({torch.__version__}) is built without CUDA")
        return CudaState(False, f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU: "
                                "no device visible, or the NVIDIA driver is missing or older than its CUDA needs")
    try:
        return CudaState(True, "", torch.cuda.get_device_capability(0))
    except RuntimeError as error:  # e.g. a driver/runtime mismatch that is_available() did not catch
        return CudaState(False, f"CUDA failed to initialise: {error}")


def resolve_device(requested: str, cuda: CudaState) -> torch.device:
    """The device for --device `requested`: auto takes CUDA when usable, cuda demands it."""
    if requested not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "cuda" and not cuda.usable:
        raise DeviceError(f"--device cuda, but CUDA is not usable: {cuda.reason}")
    if requested == "cpu" or not cuda.usable:
        if requested == "auto":
            log.info("device auto: the CPU (%s)", cuda.reason)
        return torch.device("cpu")
    return torch.device("cuda")


def choose_attention_backend(requested: str, device: torch.device, dtype: torch.dtype,
                             capability: tuple[int, int] | None, flash_imports: bool) -> tuple[str, str]:
    """("flash-attn" or "torch", the reason) for --attention-backend `requested`."""
    if requested not in ATTENTION_BACKENDS:
        raise DeviceError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {requested!r}")
    if requested == "torch":
        return "torch", "--attention-backend torch"
    problems = []
    if device.type != "cuda":
        problems.append(f"flash-attn runs on CUDA only, the model runs on {device.type}")
    else:
        if capability is None or capability < FLASH_MIN_CAPABILITY:
            found = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
            problems.append(f"the GPU's compute capability {found} is below 8.0")
        if dtype not in FLASH_DTYPES:
            problems.append(f"dtype {str(dtype).removeprefix('torch.')} (flash-attn needs float16 or bfloat16)")
        if not flash_imports:
            problems.append("flash_attn does not import")
    if problems and requested == "flash-attn":
        raise DeviceError("--attention-backend flash-attn cannot run here: " + "; ".join(problems))
    if problems:
        return "torch", "; ".join(problems)
    return "flash-attn", "CUDA, compute capability >= 8.0, float16/bfloat16 and flash_attn imports"


def flash_attn_imports() -> bool:
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:  # an ImportError, or a build against another CUDA/torch failing to load
        return False
    return True
