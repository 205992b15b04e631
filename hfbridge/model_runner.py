"""One model step: flatten every scheduled token into one stream, run the model once, sample.

Inputs per step (T tokens of B requests): input_ids / positions [1, T], AttentionMetadata, and logits_indices,
the token indices whose next-token logits are needed (last token of each request that samples, plus prompt
positions of requests asking for prompt logprobs). Everything else never reaches the LM head."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hfbridge.attention_backends import AttentionMetadata, ForwardContext, forward_context
from hfbridge.attention_backends.base import AttentionBackend
from hfbridge.pooler import Pooler
from hfbridge.sampler import Sampler, SamplingRow, gather_logprobs
from hfbridge.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [N_prompt + N_sample]
    token_type_ids: torch.Tensor | None  # [1, T] segment ids, when a request carries them (sentence pairs)
    sample_requests: list[ScheduledRequest]  # the last N_sample rows of the logits, in order
    # per request: (first logits row, target prompt token ids, top-k) of its prompt-logprob positions this step
    prompt_logprob_rows: dict[str, tuple[int, list[int], int]]


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: dict[int, torch.Tensor],
        backend: AttentionBackend,
        block_size: int,
        device: torch.device,
        sampler: Sampler,
        pooler: Pooler | None = None,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.sampler = sampler
        self.pooler = pooler  # set for pooling models, which return hidden states instead of logits

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        step = self.prepare_inputs(scheduler_output.scheduled)
        with forward_context(ForwardContext(step.metadata, self.kv_caches, self.backend)):
            if self.pooler is not None:
                hidden = self.model(step.input_ids, step.positions, step.token_type_ids)  # [T, H]
                return self._pool(hidden, scheduler_output.scheduled)
            logits = self.model(step.input_ids, step.positions, step.logits_indices)  # [N, V]
        return self._sample(logits, step)

    def prepare_inputs(self, scheduled: list[ScheduledRequest]) -> StepInputs:
        bs = self.block_size
        ids, positions, slots, logits_indices = [], [], [], []
        query_lens, seq_lens, tables = [], [], []
        prompt_rows: dict[str, tuple[int, list[int], int]] = {}
        offset = 0
        for item in scheduled:
            request = item.request
            pos = np.arange(item.start, item.end)
            ids.extend(request.all_token_ids[item.start : item.end])
            positions.append(pos)
            slots.append(np.asarray(item.block_ids, dtype=np.int64)[pos // bs] * bs + pos % bs)
            query_lens.append(item.num_new_tokens)
            seq_lens.append(item.end)
            tables.append(item.block_ids)
            if request.wants_prompt_logprobs:
                # logits at prompt position p predict prompt token p + 1
                last = min(item.end, request.num_prompt_tokens - 1)
                if last > item.start:
                    prompt_rows[request.request_id] = (
                        len(logits_indices),
                        request.prompt_token_ids[item.start + 1 : last + 1],
                        request.sampling_params.prompt_logprobs,
                    )
                    logits_indices.extend(range(offset, offset + last - item.start))
            offset += item.num_new_tokens
        ends = np.cumsum(query_lens)
        sample_requests, sample_rows = [], []
        for i, item in enumerate(scheduled):
            if item.samples and item.request.sampling_params is not None:
                sample_requests.append(item)
                sample_rows.append(int(ends[i]) - 1)
        metadata = AttentionMetadata.build(
            slot_mapping=np.concatenate(slots).tolist() if slots else [],
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=tables,
            device=self.device,
        )
        pos_tensor = torch.from_numpy(np.concatenate(positions)) if positions else torch.zeros(0, dtype=torch.long)
        token_types = None
        if any(item.request.token_type_ids is not None for item in scheduled):
            types = [t for item in scheduled for t in _token_types(item)]
            token_types = torch.tensor(types, dtype=torch.long, device=self.device)[None]
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device)[None],
            positions=pos_tensor.to(self.device)[None],
            metadata=metadata,
            logits_indices=torch.tensor(logits_indices + sample_rows, dtype=torch.long, device=self.device),
            token_type_ids=token_types,
            sample_requests=sample_requests,
            prompt_logprob_rows=prompt_rows,
        )

    def _sample(self, logits: torch.Tensor, step: StepInputs) -> ModelRunnerOutput:
        output = ModelRunnerOutput()
        num_prompt_rows = logits.shape[0] - len(step.sample_requests)
        if step.prompt_logprob_rows:
            logprobs = torch.log_softmax(logits[:num_prompt_rows], dim=-1)
            for request_id, (first, targets, k) in step.prompt_logprob_rows.items():
                num_top = logits.shape[-1] if k == -1 else k
                rows = logprobs[first : first + len(targets)]
                output.prompt_logprobs[request_id] = gather_logprobs(rows, targets, [num_top] * len(targets))
        if step.sample_requests:
            rows = [
                SamplingRow(s.request.sampling_params, s.request.prompt_token_ids, s.request.output_token_ids,
                            s.request.generator)
                for s in step.sample_requests
            ]
            tokens, logprobs = self.sampler(logits[num_prompt_rows:], rows)
            for s, token, lp in zip(step.sample_requests, tokens, logprobs):
                output.sampled_token_ids[s.request.request_id] = token
                if lp is not None:
                    output.logprobs[s.request.request_id] = lp
        return output

    def _pool(self, hidden: torch.Tensor, scheduled: list[ScheduledRequest]) -> ModelRunnerOutput:
        """Pooling requests run whole (no chunking, no cache): each one's hidden rows are its whole prompt."""
        rows, token_ids, params, ids = [], [], [], []
        offset = 0
        for item in scheduled:
            if item.samples:
                assert item.start == 0, "a pooling request must be scheduled whole"
                rows.append(hidden[offset : offset + item.num_new_tokens])
                token_ids.append(item.request.prompt_token_ids)
                params.append(item.request.pooling_params)
                ids.append(item.request.request_id)
            offset += item.num_new_tokens
        pooled = self.pooler(rows, token_ids, params) if rows else []
        return ModelRunnerOutput(pooled={i: p.cpu() for i, p in zip(ids, pooled)})


def _token_types(item: ScheduledRequest) -> list[int]:
    types = item.request.token_type_ids
    return types[item.start : item.end] if types is not None else [0] * item.num_new_tokens
