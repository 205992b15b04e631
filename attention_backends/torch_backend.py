"""Reference attention over the paged KV cache in plain torch: runs anywhere, the oracle for faster backends.

Decode requests (one query token) are attended in one padded batch; every other request (prefill, chunked
prefill, prefill after a prefix-cache hit) is attended on its own. Where the C kernels serve a layer (cpu_kernels.py),
the tokens of requests with short contexts join the decode batch, each as a one-token request over its own causal
prefix (KERNEL_CONTEXT_BYTES). Math runs in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hfbridge.attention_backends import cpu_kernels
from hfbridge.attention_backends.metadata import AttentionMetadata, LayerOptions
from hfbridge.attention_backends.paged_decode import CompiledDecode


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv_cache [2, N, bs, Hkv, D]; key/value [T, Hkv, D]; slot_mapping [T] (-1 = skip)."""
    if cpu_kernels.write_kv_cpu(kv_cache, key, value, slot_mapping):
        return
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's context: block_table [1, nb] -> key, value [1, seq_len, Hkv, D]."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    blocks = kv_cache[:, block_table[:, :num_blocks].long()]  # [2, 1, nb, bs, Hkv, D]
    blocks = blocks.flatten(2, 3)[:, :, :seq_len]
    return blocks[0], blocks[1]


def padded_slots(block_tables: torch.Tensor, seq_lens: torch.Tensor, max_len: int, block_size: int) -> torch.Tensor:
    """Cache slots of B requests' contexts padded to max_len: [B * max_len]. Padding repeats each request's
    position 0, a slot it has written, so no unwritten (possibly NaN) cache memory is ever read; attend() masks it."""
    positions = torch.arange(max_len, device=block_tables.device)[None, :]  # [1, L]
    positions = torch.where(positions < seq_lens[:, None], positions, 0)  # [B, L]
    blocks = block_tables.long().gather(1, positions // block_size)
    return (blocks * block_size + positions % block_size).flatten()


def gather_slots(kv_cache: torch.Tensor, slots: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_cache [2, N, bs, Hkv, D], slots [B * L] -> key, value [B, L, Hkv, D]."""
    num_kv_heads, head_dim = kv_cache.shape[3:]
    keys = kv_cache[0].view(-1, num_kv_heads, head_dim).index_select(0, slots)
    values = kv_cache[1].view(-1, num_kv_heads, head_dim).index_select(0, slots)
    shape = (batch, -1, num_kv_heads, head_dim)
    return keys.view(shape), values.view(shape)


def attend_prompt(
    query: torch.Tensor,  # [B, L, H, D] every position 0 .. L-1 of the requests
    key: torch.Tensor,  # [B, L, Hkv, D]
    value: torch.Tensor,  # [B, L, Hkv, D]
    layer: LayerOptions,  # layer.plain_causal
) -> torch.Tensor:  # [B, L, H, D] float32
    """attend() for queries that are the whole context from position 0: SDPA's is_causal and enable_gqa instead of
    a built [B, Q, L] mask, so no mask ops per request and layer, and the CPU flash kernel skips the blocks above the
    diagonal (faster per call: docs/kernel-measurements.md)."""
    out = F.scaled_dot_product_attention(query.float().transpose(1, 2), key.float().transpose(1, 2),
                                         value.float().transpose(1, 2), is_causal=True, enable_gqa=True,
                                         scale=layer.scaling)
    return out.transpose(1, 2)


def attend(
    query: torch.Tensor,  # [B, Q, H, D]
    key: torch.Tensor,  # [B, L, Hkv, D]
    value: torch.Tensor,  # [B, L, Hkv, D]
    query_positions: torch.Tensor,  # [B, Q] position of each query token in its sequence
    kv_lens: torch.Tensor,  # [B] number of valid keys per request
    layer: LayerOptions,
    spans: list[tuple[int, int]] = (),  # (first, end) positions whose tokens see each other both ways (one request)
) -> torch.Tensor:  # [B, Q, H, D] float32
    batch, num_queries, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    group = num_heads // num_kv_heads
    key_positions = torch.arange(key.shape[1], device=key.device)
    valid = key_positions[None, :] < kv_lens[:, None]  # [B, L]
    mask = valid[:, None, :].expand(-1, num_queries, -1)  # [B, Q, L]
    if layer.is_causal:
        mask = mask & (key_positions[None, None, :] <= query_positions[:, :, None])
    if layer.sliding_window is not None:
        distance = query_positions[:, :, None] - key_positions[None, None, :]  # [B, Q, L]
        mask = mask & (distance < layer.sliding_window)
        if not layer.is_causal:  # encoders' local attention looks both ways (ModernBERT)
            mask = mask & (-distance < layer.sliding_window)
    for first, end in spans:  # OR'ed over the causal / window mask, as Transformers' or_mask_function
        inside_q = (query_positions >= first) & (query_positions < end)  # [B, Q]
        inside_k = (key_positions >= first) & (key_positions < end)  # [L]
        mask = mask | (inside_q[:, :, None] & inside_k[None, None, :] & valid[:, None, :])
    # Keys past kv_lens are padding the callers fill with real (finite) values: masked, they weigh exactly 0.
    k = key.float().transpose(1, 2)  # [B, Hkv, L, D]
    v = value.float().transpose(1, 2)
    # GQA without copying K/V: query head h = j * group + g reads KV head j, so the `group` query heads of one
    # KV head become extra query rows: [B, Q, Hkv, G, D] -> [B, Hkv, G * Q, D].
    q = query.float().view(batch, num_queries, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(batch, num_kv_heads, group * num_queries, head_dim)
    mask = mask[:, None, None].expand(-1, 1, group, -1, -1).reshape(batch, 1, group * num_queries, -1)
    if layer.softcap is None and layer.sinks is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer.scaling)
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) * layer.scaling  # [B, Hkv, G * Q, L]
        if layer.softcap is not None:
            scores = layer.softcap * torch.tanh(scores / layer.softcap)
        scores = scores.masked_fill(~mask, float("-inf"))
        if layer.sinks is not None:  # one extra logit per query head, its column dropped after the softmax
            sink = layer.sinks.float().view(1, num_kv_heads, group, 1, 1).expand(batch, -1, -1, num_queries, -1)
            scores = torch.cat([scores, sink.reshape(batch, num_kv_heads, group * num_queries, 1)], dim=-1)
            out = torch.matmul(torch.softmax(scores, dim=-1)[..., :-1], v)
        else:
            out = torch.matmul(torch.softmax(scores, dim=-1), v)
    out = out.view(batch, num_kv_heads, group, num_queries, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, num_queries, num_heads, head_dim)


class TorchReferenceBackend:
    name = "torch"
    compiled_decode: CompiledDecode | None = None  # see enable_compiled_decode

    def build_kernels(self, head_shapes: list[tuple[int, int, int, torch.dtype]], device: torch.device) -> None:
        """Builds (or loads) the C kernels for these head shapes now, before the server says ready, not on the
        first request."""
        for _, _, head_dim, dtype in head_shapes:
            cpu_kernels.available(device, dtype, head_dim)

    def enable_compiled_decode(self, head_shapes: list[tuple[int, int, int, torch.dtype]], device: torch.device,
                               background: bool = True) -> CompiledDecode | None:
        """Decode steps of plain attention layers read the paged cache in place once compiled (paged_decode.py).
        Head shapes the CPU kernels serve (cpu_kernels.py, built here if need be) need no compile."""
        head_shapes = [(heads, kv_heads, head_dim, dtype) for heads, kv_heads, head_dim, dtype in head_shapes
                       if not cpu_kernels.available(device, dtype, head_dim)]
        if not head_shapes:
            return None
        self.compiled_decode = CompiledDecode(head_shapes, device)
        self.compiled_decode.start(background)
        return self.compiled_decode

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor | None,
        metadata: AttentionMetadata,
        layer: LayerOptions,
    ) -> torch.Tensor:
        if kv_cache is not None:
            write_kv(kv_cache, key, value, metadata.slot_mapping)
        out = torch.empty_like(query)
        starts, seq_lens = metadata.query_start_loc_cpu, metadata.seq_lens_cpu
        spans: dict[int, list[tuple[int, int]]] = {}
        for b, first, end in metadata.bidirectional_spans:
            spans.setdefault(b, []).append((first, end))
        if kv_cache is not None and cpu_kernels.serves(layer, query, kv_cache):
            done = self._kernel_rows(query, kv_cache, metadata, layer, out)
        else:
            done = [b for b in range(len(seq_lens)) if starts[b + 1] - starts[b] == 1 and kv_cache is not None
                    and b not in spans]
            if done:
                self._decode_batch(query, kv_cache, metadata, layer, done, out)
        done = set(done)
        for b in range(len(seq_lens)):
            start, end = starts[b], starts[b + 1]
            if b in done or end == start:
                continue
            seq_len, num_new = seq_lens[b], end - start
            if kv_cache is None:  # no cache: the request's context is exactly its new tokens
                assert seq_len == num_new, "a request without KV cache must be scheduled whole"
                k, v = key[None, start:end], value[None, start:end]
            elif seq_len == num_new:  # nothing cached before this chunk: the context is the new tokens, as stored
                k, v = key[None, start:end].to(kv_cache.dtype), value[None, start:end].to(kv_cache.dtype)
            else:
                k, v = gather_kv(kv_cache, metadata.block_tables[b : b + 1], seq_len)
            if seq_len == num_new and layer.plain_causal and b not in spans:  # a whole prompt: SDPA's causal mask
                out[start:end] = attend_prompt(query[None, start:end], k, v, layer)[0].to(out.dtype)
                continue
            positions = torch.arange(seq_len - num_new, seq_len, device=query.device)[None]
            lens = torch.tensor([seq_len], device=query.device)
            out[start:end] = attend(query[None, start:end], k, v, positions, lens, layer,
                                    spans.get(b, ()))[0].to(out.dtype)
        return out

    def _kernel_rows(self, query, kv_cache, metadata, layer, out) -> list[int]:
        """The C kernel for every query token it serves (see _token_rows); returns the requests it attended."""
        # The same for every layer of the step: built by the first layer, reused by the others.
        row_bytes = 2 * kv_cache[0, 0, 0].numel() * kv_cache.element_size()
        requests, token_idx, tables, lens = metadata.memo(("kernel rows", row_bytes),
                                                          lambda: _token_rows(metadata, row_bytes))
        if not requests:
            return requests
        if token_idx is None:  # every token, in order
            out.copy_(cpu_kernels.paged_decode_cpu(query, kv_cache, tables, lens, layer.scaling))
        else:
            out[token_idx] = cpu_kernels.paged_decode_cpu(query[token_idx], kv_cache, tables, lens, layer.scaling)
        return requests

    def _decode_batch(self, query, kv_cache, metadata, layer, decodes, out) -> None:
        # The same for every layer of the step: built by the first layer, reused by the others.
        token_idx, lens, slots = metadata.memo(("decode", kv_cache.shape[2]), lambda: _decode_plan(metadata, decodes,
                                                                                                    kv_cache.shape[2]))
        if self.compiled_decode is not None and self.compiled_decode.serves(layer):
            result = self.compiled_decode.fn(query[token_idx], kv_cache, slots.view(len(lens), -1), lens,
                                             layer.scaling)
            out[token_idx] = result.to(out.dtype)
            return
        k, v = gather_slots(kv_cache, slots, lens.shape[0])
        result = attend(query[token_idx][:, None], k, v, (lens - 1)[:, None], lens, layer)
        out[token_idx] = result[:, 0].to(out.dtype)


# Prompt (and chunk) tokens whose whole context holds at most this many bytes of K and V per layer go through the C
# decode kernel too, each token as a one-token request over its own causal prefix (context length = position + 1).
# The request's rows stay in the core's L2 while its tokens pass over them; longer contexts take SDPA, which reads
# them once per block of queries. SmolLM2-135M (1.5 KiB a token): up to 341 tokens. Faster than per-request SDPA
# even before that one's Python loop (docs/kernel-measurements.md).
KERNEL_CONTEXT_BYTES = 512 << 10


def _token_rows(metadata: AttentionMetadata, row_bytes: int):
    """The kernel's share of a step: decode tokens, and every token of requests with short contexts. Returns
    (requests, token_idx [N] or None when it is every token in order, block_tables [N, W] int32, seq_lens [N]
    int32 with each token's own context length)."""
    starts, seq_lens = metadata.query_start_loc_cpu, metadata.seq_lens_cpu
    # Prompt tokens read their own K/V back from the cache: only where every token of the step was stored there
    stored = bool((metadata.slot_mapping >= 0).all())
    spanned = {b for b, _, _ in metadata.bidirectional_spans}  # their image tokens also see later keys
    requests = [b for b in range(len(seq_lens)) if b not in spanned and (starts[b + 1] - starts[b] == 1
                or (stored and starts[b + 1] > starts[b] and seq_lens[b] * row_bytes <= KERNEL_CONTEXT_BYTES))]
    owners, tokens, lens = [], [], []
    for b in requests:
        start, end = starts[b], starts[b + 1]
        owners += [b] * (end - start)
        tokens += range(start, end)
        lens += range(seq_lens[b] - (end - start) + 1, seq_lens[b] + 1)  # the token at end - 1 sees all seq_lens[b]
    device = metadata.seq_lens.device
    tables = metadata.block_tables[torch.tensor(owners, dtype=torch.long, device=device)]
    every = len(tokens) == metadata.num_tokens  # then tokens is 0 .. T-1, in order
    token_idx = None if every else torch.tensor(tokens, dtype=torch.long, device=device)
    return requests, token_idx, tables, torch.tensor(lens, dtype=torch.int32, device=device)


def _decode_rows(metadata: AttentionMetadata, decodes: list[int]):
    """token_idx [B] (the one query token of each decode request), block_tables [B, W] int32, seq_lens [B] int32."""
    rows = torch.tensor(decodes, device=metadata.seq_lens.device)
    return metadata.query_start_loc[rows].long(), metadata.block_tables[rows], metadata.seq_lens[rows]


def _decode_plan(metadata: AttentionMetadata, decodes: list[int], block_size: int):
    """token_idx [B] (the one query token of each decode request), lens [B], slots [B * max_len] (see
    padded_slots)."""
    token_idx, tables, lens = _decode_rows(metadata, decodes)
    lens = lens.long()
    max_len = max(metadata.seq_lens_cpu[b] for b in decodes)
    return token_idx, lens, padded_slots(tables, lens, max_len, block_size)
