"""Turns new tokens into RequestOutputs: detokenizes, applies stop conditions, builds vLLM's output shapes."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hfbridge.engine.detokenizer import IncrementalDetokenizer, decode_token
from hfbridge.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestMetrics, RequestOutput
from hfbridge.pooling.pooling_outputs import PoolingOutput, PoolingRequestOutput
from hfbridge.core.request import Request, RequestStatus
from hfbridge.sample.sampling_params import RequestOutputKind, SamplingParams
from hfbridge.core.scheduler_output import ModelRunnerOutput
from hfbridge.sample.logprobs import SampledLogprobs


@dataclass
class RequestState:
    """The output side of one engine request (one sample; n > 1 has a parent grouping several)."""

    request_id: str
    parent_id: str
    index: int  # sample index within the parent
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: PromptLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int | None = None
    sent_text: int = 0  # offsets already emitted, for DELTA outputs
    sent_tokens: int = 0
    arrival_time: float = 0.0  # engine time.monotonic() stamps, for RequestOutput.metrics
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def stop_buffer(self) -> int:
        """Characters held back from streamed text while a stop string could still be completing."""
        if not self.params.stop or self.params.include_stop_str_in_output:
            return 0
        return max(len(s) for s in self.params.stop) - 1

    @property
    def has_all_prompt_logprobs(self) -> bool:
        """Whether every prompt position that has a logprob has it (trivially, when none were asked for)."""
        if self.params.prompt_logprobs is None or len(self.prompt_token_ids) < 2:
            return True
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) >= len(self.prompt_token_ids)


@dataclass
class ParentState:
    request_id: str
    num_samples: int
    kind: RequestOutputKind
    children: dict[int, RequestState] = field(default_factory=dict)
    num_live: int = 0  # children still in OutputProcessor.states


@dataclass(frozen=True)
class PoolingState:
    user_id: str  # the id the request was added with (the engine's own id may differ, see LLMEngine)
    prompt: str | None
    prompt_token_ids: list[int]


class OutputProcessor:
    def __init__(self, tokenizer: Any, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        # Keys: `states` and `pooling` by the engine's request id, `parents` and `pooling_ids` by the user's.
        self.states: dict[str, RequestState] = {}
        self.parents: dict[str, ParentState] = {}
        self.pooling: dict[str, PoolingState] = {}
        self.pooling_ids: dict[str, str] = {}  # user id -> engine id of a pooling request

    def add_request(self, request: Request, parent_id: str, index: int, num_samples: int, prompt: str | None) -> None:
        params = request.sampling_params
        detok = None
        if params.detokenize and self.tokenizer is not None:
            detok = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, params.skip_special_tokens,
                params.spaces_between_special_tokens,
            )
        state = RequestState(
            request.request_id, parent_id, index, prompt, request.prompt_token_ids, params, detok,
            logprobs=[] if params.logprobs is not None else None,
            cumulative_logprob=0.0 if params.logprobs is not None else None,
            arrival_time=request.arrival_time,
        )
        self.states[request.request_id] = state
        parent = self.parents.setdefault(parent_id, ParentState(parent_id, num_samples, params.output_kind))
        parent.children[index] = state
        parent.num_live += 1

    def add_pooling_request(self, request: Request, user_id: str, prompt: str | None) -> None:
        self.pooling[request.request_id] = PoolingState(user_id, prompt, request.prompt_token_ids)
        self.pooling_ids[user_id] = request.request_id

    def has_request(self, user_id: str) -> bool:
        """A user request id still in flight."""
        return user_id in self.parents or user_id in self.pooling_ids

    def is_engine_id_used(self, request_id: str) -> bool:
        return request_id in self.states or request_id in self.pooling

    def engine_ids(self, user_id: str) -> list[str]:
        """The engine's ids of a user request (its n samples, or its one pooling request); [] if unknown."""
        parent = self.parents.get(user_id)
        if parent is not None:
            return [c.request_id for c in parent.children.values() if c.request_id in self.states]
        pooling_id = self.pooling_ids.get(user_id)
        return [pooling_id] if pooling_id is not None else []

    def user_id(self, request_id: str) -> str | None:
        """The user's id of an engine request."""
        state = self.states.get(request_id)
        if state is not None:
            return state.parent_id
        pooling = self.pooling.get(request_id)
        return pooling.user_id if pooling is not None else None

    def process(
        self, advanced: list[Request], runner_output: ModelRunnerOutput, grammar_ended: set[str] = frozenset()
    ) -> tuple[list[RequestOutput], dict[str, RequestStatus]]:
        """Returns the outputs to emit and the requests that finished this step (with how). grammar_ended: requests
        whose structured-outputs grammar accepted its end with this token (they stop, as vLLM stops them)."""
        finished: dict[str, RequestStatus] = {}
        touched: dict[str, None] = {}
        for request_id, (start, entries) in runner_output.prompt_logprobs.items():
            state = self.states.get(request_id)
            if state is not None:
                self._add_prompt_logprobs(state, start, entries)
        for request in advanced:
            state = self.states[request.request_id]
            if state.num_cached_tokens is None:
                state.num_cached_tokens = max(request.num_cached_tokens, 0)
            status = self._append(state, request, runner_output.logprobs.get(request.request_id),
                                  request.request_id in grammar_ended)
            if status is not None:
                finished[request.request_id] = status
            touched[state.parent_id] = None
        outputs: list = [out for parent_id in touched if (out := self._make_output(parent_id)) is not None]
        for request_id in finished:
            self._remove(request_id)
        for request_id, data in runner_output.pooled.items():  # pooling requests end with their one step
            pooling = self._pop_pooling(request_id)
            outputs.append(PoolingRequestOutput(
                pooling.user_id, PoolingOutput(data), pooling.prompt_token_ids, prompt=pooling.prompt
            ))
            finished[request_id] = RequestStatus.FINISHED_STOPPED
        return outputs, finished

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        """Mark engine requests aborted; returns the final outputs of parents that end because of it, one per
        parent however many of its samples ended (linear in the number of samples)."""
        parents: dict[str, None] = {}
        for request_id in request_ids:
            if request_id in self.pooling:
                self._pop_pooling(request_id)
            state = self.states.get(request_id)
            if state is not None:
                state.finish_reason = RequestStatus.FINISHED_ABORTED.value
                parents[state.parent_id] = None
        outputs = [out for parent_id in parents if (out := self._make_output(parent_id)) is not None]
        for request_id in request_ids:
            if request_id in self.states:
                self._remove(request_id)
        return outputs

    def _pop_pooling(self, request_id: str) -> PoolingState:
        pooling = self.pooling.pop(request_id)
        del self.pooling_ids[pooling.user_id]
        return pooling

    def _add_prompt_logprobs(self, state: RequestState, start: int, entries: list[SampledLogprobs]) -> None:
        """entries[i] belongs to prompt position start + i + 1 (the token it predicts); a request recomputed
        after preemption sends positions it already sent: each position is kept once."""
        if state.prompt_logprobs is None:
            state.prompt_logprobs = [None]  # the first prompt token has no logprob
        num_known = len(state.prompt_logprobs) - 1
        assert start <= num_known, f"prompt logprobs of {state.request_id} skip positions {num_known}..{start}"
        state.prompt_logprobs.extend(self._logprob_dict(e) for e in entries[num_known - start :])

    def _append(self, state: RequestState, request: Request, logprobs: SampledLogprobs | None,
                grammar_ended: bool = False) -> RequestStatus | None:
        token = request.output_token_ids[-1]
        params = state.params
        state.token_ids.append(token)
        state.last_token_time = time.monotonic()
        if state.first_token_time is None:
            state.first_token_time, state.first_scheduled_time = state.last_token_time, request.first_scheduled_time
        if logprobs is not None:
            state.logprobs.append(self._logprob_dict(logprobs))
            state.cumulative_logprob += logprobs.logprobs[0]

        status, stop_reason = None, None
        if request.num_output_tokens >= (params.max_tokens or self.max_model_len) or request.num_tokens >= self.max_model_len:
            status = RequestStatus.FINISHED_LENGTH_CAPPED
        elif request.num_output_tokens >= params.min_tokens and token in params.all_stop_token_ids:
            status = RequestStatus.FINISHED_STOPPED
            stop_reason = token if token in params.stop_token_ids else None
        elif grammar_ended:
            status = RequestStatus.FINISHED_STOPPED
        stopped_by_token = status is RequestStatus.FINISHED_STOPPED
        if state.detokenizer is not None and (not stopped_by_token or params.include_stop_str_in_output):
            previous = len(state.text)
            state.text += state.detokenizer.add_token(token)
            if status is not None:
                state.text += state.detokenizer.flush()
            if params.stop and request.num_output_tokens >= params.min_tokens:
                hit = _find_stop(state.text, params.stop, previous)
                if hit is not None:
                    position, stop = hit
                    end = position + len(stop) if params.include_stop_str_in_output else position
                    state.text = state.text[:end]
                    status, stop_reason = RequestStatus.FINISHED_STOPPED, stop
        if stopped_by_token and state.detokenizer is not None and not params.include_stop_str_in_output:
            state.text += state.detokenizer.flush()
        if status is not None:
            state.finish_reason, state.stop_reason = status.value, stop_reason
        return status

    def _logprob_dict(self, entry: SampledLogprobs) -> dict[int, Logprob]:
        out: dict[int, Logprob] = {}
        for token_id, logprob, rank in zip(entry.token_ids, entry.logprobs, entry.ranks):
            if token_id not in out:
                decoded = decode_token(self.tokenizer, token_id) if self.tokenizer is not None else None
                out[token_id] = Logprob(logprob, rank, decoded)
        return out

    def _make_output(self, parent_id: str) -> RequestOutput | None:
        parent = self.parents[parent_id]
        children = [parent.children[i] for i in sorted(parent.children)]
        all_done = len(children) == parent.num_samples and all(c.finish_reason is not None for c in children)
        if parent.kind is RequestOutputKind.FINAL_ONLY and not all_done:
            return None
        first = children[0]
        if not all_done and not first.has_all_prompt_logprobs:
            # Sample 0 computes the prompt logprobs its siblings share; a sibling ahead of it waits (its deltas
            # accumulate), so no output carries half of them.
            return None
        completions = [self._completion(c, delta=parent.kind is RequestOutputKind.DELTA) for c in children]
        return RequestOutput(
            request_id=parent_id,
            prompt=first.prompt,
            prompt_token_ids=first.prompt_token_ids,
            prompt_logprobs=first.prompt_logprobs,
            outputs=completions,
            finished=all_done,
            num_cached_tokens=first.num_cached_tokens,
            metrics=RequestMetrics(first.arrival_time, first.first_scheduled_time, first.first_token_time,
                                   first.last_token_time),
        )

    @staticmethod
    def _completion(state: RequestState, delta: bool) -> CompletionOutput:
        finished = state.finish_reason is not None
        visible = len(state.text) if finished else max(len(state.text) - state.stop_buffer, 0)
        if delta:
            text = state.text[state.sent_text : visible] if visible > state.sent_text else ""
            token_ids = state.token_ids[state.sent_tokens :]
            logprobs = state.logprobs[state.sent_tokens :] if state.logprobs is not None else None
            state.sent_text = max(state.sent_text, visible)
            state.sent_tokens = len(state.token_ids)
        else:
            text, token_ids, logprobs = state.text[:visible], list(state.token_ids), state.logprobs
        return CompletionOutput(
            index=state.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=state.cumulative_logprob,
            logprobs=list(logprobs) if logprobs is not None else None,
            finish_reason=state.finish_reason,
            stop_reason=state.stop_reason,
        )

    def _remove(self, request_id: str) -> None:
        state = self.states.pop(request_id)
        parent = self.parents[state.parent_id]
        parent.num_live -= 1
        if parent.num_live == 0 and len(parent.children) == parent.num_samples:
            del self.parents[state.parent_id]


def _find_stop(text: str, stops: list[str], previous_len: int) -> tuple[int, str] | None:
    """Earliest stop string that ends in the newly added text."""
    best: tuple[int, str] | None = None
    for stop in stops:
        position = text.find(stop, max(0, previous_len - len(stop) + 1))
        if position != -1 and (best is None or position < best[0]):
            best = (position, stop)
    return best
