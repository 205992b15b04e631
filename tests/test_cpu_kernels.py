"""The C decode-attention kernels (cpu_kernels.py) against attention written from its definition in float64:
softmax(q . k / sqrt(d)) . v over each request's context, read through a shuffled block table."""
from __future__ import annotations

import pytest
import torch

from hfbridge.attention_backends import cpu_kernels
from hfbridge.attention_backends.metadata import LayerOptions
from hfbridge.attention_backends.paged_decode import paged_decode_attention
from hfbridge.attention_backends.torch_backend import padded_slots
from hfbridge.native_build import load_library


def reference(query, kv_cache, block_tables, seq_lens, scaling):
    """float64, one request and one query head at a time: out[b, h] = sum_t softmax_t(q.k_t * scaling) v_t."""
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = query.shape[1] // num_kv_heads
    out = torch.empty(query.shape, dtype=torch.float64)
    for b, length in enumerate(seq_lens.tolist()):
        slots = [int(block_tables[b, t // block_size]) * block_size + t % block_size for t in range(length)]
        keys = kv_cache[0].reshape(-1, num_kv_heads, query.shape[2])[slots].double()  # [L, Hkv, D]
        values = kv_cache[1].reshape(-1, num_kv_heads, query.shape[2])[slots].double()
        for h in range(query.shape[1]):
            weights = torch.softmax(keys[:, h // group] @ query[b, h].double() * scaling, dim=0)
            out[b, h] = weights @ values[:, h // group]
    return out


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size, seq_lens", [
    (9, 3, 64, 16, [1, 5, 16, 17, 40, 200]),  # SmolLM2's heads; short, block-sized and long contexts
    (4, 4, 128, 13, [2, 29, 64]),  # no grouping, a block size that is no power of two
    (8, 2, 80, 32, [33]),
    (2, 1, 64, 16, [300, 7, 1]),
])
def test_matches_definition(num_heads, num_kv_heads, head_dim, block_size, seq_lens):
    g = torch.Generator().manual_seed(0)
    if not cpu_kernels.available(torch.device("cpu"), torch.float32, head_dim):
        pytest.fail(f"kernels for head size {head_dim} did not build")
    width = max(-(-n // block_size) for n in seq_lens) + 1  # one spare column, as tables of longer requests have
    num_blocks = len(seq_lens) * width + 3
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    block_tables = torch.randperm(num_blocks, generator=g)[: len(seq_lens) * width].view(len(seq_lens), width)
    block_tables = block_tables.to(torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=g)
    scaling = head_dim**-0.5
    got = cpu_kernels.paged_decode_cpu(query, kv_cache, block_tables, lens, scaling)
    torch.testing.assert_close(got.double(), reference(query, kv_cache, block_tables, lens, scaling),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vector_bytes", [16, 32, 64])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, seq_lens", [(9, 3, 64, [1, 5, 16, 17, 40, 200]),
                                                                         (4, 4, 128, [2, 29, 64])])
def test_every_vector_width_matches_definition(vector_bytes, num_heads, num_kv_heads, head_dim, seq_lens,
                                               cache_dtype):
    """The kernels as built for 4-, 8- and 16-float vectors (SSE / NEON, AVX2, AVX-512), whatever this machine's
    own width is: keys come in groups of 4, 8 or 16 and their dot products are reduced together (simd.h). A
    bfloat16 cache is widened exactly as it is read: the float32 tolerance holds against its values."""
    g = torch.Generator().manual_seed(vector_bytes)
    lib = cpu_kernels._library(head_dim, vector_bytes, cache_dtype)
    assert lib is not None, f"paged_decode_cpu.c did not build for {vector_bytes}-byte vectors"
    width, block_size = max(-(-n // 16) for n in seq_lens), 16
    num_blocks = len(seq_lens) * width + 2
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(cache_dtype)
    block_tables = torch.randperm(num_blocks, generator=g)[: len(seq_lens) * width].view(len(seq_lens), width)
    block_tables, lens = block_tables.to(torch.int32), torch.tensor(seq_lens, dtype=torch.int32)
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=g)
    got = cpu_kernels.run_paged_decode(lib, query, kv_cache, block_tables, lens, 0.125)
    torch.testing.assert_close(got.double(), reference(query, kv_cache, block_tables, lens, 0.125),
                               rtol=1e-5, atol=1e-5)


def test_torch_formulation_matches_definition():
    """paged_decode.py's formulation, which Inductor compiles where the kernels do not serve (run eagerly here)."""
    g = torch.Generator().manual_seed(3)
    kv_cache = torch.randn(2, 30, 13, 3, 32, generator=g)
    block_tables = torch.randperm(30, generator=g)[:24].view(4, 6).to(torch.int32)
    lens = torch.tensor([70, 1, 14, 40], dtype=torch.int32)
    query = torch.randn(4, 6, 32, generator=g)
    slots = padded_slots(block_tables, lens.long(), 70, 13).view(4, 70)
    got = paged_decode_attention(query, kv_cache, slots, lens.long(), 0.2, num_heads=6, num_kv_heads=3, head_dim=32)
    torch.testing.assert_close(got.double(), reference(query, kv_cache, block_tables, lens, 0.2),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["rising", "falling"])
def test_scores_far_apart_across_the_context(order):
    """Scores that rise (or fall) by tens along the context (about 60 over the longest request: e^-60 between its
    first and last terms): the kernel's running softmax rescales what it summed under an earlier, smaller maximum
    (rising) or adds terms that underflow (falling); the definition, in float64, takes the maximum over the whole
    context first."""
    g = torch.Generator().manual_seed(4)
    lens = torch.tensor([200, 37, 16], dtype=torch.int32)
    kv_cache = torch.randn(2, 40, 16, 3, 64, generator=g)
    ramp = torch.linspace(0.0, 40.0, 40 * 16).view(40, 16, 1, 1)  # key size grows with the physical slot
    kv_cache[0] *= ramp if order == "rising" else ramp.flip(0, 1)
    block_tables = torch.arange(39, dtype=torch.int32).view(3, 13)  # blocks in slot order: the ramp holds
    query = torch.randn(3, 9, 64, generator=g)
    got = cpu_kernels.paged_decode_cpu(query, kv_cache, block_tables, lens, 0.125)
    want = reference(query, kv_cache, block_tables, lens, 0.125)
    assert want.abs().max() > 0.5  # a few keys dominate: no output is an average of everything
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_compiled_call_matches_eager():
    """Inside torch.compile (fullgraph, as the decode graph calls it) the op runs the same kernels."""
    g = torch.Generator().manual_seed(2)
    kv_cache = torch.randn(2, 12, 16, 3, 64, generator=g)
    block_tables = torch.randperm(12, generator=g)[:12].view(3, 4).to(torch.int32)
    lens = torch.tensor([60, 17, 33], dtype=torch.int32)
    query = torch.randn(3, 9, 64, generator=g)

    def step(q):
        return cpu_kernels.paged_decode_cpu(q * 2, kv_cache, block_tables, lens, 0.125) + 1

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(query), reference(query * 2, kv_cache, block_tables, lens, 0.125).float() + 1,
                               rtol=1e-5, atol=1e-5)


def test_which_layers_it_serves():
    cache = torch.zeros(2, 1, 16, 1, 64)
    plain = LayerOptions(layer_idx=0, scaling=0.125)
    assert cpu_kernels.serves(plain, torch.zeros(1, 1, 64), cache)
    assert not cpu_kernels.serves(LayerOptions(layer_idx=0, scaling=0.125, sliding_window=8), cache[0, 0], cache)
    assert not cpu_kernels.serves(LayerOptions(layer_idx=0, scaling=0.125, softcap=30.0), cache[0, 0], cache)
    assert cpu_kernels.serves(plain, torch.zeros(1, 1, 64, dtype=torch.bfloat16), cache.bfloat16())
    assert not cpu_kernels.serves(plain, torch.zeros(1, 1, 64, dtype=torch.float16), cache.half())
    assert not cpu_kernels.serves(plain, torch.zeros(1, 1, 64), cache.bfloat16())  # one dtype for both
    assert not cpu_kernels.serves(plain, torch.zeros(1, 1, 72), torch.zeros(2, 1, 16, 1, 72))  # not 16k


def test_no_compiler_leaves_torch_paths(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HFBRIDGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    cpu_kernels._library.cache_clear()
    load_library.cache_clear()
    try:
        assert not cpu_kernels.available(torch.device("cpu"), torch.float32, 64)
        assert "Could not build the C kernels of paged_decode_cpu.c" in caplog.text
    finally:
        cpu_kernels._library.cache_clear()
        load_library.cache_clear()


def test_write_kv_matches_index_copy():
    """New K/V rows land where torch's index_copy_ puts them; -1 skips a token; K and V may be views into a fused
    qkv output (strided token rows)."""
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(5, 6 * 32 + 2 * 2 * 32, generator=g)
    key = qkv[:, 6 * 32: 8 * 32].view(5, 2, 32)
    value = qkv[:, 8 * 32:].view(5, 2, 32)
    slots = torch.tensor([7, -1, 0, 29, 12])
    cache = torch.randn(2, 3, 10, 2, 32, generator=g)
    expected = cache.clone()
    keep = slots >= 0
    expected[0].view(-1, 2, 32).index_copy_(0, slots[keep], key[keep])
    expected[1].view(-1, 2, 32).index_copy_(0, slots[keep], value[keep])
    assert cpu_kernels.write_kv_cpu(cache, key, value, slots)
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)


def test_bfloat16_model_path_rounds_once():
    """A bfloat16 query over a bfloat16 cache (a bfloat16 model's decode step): the float32 result of the widened
    values, rounded to bfloat16 once."""
    g = torch.Generator().manual_seed(6)
    kv_cache = torch.randn(2, 20, 16, 3, 64, generator=g).bfloat16()
    block_tables = torch.randperm(20, generator=g)[:18].view(3, 6).to(torch.int32)
    lens = torch.tensor([90, 1, 33], dtype=torch.int32)
    query = torch.randn(3, 9, 64, generator=g).bfloat16()
    got = cpu_kernels.paged_decode_cpu(query, kv_cache, block_tables, lens, 0.125)
    assert got.dtype == torch.bfloat16
    want = reference(query, kv_cache, block_tables, lens, 0.125)
    torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-5)


def test_write_kv_bfloat16_rows_land_where_index_copy_puts_them():
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(4, 4 * 32 + 2 * 2 * 32, generator=g).bfloat16()
    key, value = qkv[:, 128:192].view(4, 2, 32), qkv[:, 192:].view(4, 2, 32)
    slots = torch.tensor([5, -1, 0, 17])
    cache = torch.randn(2, 3, 8, 2, 32, generator=g).bfloat16()
    expected = cache.clone()
    keep = slots >= 0
    expected[0].view(-1, 2, 32).index_copy_(0, slots[keep], key[keep])
    expected[1].view(-1, 2, 32).index_copy_(0, slots[keep], value[keep])
    assert cpu_kernels.write_kv_cpu(cache, key, value, slots)
    assert torch.equal(cache, expected)


def test_write_kv_refuses_a_slot_past_the_cache():
    cache = torch.zeros(2, 3, 10, 1, 16)
    rows = torch.ones(2, 1, 16)
    with pytest.raises(IndexError, match="slot 30 is out of range for a cache of 30 slots"):
        cpu_kernels.write_kv_cpu(cache, rows, rows, torch.tensor([3, 30]))
    assert cache.abs().sum() == 0  # nothing written


def test_a_second_openmp_runtime_is_named_once(caplog):
    """Read from the process's mapped libraries (/proc/self/maps lines, as the kernel writes them)."""
    from hfbridge import native_build

    gnu = "7f00-7f10 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0\n"
    llvm = "7f20-7f30 r-xp 00000000 08:01 2 /usr/lib/llvm-17/lib/libomp.so.5\n"
    assert native_build.openmp_runtimes(gnu + gnu) == {"GNU"}
    assert native_build.openmp_runtimes(gnu.replace("libgomp.so.1.0.0", "libgomp-a34b3233.so.1")) == {"GNU"}
    assert native_build.openmp_runtimes("7f-7f r-xp 0 0:0 0 /lib/libomptarget.so\n") == set()
    assert native_build.openmp_runtimes(gnu + llvm) == {"GNU", "LLVM"}
    assert not native_build.warn_if_two_openmp_runtimes(gnu)
    with caplog.at_level("WARNING", logger="hfbridge.native_build"):
        assert native_build.warn_if_two_openmp_runtimes(gnu + llvm)
        native_build.warn_if_two_openmp_runtimes(gnu + llvm)  # cached: said once
    assert sum("Two OpenMP runtimes" in r.message for r in caplog.records) == 1
    assert native_build.openmp_runtimes() == {"GNU"}  # this process: torch's libgomp, shared by the kernels
