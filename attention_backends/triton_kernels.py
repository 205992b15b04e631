"""Triton kernels for paged attention and their launchers.

Three steps per layer call: `write_kv` stores the step's K/V in the paged cache through slot_mapping,
`prefill_attention` attends packed variable-length queries to their request's cache (or, without a cache, to
the step's own K/V), `decode_attention` attends one query token per request, split over the context
(flash-decoding) with a second kernel merging the partial softmaxes.

Shapes: T tokens, B requests, H query heads, Hkv kv heads (G = H // Hkv per kv head), D head dim;
cache [2, num_blocks, block_size, Hkv, D]. Position p of a request lives in cache slot
block_tables[b, p // block_size] * block_size + p % block_size; any block_size works (rows are gathered).

Numerics: softmax statistics and accumulators are float32; scores use exp2, so the softmax max `m` lives in
the log2 domain. Tiles are loaded in the input dtype and fed to tl.dot as COMPUTE_DTYPE: the input dtype on
GPU (fp32 accumulation), float32 for fp32 inputs and for bf16 under TRITON_INTERPRET=1 (the CPU interpreter
does bf16 arithmetic on raw bits).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Whether @triton.jit below built interpreted kernels: TRITON_INTERPRET is read when they are decorated.
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _tanh(x):
    # exp of a non-positive number never overflows; tl has no portable tanh (libdevice is CUDA-only).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr,  # [T, Hkv, D], any token/head strides, unit dim stride
    cache_ptr,  # [2, num_blocks, block_size, Hkv, D] contiguous
    slot_mapping_ptr,  # [T] int64, -1 = skip
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_kv,  # elements between the K and the V half
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK)  # flattened (head, dim) of one token
    head, dim = offs // HEAD_DIM, offs % HEAD_DIM
    mask = offs < NUM_KV_HEADS * HEAD_DIM
    k = tl.load(key_ptr + token * stride_kt + head * stride_kh + dim, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + head * stride_vh + dim, mask=mask)
    dst = cache_ptr + slot * (NUM_KV_HEADS * HEAD_DIM) + offs  # slot is int64: no overflow on big caches
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_cache_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kv_rows(block_table_ptr, kv_pos, kv_valid, token0, PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Row index (cache slot, or packed token) of each key position in a tile: [BLOCK_N] int64."""
    if PAGED:
        block = tl.load(block_table_ptr + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0).to(tl.int64)
        return block * BLOCK_SIZE + kv_pos % BLOCK_SIZE
    else:
        return (token0 + kv_pos).to(tl.int64)


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc,  # q [M, BLOCK_D] COMPUTE_DTYPE; m_i, l_i [M]; acc [M, BLOCK_D] float32
    k_ptr, v_ptr, rows, kv_valid, visible, dim, dim_valid,
    stride_kr, stride_vr, scale, softcap,
    USE_SOFTCAP: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over a key tile. `visible` [M, N] masks scores; `kv_valid` [N] masks loads
    (keys past the context may be another request's data or uninitialised memory: never read them)."""
    k = tl.load(k_ptr + rows[None, :] * stride_kr + dim[:, None], mask=kv_valid[None, :] & dim_valid[:, None],
                other=0.0).to(COMPUTE_DTYPE)  # [BLOCK_D, N]
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale  # [M, N] float32
    if USE_SOFTCAP:
        s = softcap * _tanh(s / softcap)
    s = tl.where(visible, s * 1.4426950408889634, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at 0
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    v = tl.load(v_ptr + rows[:, None] * stride_vr + dim[None, :], mask=kv_valid[:, None] & dim_valid[None, :],
                other=0.0).to(COMPUTE_DTYPE)  # [N, BLOCK_D]
    acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE_DTYPE), v, input_precision=DOT_PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,  # q/out [T, H, D]; k/v: cache halves (PAGED) or the step's [T, Hkv, D]
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kr, stride_kh, stride_vr, stride_vh,  # per row (slot or token) and per kv head
    stride_bt, scale, softcap, sliding_window,
    sinks_ptr,  # [H] float32 attention-sink logits (read only when USE_SINKS)
    NUM_QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    PAGED: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    SKIP_DECODES: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_SINKS: tl.constexpr = False,
):
    # grid (B, cdiv(max_query_len, BLOCK_M), H): BLOCK_M query tokens of one head of one request.
    req, tile, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    if SKIP_DECODES and q_len == 1:  # the decode kernel owns these
        return
    seq_len = tl.load(seq_lens_ptr + req)
    num_cached = seq_len - q_len  # query i sits at position num_cached + i
    kv_head = head // NUM_QUERIES_PER_KV
    q_idx = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    q_pos = num_cached + q_idx
    dim = tl.arange(0, BLOCK_D)
    dim_valid = dim < HEAD_DIM
    q_valid = q_idx < q_len
    q = tl.load(q_ptr + (q_start + q_idx)[:, None] * stride_qt + head * stride_qh + dim[None, :],
                mask=q_valid[:, None] & dim_valid[None, :], other=0.0).to(COMPUTE_DTYPE)

    # Key range this tile can see: causal stops at its last query, a window starts below its first (and, for
    # non-causal layers, stops past its last).
    last_q_pos = num_cached + tl.minimum((tile + 1) * BLOCK_M, q_len) - 1
    kv_end = seq_len
    if IS_CAUSAL:
        kv_end = last_q_pos + 1
    elif USE_WINDOW:
        kv_end = tl.minimum(seq_len, last_q_pos + sliding_window)
    kv_begin = 0
    if USE_WINDOW:
        kv_begin = tl.maximum(0, num_cached + tile * BLOCK_M - sliding_window + 1) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if USE_SINKS:  # the sink is one more score with no value: start the online softmax from it (log2 domain)
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(sinks_ptr + head) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + req * stride_bt
    for kv_start in range(kv_begin, kv_end, BLOCK_N):
        kv_pos = kv_start + tl.arange(0, BLOCK_N)
        kv_valid = kv_pos < seq_len
        visible = kv_valid[None, :] & q_valid[:, None]
        if IS_CAUSAL:
            visible = visible & (kv_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (kv_pos[None, :] > q_pos[:, None] - sliding_window)
            if not IS_CAUSAL:  # encoders' local attention looks both ways: |p - k| < window
                visible = visible & (kv_pos[None, :] < q_pos[:, None] + sliding_window)
        rows = _kv_rows(table, kv_pos, kv_valid, q_start, PAGED, BLOCK_SIZE)
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_ptr + kv_head * stride_kh, v_ptr + kv_head * stride_vh, rows, kv_valid, visible,
            dim, dim_valid, stride_kr, stride_vr, scale, softcap, USE_SOFTCAP, COMPUTE_DTYPE, DOT_PRECISION,
        )
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (q_start + q_idx)[:, None] * stride_ot + head * stride_oh + dim[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_valid[:, None] & dim_valid[None, :])


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,  # q/out [T, H, D]; cache halves [num_blocks, block_size, Hkv, D]
    part_out_ptr, part_max_ptr, part_sum_ptr,  # [B, H, NUM_SPLITS, D], [B, H, NUM_SPLITS] float32
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kr, stride_kh, stride_vr, stride_vh,
    stride_bt, scale, softcap, sliding_window,
    sinks_ptr,  # [H] float32 attention-sink logits (read only when USE_SINKS)
    NUM_HEADS: tl.constexpr, NUM_QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_SINKS: tl.constexpr = False,
):
    # grid (B, Hkv, NUM_SPLITS): the G query heads sharing one kv head (read once for all of them), over one
    # contiguous share of the context's key tiles.
    req, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + req)
    if tl.load(query_start_loc_ptr + req + 1) - q_start != 1:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    q_pos = seq_len - 1  # every cached key is at or before the query: causal or not, the same keys are visible
    kv_begin = 0
    if USE_WINDOW:
        kv_begin = tl.maximum(0, seq_len - sliding_window) // BLOCK_N * BLOCK_N
    num_tiles = tl.cdiv(seq_len - kv_begin, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    split_begin = kv_begin + split * tiles_per_split * BLOCK_N
    split_end = tl.minimum(seq_len, split_begin + tiles_per_split * BLOCK_N)

    group = tl.arange(0, BLOCK_G)  # padded to >= 16 rows for tl.dot
    heads = kv_head * NUM_QUERIES_PER_KV + group
    head_valid = group < NUM_QUERIES_PER_KV
    dim = tl.arange(0, BLOCK_D)
    dim_valid = dim < HEAD_DIM
    q = tl.load(q_ptr + q_start * stride_qt + heads[:, None] * stride_qh + dim[None, :],
                mask=head_valid[:, None] & dim_valid[None, :], other=0.0).to(COMPUTE_DTYPE)  # [BLOCK_G, BLOCK_D]
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    if USE_SINKS:
        if split == 0:  # the sink joins the softmax once: split 0 carries it into the merge
            sink = tl.load(sinks_ptr + heads, mask=head_valid, other=0.0) * 1.4426950408889634
            m_i = tl.where(head_valid, sink, m_i)
            l_i = tl.where(head_valid, 1.0, l_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + req * stride_bt
    for kv_start in range(split_begin, split_end, BLOCK_N):
        kv_pos = kv_start + tl.arange(0, BLOCK_N)
        kv_valid = kv_pos < seq_len
        visible = kv_valid[None, :] & head_valid[:, None]
        if USE_WINDOW:
            visible = visible & (kv_pos[None, :] > q_pos - sliding_window)
        rows = _kv_rows(table, kv_pos, kv_valid, 0, True, BLOCK_SIZE)
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_cache_ptr + kv_head * stride_kh, v_cache_ptr + kv_head * stride_vh, rows, kv_valid,
            visible, dim, dim_valid, stride_kr, stride_vr, scale, softcap, USE_SOFTCAP, COMPUTE_DTYPE,
            DOT_PRECISION,
        )
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # an empty split stores zeros and l = 0
    mask = head_valid[:, None] & dim_valid[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + q_start * stride_ot + heads[:, None] * stride_oh + dim[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        part = (req * NUM_HEADS + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dim[None, :], out, mask=mask)
        tl.store(part_max_ptr + part, m_i, mask=head_valid)
        tl.store(part_sum_ptr + part, l_i, mask=head_valid)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr, query_start_loc_ptr,
    stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    # grid (B, H): merge the splits' normalised partial outputs, weighting each by its softmax mass.
    req, head = tl.program_id(0), tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + req)
    if tl.load(query_start_loc_ptr + req + 1) - q_start != 1:
        return
    split = tl.arange(0, NUM_SPLITS)
    part = (req * NUM_HEADS + head) * NUM_SPLITS + split
    m = tl.load(part_max_ptr + part)  # log2 domain; -inf for an empty split
    l = tl.load(part_sum_ptr + part)
    weight = tl.exp2(m - tl.max(m, 0)) * l  # the context is never empty, so max(m) is finite
    dim = tl.arange(0, BLOCK_D)
    dim_valid = dim < HEAD_DIM
    partial = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + dim[None, :], mask=dim_valid[None, :], other=0.0)
    out = tl.sum(partial * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + q_start * stride_ot + head * stride_oh + dim, out.to(out_ptr.dtype.element_ty),
             mask=dim_valid)


# ---------------------------------------------------------------------------------------------------------------
# Launchers. Tensors on the CPU can only mean TRITON_INTERPRET=1 (the test-only interpreter).

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
MAX_DECODE_SPLITS = 64


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> tuple[tl.dtype, str]:
    """(dtype fed to tl.dot, its input precision). fp32 stays exact ("ieee", not tf32)."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and device.type == "cpu"):
        return tl.float32, "ieee"
    return _TL_DTYPES[dtype], "tf32"  # precision is ignored for 16-bit operands


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dim >= 16; 80 and 96 pad to 128


def _launch_opts(device: torch.device, head_dim: int) -> tuple[int, int, dict[str, int]]:
    """(BLOCK_M, BLOCK_N, launch options). The interpreter costs ~1 ms per program: small tiles, few wasted."""
    if device.type == "cpu":
        return 16, 16, {}
    if head_dim <= 128:
        return 64, 64, {"num_warps": 4, "num_stages": 2}
    return 64, 32, {"num_warps": 4, "num_stages": 2}  # head 256: keep q/k/v tiles within shared memory


def _layer_args(layer) -> tuple[float, float, int, bool, bool]:
    """(scale, softcap, sliding_window, USE_SOFTCAP, USE_WINDOW) from LayerOptions."""
    use_softcap = bool(layer.softcap)
    use_window = layer.sliding_window is not None and layer.sliding_window > 0
    return (float(layer.scaling), float(layer.softcap or 0.0), int(layer.sliding_window or 0), use_softcap,
            use_window)


def _sinks(layer, query: torch.Tensor) -> torch.Tensor:
    """[H] float32 sink logits, or any tensor as an unread placeholder."""
    if layer.sinks is None:
        return query
    return layer.sinks.detach().to(device=query.device, dtype=torch.float32).contiguous()


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv_cache [2, N, bs, Hkv, D] contiguous; key/value [T, Hkv, D]; slot_mapping [T] int64 (-1 = skip)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert kv_cache.is_contiguous() and key.stride(-1) == 1 and value.stride(-1) == 1
    assert kv_cache.shape[-2:] == (num_kv_heads, head_dim), (kv_cache.shape, key.shape)
    _write_kv_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK=triton.next_power_of_2(num_kv_heads * head_dim),
    )


def prefill_attention(
    query: torch.Tensor,  # [T, H, D]
    key: torch.Tensor,  # paged: kv_cache[0] [N, bs, Hkv, D]; else the step's keys [T, Hkv, D]
    value: torch.Tensor,  # like key
    out: torch.Tensor,  # [T, H, D], written for every token of every request it handles
    metadata,  # AttentionMetadata
    layer,  # LayerOptions
    *,
    paged: bool,
    skip_decodes: bool = False,  # leave one-token requests to decode_attention
) -> None:
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = key.shape[-2]
    block_m, block_n, opts = _launch_opts(query.device, head_dim)
    compute_dtype, precision = _compute_dtype(query.dtype, query.device)
    scale, softcap, window, use_softcap, use_window = _layer_args(layer)
    # paged rows are cache slots ([N, bs] flattened: needs contiguous blocks); unpaged rows are the step's tokens
    row_dim = 1 if paged else 0
    if paged:
        assert key.stride(0) == key.shape[1] * key.stride(1) and value.stride(0) == value.shape[1] * value.stride(1)
    grid = (metadata.num_requests, triton.cdiv(metadata.max_query_len, block_m), num_heads)
    _prefill_kernel[grid](
        query, key, value, out, metadata.query_start_loc, metadata.seq_lens, metadata.block_tables,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key.stride(row_dim), key.stride(-2), value.stride(row_dim), value.stride(-2),
        metadata.block_tables.stride(0), scale, softcap, window, _sinks(layer, query),
        NUM_QUERIES_PER_KV=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=key.shape[1] if paged else 1,
        PAGED=paged, IS_CAUSAL=layer.is_causal, USE_WINDOW=use_window, USE_SOFTCAP=use_softcap,
        SKIP_DECODES=skip_decodes, COMPUTE_DTYPE=compute_dtype, DOT_PRECISION=precision,
        USE_SINKS=layer.sinks is not None, **opts,
    )


def decode_num_splits(num_requests: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Context splits per decode request: enough programs for ~2 waves over the GPU's SMs, each split at least
    4 key tiles long. A power of two (it is a constexpr: few compiled variants)."""
    if device.type != "cuda":
        return 1
    _, block_n, _ = _launch_opts(device, 128)
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(2 * num_sms, max(1, num_requests * num_kv_heads))
    useful = triton.cdiv(max_seq_len, 4 * block_n)
    splits = max(1, min(wanted, useful, MAX_DECODE_SPLITS))
    return 1 << (splits.bit_length() - 1)


def decode_attention(
    query: torch.Tensor,  # [T, H, D]; only the one-token requests are read
    kv_cache: torch.Tensor,  # [2, N, bs, Hkv, D], this step's K/V already written
    out: torch.Tensor,  # [T, H, D]
    metadata,  # AttentionMetadata
    layer,  # LayerOptions
    num_splits: int,  # power of two; 1 writes `out` directly, more go through the reduce kernel
) -> None:
    assert num_splits >= 1 and num_splits & (num_splits - 1) == 0, num_splits
    num_heads, head_dim = query.shape[1:]
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    group = num_heads // num_kv_heads
    _, block_n, opts = _launch_opts(query.device, head_dim)
    compute_dtype, precision = _compute_dtype(query.dtype, query.device)
    scale, softcap, window, use_softcap, use_window = _layer_args(layer)
    num_requests = metadata.num_requests
    if num_splits > 1:
        part_out = torch.empty((num_requests, num_heads, num_splits, head_dim), dtype=torch.float32,
                               device=query.device)
        part_max = torch.empty((num_requests, num_heads, num_splits), dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_out = part_max = part_sum = out  # unused
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _decode_kernel[(num_requests, num_kv_heads, num_splits)](
        query, k_cache, v_cache, out, part_out, part_max, part_sum,
        metadata.query_start_loc, metadata.seq_lens, metadata.block_tables,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        metadata.block_tables.stride(0), scale, softcap, window, _sinks(layer, query),
        NUM_HEADS=num_heads, NUM_QUERIES_PER_KV=group, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_SIZE=block_size,
        NUM_SPLITS=num_splits, USE_WINDOW=use_window, USE_SOFTCAP=use_softcap, COMPUTE_DTYPE=compute_dtype,
        DOT_PRECISION=precision, USE_SINKS=layer.sinks is not None, **opts,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_requests, num_heads)](
            out, part_out, part_max, part_sum, metadata.query_start_loc, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), NUM_SPLITS=num_splits,
        )
