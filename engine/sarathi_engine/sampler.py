"""Next-token choice for a batch: greedy, or temperature with top-k/top-p, per request, each
seeded request drawing from its own generator so its output does not depend on its neighbours."""
from __future__ import annotations

import torch

from sarathi_engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator) -> list[int]:
    """logits: [batch, vocab] float32 on the CPU, one row per sequence."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if rows:
        probs = filtered_probs(logits[rows], [seqs[i].params for i in rows])
        for row, p in zip(rows, probs):
            # Exponential race: argmax(p / E) with E ~ Exp(1) draws an index with probability p.
            noise = torch.empty_like(p).exponential_(generator=seqs[row].generator or generator)
            tokens[row] = (p / noise).argmax()
    return tokens.tolist()


def filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
    logits = logits / temperature[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab)[None, :]
    top_k = torch.tensor([p.top_k or vocab for p in params])[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k, float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)[:, None]
    # Drop a token once the tokens ranked above it already cover top_p; the first always stays.
    outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    probs = torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)
    return probs / probs.sum(dim=-1, keepdim=True)
