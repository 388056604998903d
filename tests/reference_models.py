"""Reference checkpoints for engine tests: small random-weight Llama, Mistral and Qwen2 models
that transformers builds from a config (with SmolLM2's tokenizer), and transformers' own greedy
generation to compare against."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# Each exercises a different corner: llama3 rope scaling and tied embeddings; a sliding window
# shorter than the test prompts; Qwen2's qkv bias and an untied LM head.
TINY_CONFIGS = {
    "llama": dict(
        model_type="llama", tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    ),
    "mistral": dict(model_type="mistral", sliding_window=24, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False, use_sliding_window=False),
    # Qwen2 slides only from layer max_window_layers on: here the first layer attends fully.
    "qwen2-window": dict(model_type="qwen2", tie_word_embeddings=False, use_sliding_window=True, sliding_window=24,
                         max_window_layers=1),
}
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048,
              bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.2)



def build_tiny_model(kind: str, folder: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {**COMMON, **TINY_CONFIGS[kind]}
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def hf_greedy(folder: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The reference: transformers' generate, one prompt at a time (no padding), float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False)
        outputs.append(generated[0, len(prompt):].tolist())
    return outputs
