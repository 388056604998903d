"""The C++ CPU kernels against plain torch on the same inputs, shapes chosen to hit every tile
and tail (rows that do not fill a tile, outputs that do not fill a panel, contexts that end
mid-block, partitions merged across a long context, chunks whose queries do not fill a block or
whose keys do not fill a tile, sliding windows)."""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from sarathi_engine import kernels
from sarathi_engine.attention.torch_backend import attend_chunk, attend_decodes, gather, write
from sarathi_engine.model.ops import TorchOps

pytestmark = pytest.mark.skipif(kernels.unusable_reason() is not None,
                                reason=f"CPU kernels cannot run here: {kernels.unusable_reason()}")


@pytest.fixture(scope="module")
def ops():
    assert kernels.load() is None, kernels.load()
    return torch.ops.sarathi


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    scale = expected.abs().max().item() or 1.0
    assert (actual - expected).abs().max().item() <= rtol * scale, (actual - expected).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 576, 576), (2, 70, 34), (3, 130, 576), (4, 1000, 96), (5, 33, 64), (7, 16, 8),
                                   (13, 1000, 96), (64, 47, 130), (150, 40, 32), (130, 200, 64)])
def test_linear_matches_torch(ops, dtype, m, n, k):
    torch.manual_seed(m * n + k)
    x, w, bias = torch.randn(m, k), torch.randn(n, k).to(dtype), torch.randn(n)
    packed = ops.pack_linear_weight(w)
    # Where bfloat16 is native (AMX, AVX-512 BF16) a bfloat16 weight is packed for brgemm, and the
    # activations are rounded to bfloat16 before the product, as a bfloat16 matmul does; the rest
    # accumulates in float32.
    native = dtype == torch.bfloat16 and k % 2 == 0 and ops.native_bf16()
    assert packed.size(2) == (64 if native else 16)
    multiplied = x.bfloat16().float() if native else x
    close(ops.linear(x, packed, n, bias), F.linear(multiplied, w.float(), bias))
    close(ops.linear(x, packed, n, None), F.linear(multiplied, w.float()))


def linear_in_a_child(x: torch.Tensor, packed: torch.Tensor, n: int) -> list:
    return torch.ops.sarathi.linear(x, packed, n, None).tolist()  # a tensor would go back through shared memory


def test_parallel_loops_serve_a_forked_child_and_concurrent_callers(ops):
    """The kernels' helper threads: a forked child, which has none of its parent's threads, still
    finishes its loops; Python threads running loops at once all get the right answer."""
    torch.manual_seed(0)
    x, w = torch.randn(64, 256), torch.randn(1024, 256)
    packed = ops.pack_linear_weight(w)
    expected = F.linear(x, w)
    close(ops.linear(x, packed, 1024, None), expected)  # the parent's helpers have started
    with multiprocessing.get_context("fork").Pool(1) as pool:
        close(torch.tensor(pool.apply_async(linear_in_a_child, (x, packed, 1024)).get(timeout=120)), expected)
    with ThreadPoolExecutor(4) as threads:
        for result in threads.map(lambda _: ops.linear(x, packed, 1024, None), range(32)):
            close(result, expected)


def spins(ops, readings: list[tuple[float, float]]) -> list[int]:
    """The helpers' spin policy over (time, run-queue wait so far) readings in milliseconds."""
    return ops.helper_spins([int(t * 1e6) for t, _ in readings], [int(w * 1e6) for _, w in readings])


def test_a_helper_spins_between_loops_only_while_its_core_has_no_other_taker(ops):
    # Quiet: windows of 10 ms with no wait for the core, so it spins throughout.
    assert spins(ops, [(1, 0), (5, 0), (11, 0), (12, 0), (30, 0)]) == [1] * 5
    # A window spun waiting 3 ms of 10 for its core: it backs off (50 ms, to 61 ms)...
    busy = [(1, 0), (11, 3)]
    assert spins(ops, busy) == [1, 0]
    # ...and a later window without spinning in which it still waited 3 ms of 11 (the neighbour
    # stays) extends the backoff by the doubled 100 ms, to 126 ms: at 70 it sleeps, where it would
    # have spun to find out, and at 130 it spins again.
    assert spins(ops, busy + [(15, 3), (26, 6), (70, 6), (130, 6)]) == [1, 0, 0, 0, 0, 1]
    # Were the neighbour gone, a backed-off window with little wait (0.5 ms of 11) proves less: the
    # backoff runs out at 61 and a quiet window spun resets it to 50 ms, so the next busy window
    # backs off to 85 + 50 = 135, not 85 + 100.
    assert spins(ops, busy + [(15, 3), (26, 3.5), (60, 3.5), (62, 3.5), (73, 3.5), (74, 3.5), (85, 5.5),
                              (134, 5.5), (136, 5.5)]) == [1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_takes_an_input_already_in_bfloat16(ops, dtype):
    """As its float32 values: through brgemm, without rounding it again."""
    torch.manual_seed(0)
    x, w = torch.randn(70, 96).bfloat16(), torch.randn(130, 96).to(dtype)
    packed = ops.pack_linear_weight(w)
    assert torch.equal(ops.linear(x, packed, 130, None), ops.linear(x.float(), packed, 130, None))


def test_linear_rejects_a_mismatched_input(ops):
    packed = ops.pack_linear_weight(torch.randn(32, 16))
    with pytest.raises(RuntimeError, match="features"):
        ops.linear(torch.randn(2, 17), packed, 32, None)
    with pytest.raises(RuntimeError, match="panels"):
        ops.linear(torch.randn(2, 16), packed, 64, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_match_transformers_arithmetic(ops, dtype):
    torch.manual_seed(0)
    x, residual, weight = torch.randn(9, 100), torch.randn(9, 100), torch.randn(100).to(dtype)
    reference = TorchOps(torch.float32)
    close(ops.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight.float(), 1e-5))
    mine, theirs = residual.clone(), residual.clone()
    close(ops.add_rms_norm(mine, x, weight, 1e-5), reference.add_rms_norm(theirs, x, weight.float(), 1e-5))
    close(mine, theirs)


def test_silu_mul(ops):
    gate_up = torch.randn(5, 2 * 37) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    close(ops.silu_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("rows,n", [(1, 49152), (8, 49152), (3, 7), (2, 1), (5, 1003)])
def test_argmax_rows_matches_torch(ops, rows, n):
    torch.manual_seed(rows * n)
    x = torch.randn(rows, n)
    assert torch.equal(ops.argmax_rows(x), x.argmax(dim=-1))
    assert torch.equal(ops.argmax_rows(x.bfloat16()), x.bfloat16().argmax(dim=-1))


def test_argmax_rows_takes_the_first_maximum_and_a_nan_as_torch_does(ops):
    x = torch.zeros(4, 50)
    x[0, 17] = x[0, 30] = 5.0  # a tie within the vector passes
    x[1, 3] = x[1, 49] = float("nan")  # a NaN wins, the first one
    x[2] = -float("inf")
    x[3, 48] = x[3, 49] = 1.0  # a tie in the tail past the last whole vector
    assert ops.argmax_rows(x).tolist() == x.argmax(dim=-1).tolist() == [17, 3, 0, 48]
    with pytest.raises(RuntimeError, match="empty"):
        ops.argmax_rows(torch.zeros(2, 0))


def test_a_decoder_stack_rejects_a_batch_whose_parts_disagree(ops):
    stack = torch.classes.sarathi.DecoderStack(torch.ones(8, 16), torch.zeros(8, 16), 4, 2, 1e-6, 0.25)
    residual, positions, tables = torch.zeros(3, 64), torch.arange(3), torch.zeros(2, 1, dtype=torch.int32)
    lens = torch.tensor([2, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="4 tokens.* do not agree"):  # 3 rows, 2 + 2 new tokens
        stack.forward(residual, positions, [], torch.arange(3), tables, lens, [2, 2], 1)
    with pytest.raises(RuntimeError, match="caches for 0 layers"):
        stack.forward(residual, positions, [torch.zeros(1)] * 2, torch.arange(3), tables, lens, [2, 1], 1)


def test_rotary_in_place_on_strided_heads(ops):
    torch.manual_seed(1)
    heads, kv_heads, dim, tokens = 4, 2, 16, 6
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    angles = torch.randn(50, dim // 2)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    positions = torch.tensor([0, 3, 7, 8, 20, 49])
    expected_q, expected_k = TorchOps(torch.float32).rotary(positions, q.clone(), k.clone(), cos, sin)
    ops.rotary_(q, k, positions, cos, sin)
    close(q, expected_q)
    close(k, expected_k)


def paged_case(dtype, lens, kv_heads=2, dim=16, block_size=4, seed=0):
    """A cache of scattered blocks holding random keys and values for sequences of `lens` tokens."""
    g = torch.Generator().manual_seed(seed)
    widest = -(-max(lens) // block_size)
    blocks = torch.randperm(len(lens) * widest + 3, generator=g)[: len(lens) * widest].view(len(lens), widest)
    k_cache = torch.zeros(kv_heads, len(lens) * widest + 3, block_size, dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.cat([blocks[i, torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size
                       for i, n in enumerate(lens)])
    k = torch.randn(len(slots), kv_heads, dim, generator=g)
    v = torch.randn(len(slots), kv_heads, dim, generator=g)
    return k, v, k_cache, v_cache, slots, blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_index_copy(ops, dtype):
    k, v, k_cache, v_cache, slots, _ = paged_case(dtype, [5, 9])
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    write(k.to(dtype), expected_k, slots)
    write(v.to(dtype), expected_v, slots)
    ops.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,window", [([1, 7, 13], None), ([3000, 5], None), ([130, 64, 9], 20), ([1200], 1100)])
def test_decode_attention_reads_the_paged_cache_as_torch_does(ops, dtype, lens, window):
    heads, kv_heads, dim = 6, 2, 16
    k, v, k_cache, v_cache, slots, blocks = paged_case(dtype, lens, kv_heads, dim)
    ops.write_kv(k, v, k_cache, v_cache, slots)
    q = torch.randn(len(lens), heads, dim)
    context = torch.tensor(lens, dtype=torch.int32)
    expected = attend_decodes(q, k_cache.float(), v_cache.float(), blocks, context, 0.25, window)
    close(ops.paged_decode_attention(q, k_cache, v_cache, blocks, context, 0.25, window or 0), expected, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length,n,window", [(5, 5, None), (1, 1, None), (300, 300, None), (301, 37, None),
                                             (1000, 129, None), (700, 1, None), (1000, 50, 100), (300, 120, 37)])
@pytest.mark.parametrize("dim", [32, 48, 64])
def test_prefill_attention_reads_the_paged_cache_as_torch_does(ops, dtype, length, n, window, dim):
    """A chunk of n queries ending a context of `length` tokens, against SDPA over the gathered keys.
    Head dims that are multiples of 32 take the brgemm path where bfloat16 is native; 48 does not."""
    heads, kv_heads = 6, 2
    k, v, k_cache, v_cache, slots, blocks = paged_case(dtype, [length], kv_heads, dim)
    ops.write_kv(k, v, k_cache, v_cache, slots)
    q = torch.randn(n, heads, dim)
    keys, values = (gather(cache, blocks[0])[:, :length].float() for cache in (k_cache, v_cache))
    actual = ops.paged_prefill_attention(q, k_cache, v_cache, blocks[0], length, 0.25, window or 0)
    if dtype == torch.bfloat16 and dim % 32 == 0 and ops.native_bf16():
        # Through brgemm the queries and the probabilities are rounded to bfloat16 for the products.
        # With the queries rounded alike, what is left is each probability's rounding, at most 2^-9
        # of it, so the output moves by at most 2^-9 of the largest value.
        expected = attend_chunk(q.bfloat16().float(), keys, values, 0.25, window, {})
        bound = 2 ** -9 * values.abs().max().item() + 1e-5 * expected.abs().max().item()
        assert (actual - expected).abs().max().item() <= bound
    else:
        close(actual, attend_chunk(q, keys, values, 0.25, window, {}), 1e-5)


def test_prefill_attention_takes_strided_queries(ops):
    """q as the engine hands it over: a view of the fused qkv projection's output."""
    k, v, k_cache, v_cache, slots, blocks = paged_case(torch.float32, [40], 2, 16)
    ops.write_kv(k, v, k_cache, v_cache, slots)
    qkv = torch.randn(24, (4 + 2 + 2) * 16)
    q = qkv[:, : 4 * 16].view(24, 4, 16)
    expected = ops.paged_prefill_attention(q.contiguous(), k_cache, v_cache, blocks[0], 40, 0.25, 0)
    close(ops.paged_prefill_attention(q, k_cache, v_cache, blocks[0], 40, 0.25, 0), expected, 0)


def test_prefill_attention_rejects_a_table_short_of_its_context(ops):
    k, v, k_cache, v_cache, slots, blocks = paged_case(torch.float32, [8], 2, 16)
    with pytest.raises(RuntimeError, match="block table must cover"):
        ops.paged_prefill_attention(torch.randn(4, 4, 16), k_cache, v_cache, blocks[0][:1], 8, 0.25, 0)
