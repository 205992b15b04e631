"""Decode attention on CPU through the hand-written kernels of hfbridge/csrc/paged_decode_cpu.c, built on first use.
(The torch backend also sends it the prompt tokens of short contexts, one row per token: torch_backend.py.)

A decode step reads every cached K and V row of every request once per layer (64 requests x 200 tokens of
SmolLM2-135M: 20 MB per layer), so its time is memory traffic. Eager torch copies the rows out first (gather +
SDPA), and Inductor's loops over paged_decode.py's formulation re-read them; the C kernel reads each row once,
whole, in one pass per request, and prefetches along the block table (per-layer figures:
docs/kernel-measurements.md).

The library is built once per head size (a constant of the inner loops) by hfbridge/native_build.py (the system C
compiler, a cache of builds, ctypes). With no C compiler, or one that fails, `available` says False and the torch
paths serve.

Float32 or bfloat16 query and cache (one dtype), head sizes that are multiples of 16; plain causal attention (no
window, softcap, sinks): `serves` says whether a layer qualifies."""
from __future__ import annotations

import ctypes
import functools

import torch

from hfbridge.attention_backends.metadata import LayerOptions
from hfbridge.compilation import graph_op
from hfbridge.native_build import declare, load_library

_I64, _F32, _PTR, _INT = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
CACHE_DTYPES = (torch.float32, torch.bfloat16)  # the caches the kernels read (bfloat16 widened as it is read)
_ATTENTION_ARGS = [_PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64, _F32, _INT]
_WRITE_ARGS = [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64]


def serves(layer: LayerOptions, query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether paged_decode_cpu computes this layer's decode attention."""
    return (query.dtype == kv_cache.dtype and layer.plain_causal
            and available(kv_cache.device, kv_cache.dtype, kv_cache.shape[-1]))


def available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernels run for a cache of this device, dtype and head size (built on the first ask)."""
    return (device.type == "cpu" and dtype in CACHE_DTYPES and head_dim % 16 == 0
            and _library(head_dim, dtype=dtype) is not None)


def _paged_decode_cpu(
    query: torch.Tensor,  # [B, H, D] of the cache's dtype, one token per request
    kv_cache: torch.Tensor,  # [2, N, bs, Hkv, D] float32 or bfloat16, contiguous
    block_tables: torch.Tensor,  # [B, W] int32
    seq_lens: torch.Tensor,  # [B] int32, context lengths (>= 1) with the new token
    scaling: float,
) -> torch.Tensor:  # [B, H, D] of the query's dtype
    assert kv_cache.is_contiguous() and block_tables.dtype == seq_lens.dtype == torch.int32
    lib = _library(query.shape[-1], dtype=kv_cache.dtype)
    return run_paged_decode(lib, query, kv_cache, block_tables, seq_lens, scaling)


# An operator inside torch.compile graphs, a plain call in eager code (graph_op)
paged_decode_cpu = graph_op(
    "hfbridge::paged_decode_cpu",
    "(Tensor query, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, float scaling) -> Tensor",
    _paged_decode_cpu, lambda query, kv_cache, block_tables, seq_lens, scaling: torch.empty_like(query))


def run_paged_decode(lib: ctypes.CDLL, query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scaling: float) -> torch.Tensor:
    """paged_decode_cpu's work, through `lib` (a build of paged_decode_cpu.c for the query's head size and the
    cache's dtype). The kernel takes a float32 query and computes in float32; a bfloat16 result is rounded once."""
    batch, num_heads = query.shape[:2]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    dtype = query.dtype
    query, tables, lens = query.float().contiguous(), block_tables.contiguous(), seq_lens.contiguous()
    out = torch.empty_like(query)
    lib.paged_attention(query.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), tables.data_ptr(),
                        tables.shape[1], lens.data_ptr(), out.data_ptr(), batch, num_heads, num_kv_heads, block_size,
                        scaling, torch.get_num_threads())
    return out.to(dtype)


def write_kv_cpu(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """kv_cache [2, N, bs, Hkv, D] written at slot_mapping [T] int64 (-1: skip) with key / value [T, Hkv, D], whose
    token rows may be strided (views into a fused qkv output); False, writing nothing, where the kernels do not
    apply (the caller writes with torch then)."""
    if not (available(kv_cache.device, kv_cache.dtype, kv_cache.shape[-1])
            and key.dtype == value.dtype == kv_cache.dtype and kv_cache.is_contiguous()
            and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
            and all(t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] for t in (key, value))):
        return False
    num_slots, row_floats = kv_cache.shape[1] * kv_cache.shape[2], kv_cache.shape[3] * kv_cache.shape[4]
    bad = _library(kv_cache.shape[-1], dtype=kv_cache.dtype).write_kv(
        key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0), kv_cache[0].data_ptr(),
        kv_cache[1].data_ptr(), slot_mapping.data_ptr(), slot_mapping.shape[0], row_floats, num_slots)
    if bad >= 0:
        raise IndexError(f"KV cache slot {bad} is out of range for a cache of {num_slots} slots")
    return True


@functools.cache
def _library(head_dim: int, vector_bytes: int | None = None, dtype: torch.dtype = torch.float32) -> ctypes.CDLL | None:
    """The kernels for `head_dim` and a cache of `dtype`, built for this machine's vector width or for
    `vector_bytes` (16, 32, 64: the tests run all)."""
    defines = (f"-DHEAD_DIM={head_dim}",) + (("-DKV_BF16",) if dtype == torch.bfloat16 else ())
    return declare(load_library("paged_decode_cpu.c", defines, vector_bytes),
                   {"paged_attention": (_ATTENTION_ARGS, None), "write_kv": (_WRITE_ARGS, _I64)})
