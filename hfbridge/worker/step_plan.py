"""What the driver sends the ranks of a multi-process engine (mp, Ray) each generation step, and what it gets back.

Requests stay on the driver. A rank keeps, per running request, only what its forward needs: the token ids and
the block table (RankRequest). Each step the driver sends the deltas: the tokens and blocks added since the rank
last saw the request, and the ids of requests it should forget (finished or preempted; a preempted request comes
back as new). The output rank gathers the logits [N, V] and returns only what the driver's sampler needs: the
argmax of each row whose token is its argmax and nothing else (greedy, no logprobs, no logit processors), the full
row for the others (sampling, logprobs, prompt logprobs, structured outputs).

Sizes for a decode step of 64 requests: the message is a few KiB however long the contexts are (the whole
SchedulerOutput with its Requests grew with every token), and the reply 64 integers instead of 64 x V float32
(39 MB for V = 152k)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hfbridge.core.request import Request
from hfbridge.core.scheduler_output import ScheduledRequest, SchedulerOutput
from hfbridge.lora.request import LoRARequest
from hfbridge.sample.argmax_cpu import row_argmax


@dataclass(frozen=True)
class NewRequest:
    """What a rank learns once, the first time it sees a request (again, after a preemption)."""

    num_prompt_tokens: int
    prompt_logprobs: int | None  # the request's SamplingParams.prompt_logprobs
    lora_request: LoRARequest | None = None  # the adapter its tokens run under (enable_lora)


@dataclass(frozen=True)
class RequestDelta:
    request_id: str
    new_token_ids: list[int]  # the tokens the rank lacks: the whole prompt at first, then the sampled ones
    new_block_ids: list[int]  # the blocks appended to the request's table since the rank last saw it
    start: int
    num_new_tokens: int
    produces_output: bool
    new: NewRequest | None = None  # set when the rank has no copy of the request


@dataclass(frozen=True)
class StepPlan:
    deltas: list[RequestDelta]
    forget: list[str] = field(default_factory=list)  # finished or preempted since the last step
    argmax_rows: list[int] = field(default_factory=list)  # indices of the step's sampled rows: return the argmax


@dataclass(frozen=True)
class StepLogits:
    """The output rank's reply: `logits` holds the prompt-logprob rows, then the sampled rows not in
    `argmax_rows`, in step order; `argmax_tokens` the tokens of the argmax rows, in order."""

    logits: torch.Tensor  # [N - len(argmax_tokens), V] float32
    argmax_tokens: list[int]


@dataclass
class _Sent:
    request: Request
    num_tokens: int  # all_token_ids[:num_tokens] are on the ranks
    num_blocks: int


class StepPlanner:
    """The driver's record of what the ranks hold; `plan` turns a SchedulerOutput into the step's deltas."""

    def __init__(self):
        self._sent: dict[str, _Sent] = {}

    def plan(self, output: SchedulerOutput, argmax_rows: list[int]) -> StepPlan:
        forget = [r for r in output.preempted_request_ids if self._sent.pop(r, None) is not None]
        finished = [r for r, s in self._sent.items() if s.request.status.is_finished]
        for request_id in finished:
            del self._sent[request_id]
        deltas = []
        for item in output.scheduled:
            request = item.request
            sent = self._sent.get(request.request_id)
            new = None
            if sent is None:
                prompt_logprobs = request.sampling_params.prompt_logprobs if request.sampling_params else None
                new = NewRequest(request.num_prompt_tokens, prompt_logprobs, request.lora_request)
                sent = self._sent[request.request_id] = _Sent(request, 0, 0)
            # the whole prompt at once: prompt logprobs read the prompt token after a chunk's end
            end = max(item.end, request.num_prompt_tokens)
            deltas.append(RequestDelta(
                request.request_id, request.all_token_ids[sent.num_tokens : end],
                item.block_ids[sent.num_blocks :], item.start, item.num_new_tokens, item.produces_output, new,
            ))
            sent.num_tokens = max(sent.num_tokens, end)
            sent.num_blocks = len(item.block_ids)
        return StepPlan(deltas, forget + finished, argmax_rows)


class _SamplingView:
    """The one SamplingParams field the packing reads (prompt_logprobs)."""

    __slots__ = ("prompt_logprobs",)

    def __init__(self, prompt_logprobs: int | None):
        self.prompt_logprobs = prompt_logprobs


class RankRequest:
    """A rank's copy of a running request: the attributes of Request that step_inputs.prepare_inputs reads."""

    token_type_ids = None  # generation requests carry no segment ids

    def __init__(self, request_id: str, new: NewRequest):
        self.request_id = request_id
        self.all_token_ids: list[int] = []
        self.block_ids: list[int] = []
        self.num_prompt_tokens = new.num_prompt_tokens
        self.sampling_params = _SamplingView(new.prompt_logprobs)
        self.lora_request = new.lora_request

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.all_token_ids[: self.num_prompt_tokens]

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params.prompt_logprobs is not None


class RankRequests:
    """A rank's running requests, kept in step with the driver's StepPlanner."""

    def __init__(self):
        self._requests: dict[str, RankRequest] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def apply(self, plan: StepPlan) -> list[ScheduledRequest]:
        """The plan's deltas applied; the step's scheduled requests, for prepare_inputs."""
        for request_id in plan.forget:
            self._requests.pop(request_id, None)
        scheduled = []
        for delta in plan.deltas:
            if delta.new is not None:
                self._requests[delta.request_id] = RankRequest(delta.request_id, delta.new)
            request = self._requests[delta.request_id]
            request.all_token_ids.extend(delta.new_token_ids)
            request.block_ids.extend(delta.new_block_ids)
            scheduled.append(ScheduledRequest(request, delta.num_new_tokens, delta.start, list(request.block_ids),
                                              delta.produces_output))
        return scheduled


def reply_for(logits: torch.Tensor, num_sampled: int, argmax_rows: list[int]) -> StepLogits:
    """logits [prompt rows + num_sampled, V] -> the reply: argmax rows reduced to their token."""
    if not argmax_rows:
        return StepLogits(logits, [])
    first = logits.shape[0] - num_sampled
    picked = torch.tensor([first + i for i in argmax_rows], dtype=torch.long, device=logits.device)
    keep = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    keep[picked] = False
    return StepLogits(logits[keep].cpu(), row_argmax(logits[picked]).tolist())
