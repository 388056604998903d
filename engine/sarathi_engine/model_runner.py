"""Runs one scheduled batch through this rank's part of the model: flattens the chunks into token
ids, positions and cache slots, builds the attention metadata, runs the forward pass, and samples
a token for every sequence whose chunk reached the end of its known tokens."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from sarathi_engine.attention import AttentionMetadata, make_backend
from sarathi_engine.attention.flash_backend import FLASH_BLOCK_SIZE
from sarathi_engine.config import CacheConfig, ModelConfig, SchedulerConfig
from sarathi_engine.device import choose_attention_backend, flash_attn_imports
from sarathi_engine.distributed import agree_min
from sarathi_engine.kv_cache import BlockManager, allocate_kv_cache, bytes_per_block
from sarathi_engine.model.llama import LlamaForCausalLM
from sarathi_engine.model.loader import load_weights
from sarathi_engine.model.ops import select_ops
from sarathi_engine.sampler import Sampled, logprobs_of, sample
from sarathi_engine.sampling_params import SamplingParams
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
                 sched: SchedulerConfig, attention_backend: str = "auto") -> None:
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
        block_bytes = bytes_per_block(cfg, len(attention), kv_heads, cache.block_size)
        layer_shape = partial(self.backend.cache_shape, block_size=cache.block_size, num_kv_heads=kv_heads,
                              head_dim=cfg.head_dim)
        host_tokens = cache.kv_cache_memory // block_bytes * cache.block_size if device.type == "cpu" else None
        longest = sched.max_model_len or min(cfg.max_position_embeddings, host_tokens or cfg.max_position_embeddings)
        peak = self.warm_up(sched.largest_batches(longest), layer_shape)
        # Every rank must hold as many blocks as rank 0 hands out, whatever its share of the model.
        self.num_blocks = agree_min(self.size_cache(cache, block_bytes, peak))
        self.kv_cache = allocate_kv_cache(cfg, len(attention), layer_shape(self.num_blocks), device)
        self.model.bind_caches(self.kv_cache)

    def size_cache(self, cache: CacheConfig, block_bytes: int, peak: int) -> int:
        if self.device.type != "cuda":
            return cache.kv_cache_memory // block_bytes
        free, total = torch.cuda.mem_get_info(self.device)
        outside_torch = (total - free) - torch.cuda.memory_reserved(self.device)  # CUDA context, NCCL buffers
        room = kv_cache_bytes(total, cache.gpu_memory_utilization, peak, outside_torch)
        if room < block_bytes:
            raise ValueError(
                f"no GPU memory left for the KV cache: {cache.gpu_memory_utilization:g} of {total / 2**30:.1f} GiB, "
                f"less the warm-up's peak {peak / 2**30:.1f} GiB (weights and activations) and "
                f"{outside_torch / 2**30:.1f} GiB outside torch; raise --gpu-memory-utilization or lower "
                "--max-token-budget / --max-num-seqs")
        return room // block_bytes

    @torch.inference_mode()
    def warm_up(self, batches: list[list[int]], layer_shape) -> int:
        """Run the largest batches (new tokens per sequence) through the model, the logits and the
        sampler on a scratch cache before any request, so that kernel and memory errors surface
        at start; the peak memory they took on CUDA (weights and activations, the scratch cache
        excluded), 0 elsewhere. Every rank runs the same batches, so collectives pair up."""
        blocks = max(sum(-(-n // self.block_size) for n in lens) for lens in batches)
        scratch = allocate_kv_cache(self.cfg, len(self.model.attention_layers()), layer_shape(blocks), self.device)
        self.model.bind_caches(scratch)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for lens in batches:
            inputs = dummy_inputs(lens, self.block_size, self.device)
            hidden = None
            if self.model.embed_tokens is None:  # a later pipeline stage: the previous one's output
                hidden = torch.zeros(len(inputs.input_ids), self.cfg.hidden_size, dtype=self.activation_dtype,
                                     device=self.device)
            out = self.forward(inputs, hidden)
            if self.model.lm_head is not None:  # the first stage computes the logits of the last one's rows
                rows = out[inputs.logit_rows] if self.model.norm is not None else torch.zeros(
                    len(inputs.logit_rows), self.cfg.hidden_size, dtype=self.activation_dtype, device=self.device)
                logits = self.logits(rows)
                if logits is not None:
                    seqs = [Sequence("warm-up", [0], WARM_UP_SAMPLING) for _ in inputs.logit_rows]
                    sample(logits, seqs, self.generator, self.ops.argmax)
        peak = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - scratch.numel() * scratch.element_size()
        self.model.bind_caches(None)
        del scratch
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return peak

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
        """Logits of the last stage's rows on rank 0 (None on the other first-stage ranks), where
        the model ran: the sampler runs there too, and only the sampled ids reach the host."""
        return self.model.compute_logits(rows)

    def sample(self, batch: Batch, logits: torch.Tensor) -> list[Sampled]:
        """What each chunk produced (in batch order): its next token, None mid-prefill, and the
        logprobs its request asked for."""
        results = [Sampled() for _ in batch.chunks]
        finishing = [i for i, row in enumerate(batch.sample_at) if row is not None]
        if finishing:
            drawn = sample(select_rows(logits, [batch.sample_at[i] for i in finishing]),
                           [batch.chunks[i].seq for i in finishing], self.generator, self.ops.argmax)
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
        return self.sample(batch, self.logits(select_rows(hidden, batch.inputs.logit_rows)))


def scored_prompt_positions(seq: Sequence, start: int, end: int) -> list[int]:
    """The positions in [start, end) whose logits score the next prompt token for the request's
    prompt logprobs, skipping those already scored (before a preemption)."""
    if seq.params.prompt_logprobs is None:
        return []
    return list(range(max(start, len(seq.prompt_logprobs)), min(end, len(seq.prompt_token_ids) - 1)))


# The sampler's costliest path (a sorted vocabulary for top-p), so the warm-up measures it.
WARM_UP_SAMPLING = SamplingParams(temperature=1.0, top_p=0.9)


def kv_cache_bytes(total: int, utilization: float, peak: int, outside_torch: int) -> int:
    """What the KV cache may take on a GPU: the engine's share of its memory, less the warm-up's
    peak (weights and the largest batch's activations) and what lives outside torch's allocator."""
    return int(total * utilization) - peak - outside_torch


def dummy_inputs(lens: list[int], block_size: int, device: torch.device) -> BatchInputs:
    """A batch of sequences with these many new tokens each and nothing cached before them, laid
    out one after another from block 0; token id 0 throughout."""
    blocks = [-(-n // block_size) for n in lens]
    firsts = [0, *_cumsum(blocks)][:-1]
    widest = max(blocks)
    tables = [list(range(first, first + b)) + [0] * (widest - b) for first, b in zip(firsts, blocks)]
    slots = [first * block_size + p for first, n in zip(firsts, lens) for p in range(n)]
    positions = [p for n in lens for p in range(n)]
    long = torch.long
    return make_inputs(torch.zeros(len(positions), dtype=long), torch.tensor(positions, dtype=long),
                       torch.tensor(slots, dtype=long), lens, lens, torch.tensor(tables, dtype=long),
                       [end - 1 for end in _cumsum(lens)], device)


def select_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t[rows]; t itself when rows are all of its rows in order (every decode samples), which
    spares a copy of the logits."""
    return t if rows == list(range(t.shape[0])) else t[rows]


def completes(chunk: ScheduledChunk) -> bool:
    return chunk.seq.num_computed_tokens + chunk.num_tokens == chunk.seq.num_tokens


def _cumsum(values: list[int]) -> list[int]:
    total, out = 0, []
    for v in values:
        total += v
        out.append(total)
    return out
