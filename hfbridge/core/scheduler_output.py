"""What the scheduler hands to the executor for one step, and what comes back."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hfbridge.core.request import Request
from hfbridge.sample.logprobs import SampledLogprobs


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step: all_token_ids[start:start + num_new_tokens]
    start: int  # = request.num_computed_tokens when scheduled (includes this step's prefix-cache hit)
    block_ids: list[int]
    produces_output: bool  # this step reaches the last known token: the next one is sampled (or the prompt pooled)

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass(frozen=True)
class GrammarBitmask:
    """The allowed next tokens of a step's constrained rows (structured outputs): row i is request_ids[i]'s."""

    request_ids: list[str]
    bits: torch.Tensor  # [C, ceil(V / 32)] int32: bit j of word w allows token 32 * w + j

    def rows(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.request_ids, self.bits))


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_scheduled_tokens: int
    preempted_request_ids: list[str] = field(default_factory=list)
    # Set by the engine after scheduling; read where the step samples (the driver, for multi-process executors,
    # which send it to no worker).
    grammar_bitmask: GrammarBitmask | None = None

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class ModelRunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, SampledLogprobs] = field(default_factory=dict)
    # request id -> (first prompt position, one entry per prompt position computed this step that predicts a
    # prompt token). A preempted request recomputes its prompt from position 0: the start says which of the
    # entries are already known.
    prompt_logprobs: dict[str, tuple[int, list[SampledLogprobs]]] = field(default_factory=dict)
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)
    # request id -> (the parameter at fault, why the request got no token): every token was masked (its grammar
    # and its other parameters disagree), or its images make more or fewer rows than it has placeholders
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)
