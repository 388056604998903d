"""Structured output: a request's tokens held to JSON matching a JSON schema.

Built on llguidance rather than xgrammar: one abi3 wheel with no native build and no tie to the
torch version, a token mask in tens of microseconds with no per-schema compile step (so no
first-request stall while the engine steps), JSON schema support that reports what it does not
support by name, and it runs on the CPU. vLLM ships it as its `guidance` backend. It is imported
on first use, so an engine that never gets a schema runs without it.
"""
from __future__ import annotations

import json

import torch

ANY_JSON_OBJECT = {"type": "object"}  # response_format json_object


class Grammars:
    """Compiles schemas against one tokenizer (wrapped once, on first use: about a second)."""

    def __init__(self, tokenizer, eos_token_ids: set[int], vocab_size: int) -> None:
        self._hf, self._eos, self._vocab = tokenizer, sorted(eos_token_ids), vocab_size
        self._tokenizer = None  # an llguidance.LLTokenizer, once wrapped

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab, eos_token=self._eos)
        return self._tokenizer

    def compile(self, schema: dict) -> str:
        """The grammar of JSON matching `schema`, or a ValueError naming what is wrong with it."""
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid JSON schema: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"invalid JSON schema: {error}")
        return grammar

    def matcher(self, grammar: str) -> JsonMatcher:
        """A fresh matcher at the start of a grammar compile() returned."""
        import llguidance

        tokenizer = self.tokenizer
        return JsonMatcher(llguidance.LLMatcher(tokenizer, grammar), tokenizer.vocab_size)


class JsonMatcher:
    """Where one output stands in its grammar: which tokens may come next, and whether it is done."""

    def __init__(self, matcher, vocab_size: int) -> None:
        import llguidance.torch

        self._matcher = matcher  # an llguidance.LLMatcher
        self._fill = llguidance.torch.fill_next_token_bitmask
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)

    def allowed(self, vocab: int) -> torch.Tensor:
        """A [vocab] boolean mask of the tokens the grammar allows next."""
        self._fill(self._matcher, self._bitmask, 0)
        bits = ((self._bitmask[0][:, None] >> BIT_SHIFTS) & 1).flatten().bool()
        allowed = torch.zeros(vocab, dtype=torch.bool)
        n = min(vocab, bits.numel())
        allowed[:n] = bits[:n]
        return allowed

    def accept(self, token: int) -> bool:
        """Move past `token`; False if the grammar refuses it."""
        return self._matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The JSON is complete and nothing may follow but an end of output."""
        return self._matcher.is_stopped()


BIT_SHIFTS = torch.arange(32, dtype=torch.int32)
