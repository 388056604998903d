"""Next-token choice for a batch, per request, in vLLM's order: the logits are adjusted (logit
bias, min_tokens, repetition/frequency/presence penalties, the JSON grammar's mask), then greedy
takes the argmax, and sampling applies temperature, min_p, top-k and top-p and draws, each seeded
request from its own generator so its output does not depend on its neighbours.

Logprobs are the model's own log-softmax, before any of these adjustments (vLLM's default).
A request with neutral settings runs none of the adjustments, so greedy output stays the argmax.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch

from sarathi_engine.sequence import Sequence


@dataclass
class TokenLogprobs:
    """One position's token with its logprob, and the most likely tokens there."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class Sampled:
    """What one chunk of a batch produced: its next token once its known tokens are all computed,
    and the logprobs the request asked for."""

    token: int | None = None  # None while the chunk is mid-prefill
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)


def sample(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator,
           argmax: Callable[[torch.Tensor], torch.Tensor] = partial(torch.argmax, dim=-1)) -> list[Sampled]:
    """logits: [batch, vocab] float32, one row per sequence; every step runs where they are.
    argmax: each row's first maximal index (the model's ops may bring a faster one)."""
    adjusted = adjust(logits, seqs)
    tokens = argmax(adjusted)
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if rows:
        cdf = filtered_probs(adjusted[rows], [seqs[i].params for i in rows]).cumsum(dim=-1)
        # Inverse CDF, one uniform per row from the request's own generator: u in (0, total]
        # picks the first token whose cumulative probability reaches it, never one of probability
        # 0 (a twentieth of the cost of an exponential race over the vocabulary on a CPU).
        uniform = torch.stack([1 - torch.rand((), generator=seqs[i].generator or generator) for i in rows])
        u = uniform.to(cdf.device, cdf.dtype) * cdf[:, -1]
        drawn = torch.searchsorted(cdf, u[:, None])[:, 0].clamp_(max=cdf.shape[-1] - 1)
        tokens[rows] = drawn.to(tokens.device)
    out = []
    for i, (seq, token) in enumerate(zip(seqs, tokens.tolist())):
        k = seq.params.logprobs
        out.append(Sampled(token, None if k is None else logprobs_of(logits[i:i + 1], [token], k)[0]))
    return out


def logprobs_of(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprobs]:
    """Each row's logprob of its token and its k most likely tokens."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    return [TokenLogprobs(token, value, list(zip(ids, values)))
            for token, value, ids, values in zip(tokens, chosen, top_ids.tolist(), top_values.tolist())]


def adjust(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The logits after each request's bias, min_tokens, penalties and grammar; the same tensor
    when no request asks for any."""
    rows = [i for i, s in enumerate(seqs) if needs_adjusting(s)]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        logits[i] = adjust_row(logits[i], seqs[i])
    return logits


def needs_adjusting(seq: Sequence) -> bool:
    p = seq.params
    return (bool(p.logit_bias) or p.penalised or seq.matcher is not None
            or (len(seq.output_token_ids) < p.min_tokens and bool(seq.end_token_ids)))


def adjust_row(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p, vocab = seq.params, row.shape[-1]
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=row.device)
        row = row.index_add(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=row.device))
    if p.penalised:
        row = penalise(row, seq.prompt_token_ids, seq.output_token_ids, p.repetition_penalty,
                       p.frequency_penalty, p.presence_penalty)
    allowed = torch.ones(vocab, dtype=torch.bool, device=row.device)
    if len(seq.output_token_ids) < p.min_tokens:
        allowed[[t for t in seq.end_token_ids if t < vocab]] = False
    if seq.matcher is not None:
        grammar = seq.matcher.allowed(vocab).to(row.device)
        # The grammar wins where the two leave nothing (the JSON is complete and only an end is left).
        allowed = allowed & grammar if bool((allowed & grammar).any()) else grammar
    return row.masked_fill(~allowed, float("-inf"))


def penalise(row: torch.Tensor, prompt: list[int], output: list[int], repetition: float, frequency: float,
             presence: float) -> torch.Tensor:
    """vLLM's penalties: repetition over prompt and output tokens (HF semantics), then OpenAI's
    frequency and presence over output tokens."""
    vocab = row.shape[-1]
    if repetition != 1:
        seen = torch.zeros(vocab, dtype=torch.bool, device=row.device)
        seen[torch.tensor(prompt + output, dtype=torch.long, device=row.device)] = True
        row = torch.where(seen, torch.where(row > 0, row / repetition, row * repetition), row)
    if output and (frequency or presence):
        counts = torch.bincount(torch.tensor(output, dtype=torch.long, device=row.device), minlength=vocab)[:vocab]
        counts = counts.to(row.dtype)
        row = row - frequency * counts - presence * (counts > 0).to(row.dtype)
    return row


def filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Each row's distribution after temperature, min_p, top-k and top-p. Only top-k and top-p
    need the vocabulary sorted (milliseconds per row on a CPU), so rows without them skip it."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
    logits = logits / temperature[:, None]
    min_p = torch.tensor([p.min_p for p in params], dtype=logits.dtype, device=device)[:, None]
    if bool((min_p > 0).any()):
        # p(token) < min_p * p(most likely) <=> logit < top logit + log(min_p)
        logits = logits.masked_fill(logits < logits.max(dim=-1, keepdim=True).values + min_p.log(), float("-inf"))
    if not any(p.top_k or p.top_p < 1 for p in params):
        return logits.softmax(dim=-1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=device)[None, :]
    top_k = torch.tensor([p.top_k or vocab for p in params], device=device)[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k, float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=device)[:, None]
    # Drop a token once the tokens ranked above it already cover top_p; the first always stays.
    outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    probs = torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)
    return probs / probs.sum(dim=-1, keepdim=True)
