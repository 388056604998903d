"""Explicit device and attention-backend choices, and the checkpoints the engine refuses: the
rules through fakes (a CudaState and a compute capability named as such), the refusals on this
CPU for real."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sarathi_engine import LLM
from sarathi_engine.config import ModelConfig, layer_windows
from sarathi_engine.device import CudaState, DeviceError, choose_attention_backend, probe_cuda, resolve_device

FAKE_GPU = CudaState(True, "", (9, 0))  # a fake: what probe_cuda() would find on an H100
FAKE_NO_GPU = CudaState(False, "no device visible (a fake)")
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_auto_takes_cuda_only_when_usable_and_cuda_never_falls_back():
    assert resolve_device("auto", FAKE_GPU) == CUDA and resolve_device("auto", FAKE_NO_GPU) == CPU
    assert resolve_device("cpu", FAKE_GPU) == CPU and resolve_device("cuda", FAKE_GPU) == CUDA
    with pytest.raises(DeviceError, match="--device cuda, but CUDA is not usable: no device visible"):
        resolve_device("cuda", FAKE_NO_GPU)
    with pytest.raises(DeviceError, match="device must be one of"):
        resolve_device("tpu", FAKE_GPU)


def test_this_machine_has_no_cuda_and_says_why():
    state = probe_cuda()
    assert not state.usable and "CUDA" in state.reason or "GPU" in state.reason


@pytest.mark.parametrize("capability,dtype,imports,expected", [
    ((9, 0), torch.bfloat16, True, "flash-attn"),
    ((8, 0), torch.float16, True, "flash-attn"),
    ((7, 5), torch.float16, True, "torch"),  # Turing: flash-attn 2 refuses it
    ((9, 0), torch.float32, True, "torch"),  # --dtype auto falls back to float32 without a config dtype
    ((9, 0), torch.bfloat16, False, "torch"),
])
def test_flash_attn_only_where_it_can_run(capability, dtype, imports, expected):
    backend, reason = choose_attention_backend("auto", CUDA, dtype, capability, imports)
    assert backend == expected and reason
    if expected == "torch":
        with pytest.raises(DeviceError, match="--attention-backend flash-attn cannot run here"):
            choose_attention_backend("flash-attn", CUDA, dtype, capability, imports)
    assert choose_attention_backend("torch", CUDA, dtype, capability, imports)[0] == "torch"


def test_the_cpu_uses_the_torch_backend_and_refuses_a_forced_flash_attn():
    assert choose_attention_backend("auto", CPU, torch.float32, None, False) == (
        "torch", "flash-attn runs on CUDA only, the model runs on cpu")
    with pytest.raises(DeviceError, match="CUDA only"):
        choose_attention_backend("flash-attn", CPU, torch.bfloat16, None, True)


def test_asking_for_cuda_here_stops_the_engine_with_the_reason(tiny_models):
    with pytest.raises(DeviceError, match="--device cuda, but CUDA is not usable"):
        LLM(str(tiny_models["llama"]), device="cuda", kv_cache_memory="16MiB")
    served = subprocess.run([sys.executable, "-m", "sarathi_engine.cli", "serve", "--model", str(tiny_models["llama"]),
                             "--device", "cuda", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert served.returncode == 1 and "CUDA is not usable" in served.stderr


HF_QWEN2 = dict(architectures=["Qwen2ForCausalLM"], vocab_size=100, hidden_size=64, intermediate_size=128,
                num_hidden_layers=4, num_attention_heads=4, sliding_window=32)


def test_qwen2_slides_only_from_max_window_layers_on():
    assert layer_windows({**HF_QWEN2, "use_sliding_window": False}, "Qwen2ForCausalLM") == (None,) * 4
    assert layer_windows({**HF_QWEN2, "use_sliding_window": True, "max_window_layers": 3},
                         "Qwen2ForCausalLM") == (None, None, None, 32)
    kinds = ["full_attention", "sliding_attention"] * 2
    assert layer_windows({**HF_QWEN2, "use_sliding_window": True, "layer_types": kinds},
                         "Qwen2ForCausalLM") == (None, 32, None, 32)
    assert layer_windows({**HF_QWEN2, "architectures": ["MistralForCausalLM"]}, "MistralForCausalLM") == (32,) * 4


def test_a_quantized_checkpoint_is_refused_naming_field_and_method():
    hf = {**HF_QWEN2, "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}
    with pytest.raises(ValueError, match="quantization_config \\(quant_method 'fp8'\\)"):
        ModelConfig.from_hf_config(hf)
