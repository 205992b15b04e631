"""Decode attention read straight from the paged KV cache, for torch.compile.

The eager decode path gathers every request's K and V into padded copies ([B, L, Hkv, D] each, per layer per
step: at 64 requests x 256 tokens that is 25 MB written and read again) before scaled_dot_product_attention.
Written as below, with the gathers feeding the two reductions directly, Inductor emits loops that read each
cached K/V row once, where it lies: several times faster per layer than gather + SDPA at that size
(docs/kernel-measurements.md).
Eager, this formulation would materialise [B, L, Hkv, G, D] products, so it only ever runs compiled; until the
compiled code is warm (compiled in the background) the eager gather + SDPA path serves.

Plain causal full attention only; layers with a sliding window, a logit softcap or sinks take the eager path."""
from __future__ import annotations

import functools

import torch

from hfbridge.compilation import COMPILE_OPTIONS, BackgroundCompile, constant_floats


def paged_decode_attention(
    query: torch.Tensor,  # [B, H, D], one token per request
    kv_cache: torch.Tensor,  # [2, N, bs, Hkv, D]
    slots: torch.Tensor,  # [B, L] cache slots of each request's context, padded (padding repeats a written slot)
    lens: torch.Tensor,  # [B] context lengths
    scaling: float,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:  # [B, H, D] float32
    # The head sizes come in as constants of the compiled code, never read off the (symbolic) tensor sizes: with
    # symbolic heads every index of the inner loops pays integer divisions (markedly slower).
    batch, max_len = slots.shape
    group = num_heads // num_kv_heads
    keys = kv_cache[0].view(-1, num_kv_heads, head_dim)[slots].float()  # [B, L, Hkv, D]
    q = query.float().view(batch, 1, num_kv_heads, group, head_dim)  # query head h = j * group + g reads KV head j
    scores = (q * keys[:, :, :, None, :]).sum(-1) * scaling  # [B, L, Hkv, G]
    valid = torch.arange(max_len, device=slots.device)[None, :] < lens[:, None]  # [B, L]
    scores = scores.masked_fill(~valid[:, :, None, None], float("-inf"))
    weights = torch.softmax(scores, dim=1)  # over the context
    values = kv_cache[1].view(-1, num_kv_heads, head_dim)[slots].float()  # [B, L, Hkv, D]
    out = (weights[..., None] * values[:, :, :, None, :]).sum(1)  # [B, Hkv, G, D]
    return out.reshape(batch, num_kv_heads * group, head_dim)


class CompiledDecode(BackgroundCompile):
    """The compiled paged_decode_attention, warmed up for the model's head shapes; dynamic in B and L, with the
    head sizes fixed: one compiled function per (query heads, KV heads, head dim)."""

    def __init__(self, head_shapes: list[tuple[int, int, int, torch.dtype]], device: torch.device):
        super().__init__("paged decode attention", self._warm_up)
        self.head_shapes = head_shapes  # distinct (num_heads, num_kv_heads, head_dim, cache dtype)
        self.device = device
        self.fns: dict[tuple[int, int, int], object] = {}

    def fn(self, query, kv_cache, slots, lens, scaling) -> torch.Tensor:
        heads = (query.shape[1], *kv_cache.shape[-2:])  # every cached layer's is warmed up: new only in the warm-up
        if heads not in self.fns:
            num_heads, num_kv_heads, head_dim = heads
            self.fns[heads] = torch.compile(functools.partial(
                paged_decode_attention, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim),
                dynamic=True, options=COMPILE_OPTIONS)
        return self.fns[heads](query, kv_cache, slots, lens, scaling)

    def serves(self, layer) -> bool:
        return self.ready.is_set() and layer.plain_causal

    def _warm_up(self) -> None:
        # B = 1 (single stream: torch.compile specialises size 1) and two more B, two L, so both are symbols. The
        # sizes are odd primes: sizes equal at trace time would be assumed equal forever ("duck sizing").
        for num_heads, num_kv_heads, head_dim, dtype in self.head_shapes:
            # like the real cache: allocated outside inference mode (the mode a tensor was made in is guarded)
            cache = torch.zeros(2, 29, 23, num_kv_heads, head_dim, dtype=dtype, device=self.device)
            with torch.inference_mode(), constant_floats():
                for batch in (1, 17, 19):
                    for max_len in (37, 41):
                        if self.should_stop():
                            return
                        slots = torch.zeros(batch, max_len, dtype=torch.long, device=self.device)
                        query = torch.zeros(batch, num_heads, head_dim, dtype=dtype, device=self.device)
                        lens = torch.full((batch,), max_len, dtype=torch.long, device=self.device)
                        self.fn(query, cache, slots, lens, head_dim**-0.5)
