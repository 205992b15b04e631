"""hfbridge/csrc/gguf_matmul.c through hfbridge.quantization.gguf_kernels against gguf-py: its numpy dequantizer is
the definition of each block format, x.double() @ W.T (float64) the definition of the matmul."""
import gguf
import numpy as np
import pytest
import torch

from hfbridge.quantization import gguf_kernels

Q = gguf.GGMLQuantizationType
TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# the float16 scale fields (d, dmin) of the K-quants' super-blocks, by byte offset; every other byte is free
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
N = 37  # odd: a short last group of output rows


def _k(qtype) -> int:
    """k odd in blocks: 7 blocks of 32, or 3 super-blocks of 256"""
    return 3 * 256 if qtype in K_SCALES else 7 * 32


def _blocks(qtype, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Valid rows of blocks, uint8 [n, row_bytes]: gguf-py quantizes random floats to the 32-element types; for the
    K-quants (which it cannot quantize) random bytes with sane float16 scales in [0.001, 0.05]."""
    rng = np.random.default_rng(seed)
    if qtype not in K_SCALES:
        return gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n * k // block, size), dtype=np.uint8)
    for offset in K_SCALES[qtype]:
        blocks[:, offset:offset + 2] = rng.uniform(0.001, 0.05, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(n, -1)


def _weights(qtype, n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(data uint8 [n, row_bytes], W float64 [n, k] as gguf-py dequantizes it)"""
    blocks = _blocks(qtype, n, _k(qtype), seed)
    return torch.from_numpy(blocks), torch.from_numpy(gguf.quants.dequantize(blocks, qtype)).double()


def _assert_matmul(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """got == x @ w^T within float32 summation error: every element is a float32 sum of k products (each rounded
    once, fused multiply-add) along at most k/4 + 2 sequential additions (lanes of 4 or more floats, then a halving
    tree), so |error| <= (k/4 + 3) u sum_k |x| |w| with u = 2^-24 (the standard bound, first order). A bfloat16
    result adds its one rounding: 2^-8 |value|."""
    x = x.double()
    ref, magnitude = x @ w.T, x.abs() @ w.abs().T
    bound = (x.shape[1] / 4 + 3) * 2.0 ** -24 * magnitude
    if got.dtype == torch.bfloat16:
        bound = bound + 2.0 ** -8 * ref.abs()
    excess = (got.double() - ref).abs() - bound
    assert excess.max() <= 0, f"off by {excess.max():.3g} beyond the bound"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_and_dequantize_match_gguf(qtype):
    """Every type: dequantize gives gguf-py's float32 values; quant_matmul at decode (1 row: the fused kernel; 7 rows:
    the tiled one), 64 and a 2048-token prefill, in float32 and bfloat16."""
    assert gguf_kernels._library() is not None, "gguf_matmul.c did not build: the kernels are what is under test"
    assert gguf_kernels._library().gguf_supported(int(qtype)) == 1
    data, w = _weights(qtype)
    k = w.shape[1]
    assert data.shape == (N, gguf_kernels.row_bytes(int(qtype), k))
    assert torch.equal(gguf_kernels.dequantize(data, int(qtype), k), w.float())
    assert torch.equal(gguf_kernels.dequantize(data[[5, 0, 36]], int(qtype), k), w.float()[[5, 0, 36]])
    torch.manual_seed(int(qtype))
    for m in (1, 7, 64, 2048):
        x = torch.randn(m, k)
        got = gguf_kernels.quant_matmul(x, data, int(qtype), N)
        assert got.shape == (m, N) and got.dtype == torch.float32
        _assert_matmul(got, x, w)
    x = torch.randn(9, k).bfloat16()
    got = gguf_kernels.quant_matmul(x, data, int(qtype), N)
    assert got.dtype == torch.bfloat16
    _assert_matmul(got, x, w)


@pytest.mark.parametrize("vector_bytes", [16, 32, 64])
def test_every_vector_width_matches_gguf(vector_bytes):
    """The kernels as built for 4-, 8- and 16-float vectors, whatever this machine's own width: every type, the
    fused and the tiled kernel, one slice and two."""
    lib = gguf_kernels._library(vector_bytes)
    assert lib is not None, "gguf_matmul.c did not build"
    torch.manual_seed(vector_bytes)
    for qtype in TYPES:
        data, w = _weights(qtype, n=21, seed=vector_bytes)
        k = w.shape[1]
        assert torch.equal(gguf_kernels.run_dequantize(lib, data, int(qtype), k), w.float())
        for m in (1, 4, 70):
            x = torch.randn(m, k)
            _assert_matmul(gguf_kernels.run_quant_matmul(lib, x, data, int(qtype), 21), x, w)


def test_the_portable_build_matches_gguf():
    """The build for compilers without _Float16 and without GCC 12's shuffles (-DHFBRIDGE_NO_FLOAT16
    -DHFBRIDGE_NO_BYTE_SHUFFLE): its bit-level float16 conversion against numpy's on all 63488 finite float16 values
    (as the scales of Q8_0 blocks whose quants are 1), and every type's values and products."""
    lib = gguf_kernels._library(None, ("-DHFBRIDGE_NO_FLOAT16", "-DHFBRIDGE_NO_BYTE_SHUFFLE"))
    assert lib is not None, "gguf_matmul.c did not build"
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    halves = halves[np.isfinite(halves)].reshape(-1, 32)
    blocks = np.ones((halves.size, 34), dtype=np.uint8)
    blocks[:, :2] = halves.reshape(-1, 1).view(np.uint8)
    data = torch.from_numpy(blocks.reshape(halves.shape[0], -1))
    got = gguf_kernels.run_dequantize(lib, data, int(Q.Q8_0), 32 * 32)
    expected = torch.from_numpy(halves.astype(np.float32)).repeat_interleave(32, dim=1)
    assert torch.equal(got, expected) and torch.equal(torch.signbit(got), torch.signbit(expected))  # -0 included
    torch.manual_seed(2)
    for qtype in TYPES:
        data, w = _weights(qtype, n=15, seed=2)
        assert torch.equal(gguf_kernels.run_dequantize(lib, data, int(qtype), w.shape[1]), w.float())
        for m in (1, 5):
            x = torch.randn(m, w.shape[1])
            _assert_matmul(gguf_kernels.run_quant_matmul(lib, x, data, int(qtype), 15), x, w)


def test_a_row_gets_the_same_bits_alone_or_in_any_batch():
    """Batch invariance: each output row of a 64-row and of a 2048-row call (the tiled kernel, one slice and 32)
    equals that row computed alone (the fused kernel), bit for bit, and so does every thread count."""
    for qtype in (Q.Q4_1, Q.Q6_K):
        data, w = _weights(qtype)
        torch.manual_seed(1)
        x = torch.randn(2048, w.shape[1])
        full = gguf_kernels.quant_matmul(x, data, int(qtype), N)
        some = gguf_kernels.quant_matmul(x[:64], data, int(qtype), N)
        assert torch.equal(some, full[:64])
        for i in (0, 5, 63, 1000, 2047):
            assert torch.equal(gguf_kernels.quant_matmul(x[i:i + 1], data, int(qtype), N), full[i:i + 1])
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(gguf_kernels.quant_matmul(x[:300], data, int(qtype), N), full[:300])
        finally:
            torch.set_num_threads(threads)


def test_a_fused_projection_in_one_call_matches_each_part():
    """A fused projection whose parts have their own types and odd sizes (a Q4_K_M file's q, k, v): one
    quant_matmul_parts call gives the definition's values, each part's columns with the bits of that part alone
    (the threads share out the parts' rows, which must not change a sum), at 1, 7 and 70 rows and in bfloat16. A
    part of a type with no kernel (BF16) takes the per-part path, the same values."""
    k = 2 * 256
    parts = [(Q.Q4_K, 37), (Q.Q6_K, 13), (Q.Q8_0, 29)]
    blocks = [_blocks(qtype, n, k, seed=i) for i, (qtype, n) in enumerate(parts)]
    datas = [torch.from_numpy(b) for b in blocks]
    w = torch.cat([torch.from_numpy(gguf.quants.dequantize(b, q)).double() for b, (q, _) in zip(blocks, parts)])
    qtypes, outs = [int(q) for q, _ in parts], [n for _, n in parts]
    torch.manual_seed(3)
    for m in (1, 7, 70):
        x = torch.randn(m, k)
        got = gguf_kernels.quant_matmul_parts(x, datas, qtypes, outs)
        assert got.shape == (m, sum(outs)) and got.dtype == torch.float32
        _assert_matmul(got, x, w)
        alone = torch.cat([gguf_kernels.quant_matmul(x, d, q, n) for d, q, n in zip(datas, qtypes, outs)], dim=-1)
        assert torch.equal(got, alone)
    x = torch.randn(5, k).bfloat16()
    got = gguf_kernels.quant_matmul_parts(x, datas, qtypes, outs)
    assert got.dtype == torch.bfloat16
    _assert_matmul(got, x, w)
    bf16 = gguf.quants.quantize(np.random.default_rng(4).standard_normal((11, k)).astype(np.float32), Q.BF16)
    values = torch.from_numpy(gguf.quants.dequantize(bf16, Q.BF16)).double()
    x = torch.randn(3, k)
    got = gguf_kernels.quant_matmul_parts(x, [datas[0], torch.from_numpy(bf16)], [qtypes[0], int(Q.BF16)], [37, 11])
    _assert_matmul(got, x, torch.cat([w[:37], values]))


def test_without_a_compiler_the_numpy_fallback_gives_the_same_values(monkeypatch):
    """No C compiler (the library loader returns None): gguf-py's dequantizer and F.linear, within the same bound
    of the definition as the kernels (the sums run in another order: the bits differ)."""
    data, w = _weights(Q.Q5_K)
    x = torch.randn(6, w.shape[1])
    monkeypatch.setattr(gguf_kernels, "_library", lambda *args: None)
    assert torch.equal(gguf_kernels.dequantize(data, int(Q.Q5_K), w.shape[1]), w.float())
    fallback = gguf_kernels.quant_matmul(x, data, int(Q.Q5_K), N)
    _assert_matmul(fallback, x, w)
    assert gguf_kernels.quant_matmul(x.bfloat16(), data, int(Q.Q5_K), N).dtype == torch.bfloat16
    assert not gguf_kernels.build_kernels()


def test_types_without_a_kernel_dequantize_through_gguf():
    """A type gguf-py reads but the kernels do not (BF16): dequantize and quant_matmul still answer."""
    values = torch.randn(3, 64).bfloat16()
    data = values.view(torch.uint8)
    assert torch.equal(gguf_kernels.dequantize(data, int(Q.BF16), 64), values.float())
    x = torch.randn(2, 64)
    torch.testing.assert_close(gguf_kernels.quant_matmul(x, data, int(Q.BF16), 3), x @ values.float().T)


def test_bad_inputs_raise_value_errors():
    data, w = _weights(Q.Q4_0)
    k, q4_0 = w.shape[1], int(Q.Q4_0)
    x = torch.randn(2, k)
    with pytest.raises(ValueError, match="k=100"):
        gguf_kernels.row_bytes(q4_0, 100)
    with pytest.raises(ValueError, match="qtype=99"):
        gguf_kernels.row_bytes(99, 256)
    bad_calls = [
        (x.half(), data, q4_0, N),  # x dtype
        (x[None], data, q4_0, N),  # x [1, 2, k]
        (x[:, :-32], data, q4_0, N),  # k does not match the rows' bytes
        (x[:, :100], data, q4_0, N),  # k not a multiple of 32
        (x, data[:, :-1], q4_0, N),  # row bytes
        (x, data, q4_0, N + 1),  # out_features
        (x, data.view(torch.int8), q4_0, N),  # data dtype
        (x, data, int(Q.Q4_1), N),  # another type's row size
        (x, data, 99, N),  # no such type
    ]
    for args in bad_calls:
        with pytest.raises(ValueError):
            gguf_kernels.quant_matmul(*args)
    with pytest.raises(ValueError):
        gguf_kernels.dequantize(data, q4_0, k + 32)


def test_compiled_graphs_keep_the_operator():
    """torch.compile traces the call as the hfbridge::gguf_matmul operator (its fake gives the shape)."""
    data, w = _weights(Q.Q8_0)
    x = torch.randn(3, w.shape[1])
    compiled = torch.compile(lambda x: gguf_kernels.quant_matmul(x, data, int(Q.Q8_0), N) * 2, backend="eager",
                             fullgraph=True)
    assert torch.equal(compiled(x), gguf_kernels.quant_matmul(x, data, int(Q.Q8_0), N) * 2)
