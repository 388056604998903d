"""The GPU check: on a machine with an NVIDIA GPU, do the engine's greedy outputs equal
transformers' for small random models (Llama; Qwen2 with its qkv bias; Mistral with a sliding
window) across token budgets and policies, and how far are its decode steps and prefill for a
Llama-3-8B-shaped model (random weights) from the HBM floor (weight bytes / measured bandwidth)?

Needs only torch, transformers and safetensors: no network, no flash-attn (the engine then runs
its torch attention backend, and says so). Every model is built here from a config, with a
word-level tokenizer made on the spot.

    PYTHONPATH=engine python -m e2e.gpu.check --out docs/gpu.md

Without CUDA it says so and exits 0 having checked nothing; `--device cpu --small` runs the same
code on a CPU with a small model, to check the check.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

TINY = {
    "llama": dict(model_type="llama", tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False, use_sliding_window=False),  # qkv bias
    "mistral": dict(model_type="mistral", sliding_window=24, tie_word_embeddings=False),
}
TINY_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, bos_token_id=1,
                   eos_token_id=2, initializer_range=0.2)
LLAMA_3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                  rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
SMALL = {**LLAMA_3_8B, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 4096}
RUNS = [("sarathi", 16), ("sarathi", 128), ("vllm", 512)]
PROMPT_LENS = [1, 5, 40, 77, 130]
MAX_NEW = 16


def save_model(settings: dict, folder: Path, dtype: torch.dtype, device: str) -> Path:
    """A random-weight checkpoint and a word-level tokenizer ("t0", "t1", ...) in `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    settings = dict(settings)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    del model
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(folder)
    return folder


def prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def reference(folder: Path, inputs: list[list[int]], device: str) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    out = []
    for prompt in inputs:
        ids = torch.tensor([prompt], device=device)
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                                   min_new_tokens=MAX_NEW)
        out.append(generated[0, len(prompt):].tolist())
    return out


def exactness(root: Path, device: str) -> list[dict]:
    from sarathi_engine import LLM, SamplingParams

    rows = []
    for kind, settings in TINY.items():
        folder = save_model({**TINY_COMMON, **settings}, root / kind, torch.float32, device)
        inputs = prompts(TINY_COMMON["vocab_size"])
        expected = reference(folder, inputs, device)
        for policy, budget in RUNS:
            with LLM(str(folder), dtype="float32", device=device, policy=policy, token_budget=budget,
                     max_model_len=512, kv_cache_memory="64MiB", gpu_memory_utilization=0.3) as llm:
                got = [o.token_ids for o in llm.generate(inputs, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True))]
                backend = llm.engine.runner.backend.name
            rows.append({"model": kind, "policy": policy, "budget": budget, "backend": backend,
                         "equal": sum(a == b for a, b in zip(got, expected)), "of": len(inputs)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def bandwidth(device: str, gib: float = 2.0) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() / min(times)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def speed(root: Path, device: str, settings: dict) -> dict:
    """Median decode-step time at a few batch sizes (context ~512) and the prefill rate of full
    2048-token chunks, from the engine's own iteration records."""
    from sarathi_engine import LLM, SamplingParams

    folder = save_model(settings, root / "speed", torch.bfloat16, device)
    result = {"bandwidth_gb_s": bandwidth(device) / 1e9, "decode_ms": {}}
    with LLM(str(folder), dtype="bfloat16", device=device, token_budget=2048, max_num_seqs=64, max_model_len=4096,
             kv_cache_memory="2GiB", gpu_memory_utilization=0.9) as llm:
        engine = llm.engine
        weights = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
        result.update(weight_gb=weights / 1e9, backend=engine.runner.backend.name,
                      floor_ms=1000 * weights / (result["bandwidth_gb_s"] * 1e9))
        vocab = settings["vocab_size"]
        for batch in (1, 16, 64):
            engine.iterations.clear()
            llm.generate(prompts_of(batch, 512, vocab), SamplingParams(max_tokens=33, ignore_eos=True))
            steps = [it.duration for it in engine.iterations if it.num_prefill_tokens == 0 and it.num_seqs == batch]
            result["decode_ms"][batch] = 1000 * statistics.median(steps)
        engine.iterations.clear()
        llm.generate(prompts_of(4, 2048, vocab), SamplingParams(max_tokens=1))
        chunks = [it for it in engine.iterations if it.num_prefill_tokens == 2048]
        result["prefill_tok_s"] = 2048 / statistics.median(it.duration for it in chunks)
    return result


def prompts_of(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def report(device_name: str, rows: list[dict], timing: dict, shape: str) -> str:
    lines = [f"GPU check on {device_name}, torch {torch.__version__} (CUDA {torch.version.cuda}).", "",
             "**Exactness**: greedy tokens equal to transformers' (float32, 16 new tokens, prompts of "
             f"{', '.join(map(str, PROMPT_LENS))} tokens).", "",
             "| model | policy | budget | attention | prompts equal |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['policy']} | {r['budget']} | {r['backend']} | {r['equal']} / {r['of']} |"
              for r in rows]
    floor = timing["floor_ms"]
    lines += ["", f"**Speed**: {shape}, bfloat16, random weights ({timing['weight_gb']:.1f} GB), "
              f"{timing['backend']} attention. Copy bandwidth {timing['bandwidth_gb_s']:.0f} GB/s, so reading "
              f"the weights once takes {floor:.2f} ms: the floor of a decode step.", "",
              "| decode batch (context ~512) | step ms | x floor |", "|---|---|---|"]
    lines += [f"| {b} | {ms:.2f} | {ms / floor:.2f} |" for b, ms in timing["decode_ms"].items()]
    lines += ["", f"Prefill, 2048-token chunks: {timing['prefill_tok_s']:.0f} tokens/s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="a small model instead of Llama-3-8B's shape")
    p.add_argument("--out", type=Path, help="write the report here (markdown)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: the GPU check waits for a machine with an NVIDIA GPU", file=sys.stderr)
        return 0
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "the CPU"
    with tempfile.TemporaryDirectory() as scratch:
        rows = exactness(Path(scratch), args.device)
        shape = "a small Llama" if args.small else "Llama-3-8B's shape"
        timing = speed(Path(scratch), args.device, SMALL if args.small else LLAMA_3_8B)
    text = report(name, rows, timing, shape)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if all(r["equal"] == r["of"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
