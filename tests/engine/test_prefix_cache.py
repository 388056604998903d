"""Prefix caching: which blocks a new sequence reuses, how blocks are shared, freed and evicted,
what the hit counters count, and that greedy outputs do not change with it."""
from __future__ import annotations

import random
from collections import Counter

import pytest
from reference_models import hf_greedy

from sarathi_engine import LLM, SamplingParams
from sarathi_engine.kv_cache import BlockManager
from sarathi_engine.sequence import Sequence

BS = 16


def seq(name: str, tokens: list[int], **params) -> Sequence:
    return Sequence(name, tokens, SamplingParams(**params))


def computed(blocks: BlockManager, s: Sequence) -> None:
    """As the engine does when a sequence's whole prompt has run."""
    s.num_computed_tokens = s.num_tokens
    blocks.register_computed(s)


def admitted_after_a_first(blocks: BlockManager, prompt: list[int], **params) -> Sequence:
    """A second sequence of `prompt`, admitted once a first one of it has been computed."""
    first = seq("first", prompt)
    blocks.admit(first, keep_watermark=False)
    computed(blocks, first)
    second = seq("second", prompt, **params)
    blocks.admit(second, keep_watermark=False)
    return second


def test_a_sequence_reuses_the_full_blocks_another_computed_and_computes_only_the_rest():
    blocks = BlockManager(20, BS, watermark=0.0)
    shared = list(range(100, 140))  # two full blocks and 8 tokens
    first = seq("a", shared + [1, 2, 3])
    assert blocks.admit(first, keep_watermark=False)
    assert first.num_computed_tokens == 0 and blocks.prefix_queries == 43 and blocks.prefix_hits == 0
    computed(blocks, first)
    assert blocks.num_cached_blocks == 2  # the third block is not full

    second = seq("b", shared + [7, 8, 9, 10])
    assert blocks.admit(second, keep_watermark=False)
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] not in first.block_table
    assert second.num_computed_tokens == 32 and second.num_uncomputed == 12
    assert blocks.prefix_queries == 43 + 44 and blocks.prefix_hits == 32
    assert blocks.num_free_blocks == 20 - 3 - 1


def test_the_last_token_is_always_computed_so_its_logits_exist():
    blocks = BlockManager(20, BS, watermark=0.0)
    again = admitted_after_a_first(blocks, list(range(100, 132)))  # exactly two blocks
    assert again.num_computed_tokens == 16 and again.num_uncomputed == 16


def test_a_block_matches_only_after_the_same_blocks_before_it():
    blocks = BlockManager(20, BS, watermark=0.0)
    tail = list(range(200, 216))
    first = seq("a", list(range(100, 116)) + tail + [1])
    blocks.admit(first, keep_watermark=False)
    computed(blocks, first)
    other = seq("b", list(range(300, 316)) + tail + [1])  # same second block, different first
    blocks.admit(other, keep_watermark=False)
    assert other.num_computed_tokens == 0 and blocks.prefix_hits == 0


def test_shared_blocks_are_freed_when_their_last_holder_goes_and_stay_cached():
    blocks = BlockManager(10, BS, watermark=0.0)
    prompt = list(range(100, 133))
    a, b = seq("a", prompt), seq("b", prompt)
    blocks.admit(a, keep_watermark=False)
    computed(blocks, a)
    blocks.admit(b, keep_watermark=False)
    shared = a.block_table[:2]
    assert [blocks.refs(x) for x in shared] == [2, 2]
    blocks.free(a)
    assert [blocks.refs(x) for x in shared] == [1, 1] and blocks.num_free_blocks == 10 - 3
    blocks.free(b)
    assert blocks.num_free_blocks == 10 and blocks.num_cached_blocks == 2
    c = seq("c", prompt)
    blocks.admit(c, keep_watermark=False)
    assert c.block_table[:2] == shared and c.num_computed_tokens == 32


def test_eviction_takes_uncached_blocks_first_then_the_least_recently_freed_cached():
    blocks = BlockManager(6, BS, watermark=0.0)
    old, new = seq("old", list(range(100, 133))), seq("new", list(range(500, 533)))
    for s in (old, new):
        blocks.admit(s, keep_watermark=False)
        computed(blocks, s)
    blocks.free(old)
    blocks.free(new)
    assert blocks.num_cached_blocks == 4 and blocks.num_free_blocks == 6
    taker = seq("taker", list(range(900, 948)))  # three blocks: the 2 uncached, then old's second
    blocks.admit(taker, keep_watermark=False)
    assert blocks.num_cached_blocks == 3
    again_old, again_new = seq("o2", list(range(100, 133))), seq("n2", list(range(500, 533)))
    blocks.free(taker)
    blocks.admit(again_new, keep_watermark=False)
    blocks.admit(again_old, keep_watermark=False)
    assert again_new.num_computed_tokens == 32  # recently freed: still cached
    assert again_old.num_computed_tokens == 16  # its last block (freed first) was evicted


def test_a_new_prompt_takes_the_lowest_free_blocks_side_by_side():
    """Decode hands out blocks to running sequences in turn; once they are freed, the next
    prompt's table is still one run of blocks, not every other one."""
    blocks = BlockManager(16, BS, watermark=0.0, prefix_caching=False)
    a, b = seq("a", list(range(10))), seq("b", list(range(20, 30)))
    for s in (a, b):
        blocks.admit(s, keep_watermark=False)
    for tokens in (2 * BS, 3 * BS, 4 * BS):
        for s in (a, b):
            blocks.grow(s, tokens)
    assert a.block_table == [0, 2, 4, 6] and b.block_table == [1, 3, 5, 7]
    blocks.free(a)
    blocks.free(b)
    c = seq("c", list(range(4 * BS)))
    blocks.admit(c, keep_watermark=False)
    assert c.block_table == [0, 1, 2, 3] and blocks.num_free_blocks == 12


def test_admission_counts_the_free_cached_blocks_it_revives_against_the_free_ones():
    blocks = BlockManager(4, BS, watermark=0.0)
    prompt = list(range(100, 133))
    first = seq("a", prompt)
    blocks.admit(first, keep_watermark=False)
    computed(blocks, first)
    blocks.free(first)
    filler = seq("f", list(range(700, 716)))
    blocks.admit(filler, keep_watermark=False)  # takes the uncached block
    assert blocks.num_free_blocks == 3
    # Reviving 2 cached blocks and one new for the last token: 3 of 3 free.
    assert blocks.admit(seq("b", prompt), keep_watermark=False)
    assert blocks.num_free_blocks == 0
    assert not blocks.admit(seq("c", prompt), keep_watermark=False)  # shares 2, needs 1 more: none left


def test_without_prefix_caching_nothing_is_reused_or_counted():
    blocks = BlockManager(20, BS, watermark=0.0, prefix_caching=False)
    second = admitted_after_a_first(blocks, list(range(100, 150)))
    assert second.num_computed_tokens == 0 and blocks.num_cached_blocks == 0
    assert blocks.prefix_queries == blocks.prefix_hits == 0


def test_a_request_for_prompt_logprobs_computes_its_whole_prompt():
    blocks = BlockManager(20, BS, watermark=0.0)
    scored = admitted_after_a_first(blocks, list(range(100, 150)), prompt_logprobs=1)
    assert scored.num_computed_tokens == 0


def test_random_admissions_growth_and_frees_keep_every_count_exact():
    """Reference counts always equal the tables holding each block, the free blocks are exactly
    the unheld ones, and after everything is freed every block is free."""
    rng = random.Random(7)
    blocks = BlockManager(40, BS, watermark=0.0)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randint(1, 60))] for _ in range(4)]
    live: list[Sequence] = []
    for step in range(600):
        action = rng.random()
        if action < 0.4:
            s = seq(f"s{step}", rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randint(1, 30))])
            if blocks.admit(s, keep_watermark=False):
                live.append(s)
        elif action < 0.75 and live:
            s = rng.choice(live)
            s.num_computed_tokens = rng.randint(s.num_computed_tokens, s.num_tokens)
            blocks.register_computed(s)
            if s.num_uncomputed == 0 and blocks.can_grow(s, s.num_tokens + 1):
                s.output_token_ids.append(rng.randrange(1000))
                blocks.grow(s, s.num_tokens)
        elif live:
            blocks.free(live.pop(rng.randrange(len(live))))
        held = Counter(b for s in live for b in s.block_table)
        assert all(blocks.refs(b) == held[b] for b in range(40))
        assert blocks.num_free_blocks == sum(1 for b in range(40) if held[b] == 0)
        assert all(len(s.block_table) * BS >= s.num_tokens for s in live)
    assert blocks.prefix_hits > 0
    for s in live:
        blocks.free(s)
    assert blocks.num_free_blocks == 40


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2-window"])
def test_greedy_outputs_with_cached_prefixes_match_transformers(tiny_models, kind):
    rng = random.Random(5)
    system = [rng.randrange(3, 49152) for _ in range(150)]
    prompts = [system + [rng.randrange(3, 49152) for _ in range(n)] for n in (1, 10, 42)] + [system[:32], system]
    reference = hf_greedy(tiny_models[kind], prompts, 16)
    llm = LLM(str(tiny_models[kind]), dtype="float32", token_budget=48, kv_cache_memory="64MiB")
    params = SamplingParams(max_tokens=16)
    first = llm.generate(prompts[0], params)  # fills the cache with the shared prefix
    rest = llm.generate(prompts[1:], params)
    assert [o.token_ids for o in first + rest] == reference
    blocks = llm.engine.blocks
    # Three later prompts found the system prompt's 9 full blocks; system[:32] only its first (its last token is computed).
    assert blocks.prefix_hits == 3 * 9 * BS + BS
    assert blocks.prefix_queries == sum(len(p) for p in prompts)
    assert blocks.num_free_blocks == blocks.num_blocks


def test_greedy_outputs_are_the_same_without_prefix_caching(tiny_models):
    rng = random.Random(6)
    system = [rng.randrange(3, 49152) for _ in range(100)]
    prompts = [system + [rng.randrange(3, 49152) for _ in range(n)] for n in (3, 30, 60)]
    outputs = {}
    for caching in (True, False):
        llm = LLM(str(tiny_models["llama"]), dtype="float32", token_budget=64, kv_cache_memory="64MiB",
                  prefix_caching=caching)
        outputs[caching] = [llm.generate(p, SamplingParams(max_tokens=20))[0].token_ids for p in prompts]
        assert (llm.engine.blocks.prefix_hits > 0) is caching
    assert outputs[True] == outputs[False]


def test_preemption_among_sequences_sharing_a_prefix_changes_no_output_and_leaks_nothing(tiny_models):
    rng = random.Random(8)
    system = [rng.randrange(3, 49152) for _ in range(200)]
    prompts = [system + [rng.randrange(3, 49152) for _ in range(rng.randint(1, 300))] for _ in range(16)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    folder = str(tiny_models["llama"])
    alone = LLM(folder, dtype="float32", kv_cache_memory="64MiB", prefix_caching=False)
    expected = [alone.generate(p, params)[0].token_ids for p in prompts]

    small = LLM(folder, dtype="float32", token_budget=128, kv_cache_memory=80 * 8192, max_model_len=1200)
    outputs = small.generate(prompts, params)
    engine = small.engine
    assert [o.token_ids for o in outputs] == expected
    assert engine.scheduler.num_preemptions > 0 and engine.blocks.prefix_hits > 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
