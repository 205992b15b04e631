"""What generation returns, with vLLM's names: RequestOutput, CompletionOutput, Logprob."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1-based rank in the vocabulary
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id; None for EOS
    lora_request: Any = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestMetrics:
    """When a request (its first sample) arrived, first got a step, got its first and its latest token:
    time.monotonic() seconds of the engine's process; None until it happened."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None


class RequestOutput:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        prompt_logprobs: PromptLogprobs | None,
        outputs: list[CompletionOutput],
        finished: bool,
        num_cached_tokens: int | None = None,
        metrics: Any = None,
        lora_request: Any = None,
        **kwargs: Any,
    ):
        if kwargs:
            logger.warning("RequestOutput ignores unknown arguments: %s", sorted(kwargs))
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs = prompt_logprobs
        self.outputs = outputs
        self.finished = finished
        self.num_cached_tokens = num_cached_tokens
        self.metrics = metrics
        self.lora_request = lora_request

    def add(self, next_output: RequestOutput, aggregate: bool) -> None:
        """Merge a later output of the same request (aggregate=True appends deltas, else replaces)."""
        self.finished |= next_output.finished
        self.num_cached_tokens = next_output.num_cached_tokens
        for nxt in next_output.outputs:
            mine = next((c for c in self.outputs if c.index == nxt.index), None)
            if mine is None:
                self.outputs.append(nxt)
            elif aggregate:
                mine.text += nxt.text
                mine.token_ids = [*mine.token_ids, *nxt.token_ids]
                if nxt.logprobs is not None:
                    mine.logprobs = [*(mine.logprobs or []), *nxt.logprobs]
                mine.cumulative_logprob = nxt.cumulative_logprob
                mine.finish_reason, mine.stop_reason = nxt.finish_reason, nxt.stop_reason
            else:
                self.outputs[self.outputs.index(mine)] = nxt
        self.outputs.sort(key=lambda c: c.index)

    def __repr__(self) -> str:
        return (
            f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, outputs={self.outputs}, finished={self.finished}, "
            f"num_cached_tokens={self.num_cached_tokens})"
        )
