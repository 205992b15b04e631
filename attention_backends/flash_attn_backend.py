"""Attention through flash-attn 2 (the optional `hfbridge[flash]` extra; CUDA, fp16/bf16, head dim <= 256).

flash-attn's paged API (`block_table`) needs cache blocks of a multiple of 256 tokens, while hfbridge's default
block is 16. So, per step:
- no cache (encoders), or every request's context is exactly its new tokens (fresh prefills): varlen attention
  over the step's own K/V, for any block size;
- block_size a multiple of 256: `flash_attn_with_kvcache` for an all-decode step, `flash_attn_varlen_func` with
  `block_table` otherwise;
- anything else (smaller blocks with a cached context, fp32, head dim > 256): the Triton backend, logged once
  per reason.
"""
from __future__ import annotations

import logging

import torch

from hfbridge.attention_backends import triton_kernels
from hfbridge.attention_backends.metadata import AttentionMetadata, LayerOptions
from hfbridge.attention_backends.triton_backend import TritonAttentionBackend

logger = logging.getLogger(__name__)

PAGE_MULTIPLE = 256  # flash-attn 2: "Paged KV cache block size must be divisible by 256"
MAX_HEAD_DIM = 256


class FlashAttnBackend:
    name = "flash_attn"

    def __init__(self):
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache  # the optional extra

        self._varlen = flash_attn_varlen_func
        self._with_kvcache = flash_attn_with_kvcache
        self._fallback = TritonAttentionBackend()
        self._logged_reasons: set[str] = set()

    def forward(
        self,
        query: torch.Tensor,  # [T, H, D]
        key: torch.Tensor,  # [T, Hkv, D]
        value: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor | None,  # [2, num_blocks, block_size, Hkv, D]
        metadata: AttentionMetadata,
        layer: LayerOptions,
    ) -> torch.Tensor:  # [T, H, D]
        if metadata.bidirectional_spans:
            raise NotImplementedError(f"the {self.name} backend does not compute image tokens that attend both ways "
                                      "(Gemma 3); use attention_backend='torch'")
        reason = self._unsupported(query, kv_cache, metadata, layer)
        if reason is not None:
            if reason not in self._logged_reasons:
                self._logged_reasons.add(reason)
                logger.info("flash_attn backend: %s; those steps run on the Triton kernels", reason)
            return self._fallback.forward(query, key, value, kv_cache, metadata, layer)
        if query.shape[0] == 0:
            return torch.empty_like(query)
        options = dict(
            softmax_scale=layer.scaling,
            causal=layer.is_causal,
            window_size=_window_size(layer),
            softcap=float(layer.softcap or 0.0),  # 0.0 = off
        )
        qsl, max_q = metadata.query_start_loc, metadata.max_query_len
        if kv_cache is None or _all_fresh(metadata):
            if kv_cache is not None:
                triton_kernels.write_kv(kv_cache, key, value, metadata.slot_mapping)
            return self._varlen(query, key, value, qsl, qsl, max_q, max_q, **options)
        triton_kernels.write_kv(kv_cache, key, value, metadata.slot_mapping)  # before reading: prefix hits
        if max_q == 1 and query.shape[0] == metadata.num_requests:  # all decodes
            out = self._with_kvcache(
                query[:, None], kv_cache[0], kv_cache[1], cache_seqlens=metadata.seq_lens,
                block_table=metadata.block_tables, **options,
            )  # [B, 1, H, D]
            return out[:, 0]
        cu_seqlens_k = torch.nn.functional.pad(metadata.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        return self._varlen(
            query, kv_cache[0], kv_cache[1], qsl, cu_seqlens_k, max_q, metadata.max_seq_len,
            block_table=metadata.block_tables, **options,
        )

    @staticmethod
    def _unsupported(
        query: torch.Tensor, kv_cache: torch.Tensor | None, metadata: AttentionMetadata, layer: LayerOptions
    ) -> str | None:
        if layer.sinks is not None:
            return "flash-attn 2 takes no attention sinks (GPT-OSS's s_aux); layers with sinks"
        if query.dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn supports fp16/bf16 only, not {query.dtype}"
        if query.shape[-1] > MAX_HEAD_DIM:
            return f"flash-attn supports head dims up to {MAX_HEAD_DIM}, not {query.shape[-1]}"
        if kv_cache is None or _all_fresh(metadata):
            return None
        if kv_cache.shape[2] % PAGE_MULTIPLE:
            return (f"flash-attn's paged KV cache needs block_size a multiple of {PAGE_MULTIPLE} "
                    f"(this cache: {kv_cache.shape[2]}); steps reading a cached context")
        return None


def _window_size(layer: LayerOptions) -> tuple[int, int]:
    """flash-attn's (left, right) window in keys, inclusive; -1 = unbounded. A query at p sees p - k < window,
    and non-causal layers also k - p < window."""
    if layer.sliding_window is None:
        return (-1, -1)
    return (layer.sliding_window - 1, 0 if layer.is_causal else layer.sliding_window - 1)


def _all_fresh(metadata: AttentionMetadata) -> bool:
    """Every request's context is exactly its new tokens (no cached prefix): no cache read is needed."""
    starts = metadata.query_start_loc_cpu
    if not starts:
        return False
    return all(end - start == seq for start, end, seq in zip(starts, starts[1:], metadata.seq_lens_cpu))
