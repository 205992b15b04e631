"""Logprobs of sampled and prompt tokens: what the sampler hands back for a row."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SampledLogprobs:
    """Logprobs of one sampled token: the sampled id first, then the top-k ids (ranks are 1-based)."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


def gather_logprobs(logprobs: torch.Tensor, token_ids: list[int], num_top: list[int]) -> list[SampledLogprobs]:
    """logprobs [N, V] (log-softmax); for each row, the given token plus the row's top num_top[i] tokens."""
    vocab_size = logprobs.shape[-1]
    k_max = min(max(num_top, default=0), vocab_size)
    top_values, top_ids = logprobs.topk(k_max, dim=-1) if k_max else (None, None)
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logprobs.device)[:, None])
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    out = []
    for i, token in enumerate(token_ids):
        k = min(num_top[i], vocab_size)
        ids = [token] + (top_ids[i, :k].tolist() if k else [])
        values = [chosen[i, 0].item()] + (top_values[i, :k].tolist() if k else [])
        out.append(SampledLogprobs(ids, values, [int(ranks[i])] + list(range(1, k + 1))))
    return out
