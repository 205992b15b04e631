"""One model step: pack the scheduled tokens (step_inputs.py), run the model once, then sample (generation)
or pool (pooling models). The two runners share the packing and the forward context, nothing else."""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from hfbridge.attention_backends import ForwardContext, forward_context
from hfbridge.attention_backends.base import AttentionBackend
from hfbridge.lora.manager import LoRAManager
from hfbridge.multimodal.embeddings import ImageEmbedder
from hfbridge.core.scheduler_output import GrammarBitmask, ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from hfbridge.pooling.pooler import Pooler
from hfbridge.sample.logprobs import gather_logprobs
from hfbridge.sample.sampler import Sampler, SamplingRow, argmax_only
from hfbridge.worker.step_inputs import StepInputs, prepare_inputs


class ModelRunner:
    """Generation: logits at the sampled (and prompt-logprob) positions only, then the sampler."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: dict[int, torch.Tensor],
        backend: AttentionBackend,
        block_size: int,
        device: torch.device,
        sampler: Sampler,
        lora: LoRAManager | None = None,
        images: ImageEmbedder | None = None,
    ):
        self.model = model
        self.images = images  # a vision-language model: its encoder and the cache of its outputs
        self.lora = lora  # enable_lora: the adapters' slots and the step's row groups
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.sampler = sampler

    def prepare_inputs(self, scheduled: list[ScheduledRequest]) -> StepInputs:
        return prepare_inputs(scheduled, self.block_size, self.device)

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        step = self.prepare_inputs(scheduler_output.scheduled)
        rows = sampling_rows(step.sample_requests, scheduler_output.grammar_bitmask)
        if getattr(self.model, "sample_heads", None) is not None:
            is_fast = [argmax_only(row) for row in rows]
            if any(is_fast):
                return self._execute_split(step, rows, is_fast)
        positions = None
        if self.images is not None and self.images.mrope is not None:  # [3, 1, T] when the step holds images
            positions = self.images.mrope.step_positions(step.positions, scheduler_output.scheduled)
        if step.image_rows:
            embeds, failed = self.images.embed(step.input_ids, step.image_rows)
            output = sample_step(self.sampler, self._logits(step, embeds, positions), step, rows)
            for request_id, why in failed.items():
                output.sampled_token_ids.pop(request_id, None)
                output.failed[request_id] = ("multi_modal_data", why)
            return output
        return sample_step(self.sampler, self._logits(step, positions=positions), step, rows)

    def _execute_split(self, step: StepInputs, rows: list[SamplingRow], is_fast: list[bool]) -> ModelRunnerOutput:
        """The native decoders' two heads in one step: rows that only need their argmax (is_fast) take the greedy
        head (which computes only the logits that could be it); the others (prompt logprobs, sampling, constrained
        rows) get their full logits and the sampler."""
        num_prompt_rows = len(step.logits_indices) - len(rows)
        fast = [i for i, f in enumerate(is_fast) if f]
        slow = [i for i, f in enumerate(is_fast) if not f]
        sample_indices = step.logits_indices[num_prompt_rows:]
        order = torch.cat([step.logits_indices[:num_prompt_rows], sample_indices[slow], sample_indices[fast]])
        with forward_context(ForwardContext(step.metadata, self.kv_caches, self.backend)), self._adapters(step):
            logits, tokens = self.model.sample_heads(step.input_ids, step.positions, order,
                                                     num_prompt_rows + len(slow))
        sub_step = dataclasses.replace(step, sample_requests=[step.sample_requests[i] for i in slow])
        output = sample_step(self.sampler, logits, sub_step, [rows[i] for i in slow])
        for i, token in zip(fast, tokens.tolist()):
            output.sampled_token_ids[step.sample_requests[i].request.request_id] = token
        return output

    @torch.inference_mode()
    def compute_logits(self, scheduled: list[ScheduledRequest]) -> tuple[torch.Tensor, StepInputs]:
        """The forward alone (tensor-parallel workers run it; the driver samples): logits [N, V] float32."""
        step = self.prepare_inputs(scheduled)
        return self._logits(step), step

    def _logits(self, step: StepInputs, inputs_embeds: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:  # [N, V]
        """inputs_embeds [1, T, H] with the step's image rows in place; positions [3, 1, T] (M-RoPE)."""
        positions = step.positions if positions is None else positions
        with forward_context(ForwardContext(step.metadata, self.kv_caches, self.backend)), self._adapters(step):
            if inputs_embeds is not None:
                return self.model(step.input_ids, positions, step.logits_indices, inputs_embeds)
            return self.model(step.input_ids, positions, step.logits_indices)

    def _adapters(self, step: StepInputs) -> contextlib.AbstractContextManager:
        return self.lora.step(step.lora_rows) if self.lora is not None else contextlib.nullcontext()


def sampling_rows(sample_requests: list[ScheduledRequest], grammar: GrammarBitmask | None = None) -> list[SamplingRow]:
    """The sampler's row for each sampled request, in order (StepInputs.sample_requests)."""
    bits = grammar.rows() if grammar is not None else {}
    return [SamplingRow(s.request.sampling_params, s.request.prompt_token_ids, s.request.output_token_ids,
                        s.request.generator, bits.get(s.request.request_id)) for s in sample_requests]


@torch.inference_mode()
def sample_step(sampler: Sampler, logits: torch.Tensor, step: StepInputs, rows: list[SamplingRow]) -> ModelRunnerOutput:
    """logits [prompt-logprob rows + sampled rows, V]; rows: the sampled rows' SamplingRow, in order."""
    output = ModelRunnerOutput()
    num_prompt_rows = logits.shape[0] - len(step.sample_requests)
    if step.prompt_logprob_rows:
        logprobs = torch.log_softmax(logits[:num_prompt_rows], dim=-1)
        for request_id, (first, start, targets, k) in step.prompt_logprob_rows.items():
            num_top = logits.shape[-1] if k == -1 else k
            rows_logprobs = logprobs[first : first + len(targets)]
            output.prompt_logprobs[request_id] = (start, gather_logprobs(rows_logprobs, targets, [num_top] * len(targets)))
    if step.sample_requests:
        tokens, logprobs = sampler(logits[num_prompt_rows:], rows)
        for s, token, lp in zip(step.sample_requests, tokens, logprobs):
            request_id = s.request.request_id
            if token is None:
                output.failed[request_id] = ("structured_outputs", "no token is allowed: the structured outputs "
                                             "constraint and the other sampling parameters (allowed_token_ids, "
                                             "min_tokens, bad_words, logit_bias) exclude every token")
                continue
            output.sampled_token_ids[request_id] = token
            if lp is not None:
                output.logprobs[request_id] = lp
    return output


class PoolingModelRunner:
    """Pooling: requests run whole (no chunking, no KV cache); each one's hidden rows are its whole prompt."""

    def __init__(self, model: nn.Module, backend: AttentionBackend, block_size: int, device: torch.device,
                 pooler: Pooler):
        self.model = model
        self.kv_caches: dict[int, torch.Tensor] = {}
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.pooler = pooler

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        step = prepare_inputs(scheduler_output.scheduled, self.block_size, self.device)
        with forward_context(ForwardContext(step.metadata, self.kv_caches, self.backend)):
            hidden = self.model(step.input_ids, step.positions, step.token_type_ids)  # [T, H]
        rows, token_ids, params, ids = [], [], [], []
        offset = 0
        for item in scheduler_output.scheduled:
            if item.produces_output:
                assert item.start == 0, "a pooling request must be scheduled whole"
                rows.append(hidden[offset : offset + item.num_new_tokens])
                token_ids.append(item.request.prompt_token_ids)
                params.append(item.request.pooling_params)
                ids.append(item.request.request_id)
            offset += item.num_new_tokens
        pooled = self.pooler(rows, token_ids, params) if rows else []
        return ModelRunnerOutput(pooled={i: p.cpu() for i, p in zip(ids, pooled)})
