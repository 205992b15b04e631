"""A full step of dummy tokens, run before the KV cache is sized on a GPU (vLLM's profile_run).

The step holds `max_num_batched_tokens` tokens split into sequences of at most `max_model_len`, takes logits at
`max_num_seqs` rows and runs the sampler on them (sort for top-k/top-p, softmax, log-softmax): the activation
peak of the largest step the scheduler can ever send. Attention is skipped, as in vLLM's profile run (the
paged kernels need no T x T buffer): each layer returns zeros, which leaves every shape of the step intact."""
from __future__ import annotations

import torch
from torch import nn

from hfbridge.attention_backends import AttentionMetadata, ForwardContext, LayerOptions, forward_context
from hfbridge.config import SchedulerConfig
from hfbridge.sample.sampler import Sampler, SamplingRow
from hfbridge.sample.sampling_params import SamplingParams


class _NoAttention:
    """Attention that writes nothing and returns zeros shaped like the query."""

    name = "profile"

    def forward(self, query, key, value, kv_cache, metadata, layer: LayerOptions) -> torch.Tensor:
        return torch.zeros_like(query)


def profile_step_lengths(scheduler_config: SchedulerConfig) -> list[int]:
    """Sequence lengths of the profiled step: max_num_batched_tokens tokens in sequences of <= max_model_len."""
    total, max_len = scheduler_config.max_num_batched_tokens, scheduler_config.max_model_len
    return [max_len] * (total // max_len) + ([total % max_len] if total % max_len else [])


@torch.inference_mode()
def run_profile_step(
    model: nn.Module, scheduler_config: SchedulerConfig, sampler: Sampler, device: torch.device
) -> None:
    lengths = profile_step_lengths(scheduler_config)
    num_tokens = sum(lengths)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)[None]  # [1, T]
    input_ids = torch.zeros((1, num_tokens), dtype=torch.long, device=device)
    num_rows = min(scheduler_config.max_num_seqs, num_tokens)
    logits_indices = torch.arange(num_tokens - num_rows, num_tokens, device=device)  # [max_num_seqs]
    metadata = AttentionMetadata.build(
        slot_mapping=[-1] * num_tokens, query_lens=lengths, seq_lens=lengths, block_tables=[[] for _ in lengths],
        device=device,
    )
    with forward_context(ForwardContext(metadata, {}, _NoAttention())):
        logits = model(input_ids, positions, logits_indices)  # [max_num_seqs, V]
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.01, logprobs=1)
    rows = [SamplingRow(params, [0], []) for _ in range(logits.shape[0])]
    sampler(logits.float(), rows)
