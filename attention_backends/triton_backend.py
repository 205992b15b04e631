"""Paged attention on Triton kernels: one cache write, then one decode and/or one prefill launch per layer call.

A step may mix one-token (decode) requests with prefill chunks. Both kernels read the whole batch's metadata on
the device and skip the requests that are not theirs, so splitting the batch needs no index tensors or syncs;
the host only decides which of the two kernels to launch, from the metadata's host copy of query_start_loc.
"""
from __future__ import annotations

import torch

from hfbridge.attention_backends import triton_kernels as kernels
from hfbridge.attention_backends.metadata import AttentionMetadata, LayerOptions


class TritonAttentionBackend:
    name = "triton"

    def __init__(self, decode_num_splits: int | None = None):
        """decode_num_splits: a fixed number of context splits for decode (a power of two; tests and benchmarks
        use it to cover the split path), None = chosen per step from the batch and the GPU's size."""
        if decode_num_splits is not None and (decode_num_splits < 1 or decode_num_splits & (decode_num_splits - 1)):
            raise ValueError(f"decode_num_splits={decode_num_splits} must be a power of two")
        self.decode_num_splits = decode_num_splits

    def forward(
        self,
        query: torch.Tensor,  # [T, H, D]
        key: torch.Tensor,  # [T, Hkv, D]
        value: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor | None,  # [2, num_blocks, block_size, Hkv, D]
        metadata: AttentionMetadata,
        layer: LayerOptions,
        out: torch.Tensor | None = None,  # [T, H, D] to write into (tests pass a NaN-poisoned one)
    ) -> torch.Tensor:  # [T, H, D]
        if metadata.bidirectional_spans:
            raise NotImplementedError(f"the {self.name} backend does not compute image tokens that attend both ways "
                                      "(Gemma 3); use attention_backend='torch'")
        num_heads, num_kv_heads = query.shape[1], key.shape[1]
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
        if out is None:
            out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if query.shape[0] == 0:
            return out
        if kv_cache is None:  # encoders: each request attends over exactly its own new tokens
            kernels.prefill_attention(query, key, value, out, metadata, layer, paged=False)
            return out
        # Write first: a later request of this step may read blocks an earlier one writes (prefix-cache hits).
        kernels.write_kv(kv_cache, key, value, metadata.slot_mapping)
        query_lens = _query_lens(metadata)
        num_decodes = sum(1 for n in query_lens if n == 1)
        num_prefills = sum(1 for n in query_lens if n > 1)
        if num_decodes:
            splits = self.decode_num_splits or kernels.decode_num_splits(
                metadata.num_requests, num_kv_heads, metadata.max_seq_len, query.device
            )
            kernels.decode_attention(query, kv_cache, out, metadata, layer, splits)
        if num_prefills:
            kernels.prefill_attention(
                query, kv_cache[0], kv_cache[1], out, metadata, layer, paged=True, skip_decodes=num_decodes > 0
            )
        return out


def _query_lens(metadata: AttentionMetadata) -> list[int]:
    starts = metadata.query_start_loc_cpu or tuple(metadata.query_start_loc.tolist())  # host copy: no sync
    return [end - start for start, end in zip(starts, starts[1:])]
