"""A request inside the engine: its tokens and how far the model has computed them."""
from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hfbridge.lora.request import LoRARequest
    from hfbridge.multimodal.inputs import MultiModalInputs
    from hfbridge.sample.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH_CAPPED = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_ABORTED)


class Request:
    """There is no prefill or decode phase: `num_computed_tokens` catches up with `num_tokens`."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None = None,
        arrival_time: float | None = None,
        generator: torch.Generator | None = None,
        pooling_params=None,
        token_type_ids: list[int] | None = None,
        group_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
        mm_inputs: MultiModalInputs | None = None,
    ):
        self.request_id = request_id
        # The user request this one belongs to (the n samples of a request share it); the scheduler admits
        # waiting requests round-robin across groups.
        self.group_id = request_id if group_id is None else group_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.pooling_params = pooling_params
        self.token_type_ids = token_type_ids  # segment ids of a sentence pair (cross-encoders)
        self.priority = priority  # lower runs first under --scheduling-policy priority (vLLM's order)
        self.cache_salt = cache_salt  # prefix-cache entries are shared only between requests of one salt
        self.lora_request = lora_request  # the adapter its tokens run under; part of its block hashes too
        self.mm_inputs = mm_inputs  # its images (a vision-language model); part of its block hashes too
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None  # time.monotonic() when it first got a step
        self.generator = generator  # per-request RNG when SamplingParams.seed is set
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first scheduling; -1 until then
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.block_hashes: list[bytes] = []  # hashes of the full blocks of all_token_ids, chained from the start

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params is not None and self.sampling_params.prompt_logprobs is not None

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
            f"{self.status.value})"
        )
