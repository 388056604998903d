"""Runs one scheduled batch through this rank's part of the model: flattens the chunks into token
ids, positions and cache slots, builds the attention metadata, runs the forward pass, and samples
a token for every sequence whose chunk reached the end of its known tokens."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sarathi_engine.attention import AttentionMetadata, make_backend
from sarathi_engine.attention.flash_backend import FLASH_BLOCK_SIZE
from sarathi_engine.config import CacheConfig, ModelConfig
from sarathi_engine.device import choose_attention_backend, flash_attn_imports
from sarathi_engine.distributed import agree_min
from sarathi_engine.kv_cache import BlockManager, allocate_kv_cache, bytes_per_block
from sarathi_engine.model.llama import LlamaForCausalLM
from sarathi_engine.model.loader import load_weights
from sarathi_engine.model.ops import select_ops
from sarathi_engine.sampler import Sampled, logprobs_of, sample
from sarathi_engine.scheduler import ScheduledChunk
from sarathi_engine.sequence import Sequence

log = logging.getLogger("sarathi.engine")


@dataclass
class BatchInputs:
    """What every rank needs to run its part of one batch."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logit_rows: list[int]  # the tokens whose logits rank 0 needs: prompt logprobs and samples


@dataclass
class Batch:
    """A scheduled batch on rank 0: its chunks and the inputs made from them."""

    chunks: list[ScheduledChunk]  # prefills first, then decodes: the order of the token run
    inputs: BatchInputs
    prompt_rows: list[list[int]]  # per chunk, the logits rows of the prompt tokens it scores
    sample_at: list[int | None]  # per chunk, the logits row its next token is drawn from


def make_inputs(input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, query_lens: list[int],
                context_lens: list[int], block_tables: torch.Tensor, logit_rows: list[int],
                device: torch.device) -> BatchInputs:
    meta = AttentionMetadata(
        slot_mapping=slots.to(device),
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=block_tables.to(device),
        num_prefills=sum(1 for n in query_lens if n > 1),
        context_lens_tensor=torch.tensor(context_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, *_cumsum(query_lens)], dtype=torch.int32, device=device),
    )
    return BatchInputs(input_ids.to(device), positions.to(device), meta, logit_rows)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, folder: Path, cache: CacheConfig, device: torch.device, seed: int,
                 attention_backend: str = "auto") -> None:
        self.cfg = cfg
        self.device = device
        self.ops = select_ops(device, cfg.dtype, cfg.head_dim)
        self.activation_dtype = self.ops.activation_dtype
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        flash_imports = device.type == "cuda" and flash_attn_imports()
        backend, reason = choose_attention_backend(attention_backend, device, cfg.dtype, capability, flash_imports)
        log.info("attention backend %s: %s", backend, reason)
        self.backend = make_backend(backend, self.ops.name)
        if self.backend.name == "flash-attn":
            cache.block_size = FLASH_BLOCK_SIZE
        self.block_size = cache.block_size
        torch.manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(cfg.dtype)
        try:
            with torch.device(device):
                self.model = LlamaForCausalLM(cfg, self.backend, self.ops)
        finally:
            torch.set_default_dtype(default_dtype)
        load_weights(self.model, folder)
        self.model.prepare()
        self.model.eval()
        attention = self.model.attention_layers()
        kv_heads = attention[0].num_kv_heads
        # Every rank must hold as many blocks as rank 0 hands out, whatever its share of the model.
        block_bytes = bytes_per_block(cfg, len(attention), kv_heads, cache.block_size)
        self.num_blocks = agree_min(self.size_cache(cache, block_bytes))
        layer_shape = self.backend.cache_shape(self.num_blocks, cache.block_size, kv_heads, cfg.head_dim)
        self.kv_cache = allocate_kv_cache(cfg, len(attention), layer_shape, device)
        for layer, module in enumerate(attention):
            module.k_cache, module.v_cache = self.kv_cache[layer, 0], self.kv_cache[layer, 1]

    def size_cache(self, cache: CacheConfig, block_bytes: int) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * cache.gpu_memory_utilization) // block_bytes
        return cache.kv_cache_memory // block_bytes

    def prepare(self, chunks: list[ScheduledChunk], blocks: BlockManager) -> Batch:
        chunks = sorted(chunks, key=lambda c: c.num_tokens == 1)  # prefills first, stable
        ids, positions, slots, logit_rows, prompt_rows, sample_at = [], [], [], [], [], []
        for chunk in chunks:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            end = start + chunk.num_tokens
            first = len(ids)
            ids.extend(seq.token_ids(start, end))
            positions.extend(range(start, end))
            slots.extend(blocks.slot(seq, p) for p in range(start, end))
            scored = scored_prompt_positions(seq, start, end)
            prompt_rows.append(list(range(len(logit_rows), len(logit_rows) + len(scored))))
            logit_rows.extend(first + p - start for p in scored)
            sample_at.append(len(logit_rows) if completes(chunk) else None)
            if completes(chunk):
                logit_rows.append(len(ids) - 1)
        widest = max(len(c.seq.block_table) for c in chunks)
        tables = [c.seq.block_table + [0] * (widest - len(c.seq.block_table)) for c in chunks]
        long = torch.long
        inputs = make_inputs(
            torch.tensor(ids, dtype=long), torch.tensor(positions, dtype=long), torch.tensor(slots, dtype=long),
            [c.num_tokens for c in chunks], [c.seq.num_computed_tokens + c.num_tokens for c in chunks],
            torch.tensor(tables, dtype=long), logit_rows, self.device,
        )
        return Batch(chunks, inputs, prompt_rows, sample_at)

    @torch.inference_mode()
    def forward(self, inputs: BatchInputs, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """This stage's output: from token ids on the first stage, from `hidden` on the others."""
        return self.model(inputs.input_ids, inputs.positions, inputs.meta, hidden)

    @torch.inference_mode()
    def logits(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Logits of the last stage's rows on rank 0 (None on the other first-stage ranks)."""
        logits = self.model.compute_logits(rows)
        return None if logits is None else logits.cpu()

    def sample(self, batch: Batch, logits: torch.Tensor) -> list[Sampled]:
        """What each chunk produced (in batch order): its next token, None mid-prefill, and the
        logprobs its request asked for."""
        results = [Sampled() for _ in batch.chunks]
        finishing = [i for i, row in enumerate(batch.sample_at) if row is not None]
        if finishing:
            drawn = sample(logits[[batch.sample_at[i] for i in finishing]],
                           [batch.chunks[i].seq for i in finishing], self.generator)
            for i, result in zip(finishing, drawn):
                results[i] = result
        for chunk, rows, result in zip(batch.chunks, batch.prompt_rows, results):
            if rows:  # the same positions prepare() chose: the sequence has not moved since
                seq, start = chunk.seq, chunk.seq.num_computed_tokens
                targets = [seq.prompt_token_ids[p + 1] for p in scored_prompt_positions(seq, start, start + chunk.num_tokens)]
                result.prompt_logprobs = logprobs_of(logits[rows], targets, seq.params.prompt_logprobs)
        return results

    def execute(self, batch: Batch) -> list[Sampled]:
        """The whole model in this process (every stage here): forward, logits, sample."""
        hidden = self.forward(batch.inputs)
        if not batch.inputs.logit_rows:
            return [Sampled() for _ in batch.chunks]
        return self.sample(batch, self.logits(hidden[batch.inputs.logit_rows]))


def scored_prompt_positions(seq: Sequence, start: int, end: int) -> list[int]:
    """The positions in [start, end) whose logits score the next prompt token for the request's
    prompt logprobs, skipping those already scored (before a preemption)."""
    if seq.params.prompt_logprobs is None:
        return []
    return list(range(max(start, len(seq.prompt_logprobs)), min(end, len(seq.prompt_token_ids) - 1)))


def completes(chunk: ScheduledChunk) -> bool:
    return chunk.seq.num_computed_tokens + chunk.num_tokens == chunk.seq.num_tokens


def _cumsum(values: list[int]) -> list[int]:
    total, out = 0, []
    for v in values:
        total += v
        out.append(total)
    return out
