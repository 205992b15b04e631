"""The part of completions and chat that is the same: prompts -> checked SamplingParams (with max_tokens
fitted to the context) -> engine requests -> one ordered stream of outputs, aborted if the client leaves."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from hfbridge.engine.input_processor import truncate_tokens
from hfbridge.engine.async_engine import AsyncLLMEngine, RequestStream
from hfbridge.sample.bad_words import tokenize_bad_words
from hfbridge.errors import ValidationError
from hfbridge.multimodal.inputs import MultiModalInputs
from hfbridge.outputs import RequestOutput
from hfbridge.sample.sampling_params import RequestOutputKind, SamplingParams
from hfbridge.server.errors import APIError, set_request_log_id
from hfbridge.server.metrics import RequestTimer
from hfbridge.server.protocol import GenerationRequest
from hfbridge.server.state import ModelCard, ServingState


@dataclass(frozen=True)
class PreparedPrompt:
    text: str | None
    token_ids: list[int]
    params: SamplingParams
    mm_inputs: MultiModalInputs | None = None  # the prompt's images, processed (a vision-language model)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": None,
        }


def new_response_id(prefix: str, body: GenerationRequest, http_request: web.Request) -> str:
    """The response's id (vLLM's: the body's request_id, else X-Request-Id, else random); the request's log lines
    and its engine requests (f"{id}-{prompt index}") carry it."""
    response_id = f"{prefix}-{body.request_id or http_request.headers.get('X-Request-Id') or uuid.uuid4().hex}"
    set_request_log_id(http_request, response_id)
    return response_id


def tokenize(tokenizer: Any, prompt: str | list[int], add_special_tokens: bool) -> tuple[str | None, list[int]]:
    if isinstance(prompt, str):
        return prompt, list(tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids)
    return None, list(prompt)


def fit_max_tokens(requested: int | None, default: int | None, num_prompt_tokens: int, card: ModelCard,
                   strict: bool, param: str, prompt_param: str) -> int:
    """max_tokens that fits the context. Beyond it: clamped (vLLM 0.33, what clients like Zed and LangChain
    expect), or a 400 with --strict-max-tokens. A prompt that leaves no room at all is always a 400."""
    room = card.max_model_len - num_prompt_tokens
    if room < 1:
        raise APIError(
            400,
            f"This model's maximum context length is {card.max_model_len} tokens. However, your prompt contains "
            f"{num_prompt_tokens} input tokens, which leaves no room for output. Shorten the prompt, or restart "
            "the server with a larger --max-model-len if the model supports it.",
            prompt_param,
        )
    value = requested if requested is not None else (default if default is not None else room)
    if value < 1:
        raise APIError(400, f"{param} must be at least 1, got {value}.", param)
    if value > room and strict:
        raise APIError(
            400,
            f"{param}={value} is more than the {room} tokens left in the context: the maximum context length is "
            f"{card.max_model_len} tokens and the prompt has {num_prompt_tokens}. Lower {param}, or leave it "
            "unset to use what is left.",
            param,
        )
    return min(value, room)


def prepare_prompt(state: ServingState, request: GenerationRequest, prompt: str | list[int], *,
                   logprobs: int | None, prompt_logprobs: int | None, default_max_tokens: int | None,
                   max_tokens_param: str, prompt_param: str,
                   bad_words_token_ids: list[list[int]] | None = None, images: list | None = None) -> PreparedPrompt:
    """Runs on the tokenizer thread: tokenizing the prompt and the bad words, and parsing a constraint, take
    milliseconds to seconds that the event loop and the engine thread must not wait for."""
    engine, card = state.require_engine()
    tokenizer = engine.engine.get_tokenizer()
    mm_inputs = None
    if images:  # the processor expands each image's placeholders while it tokenizes
        if request.sampling.get("truncate_prompt_tokens"):
            raise APIError(400, "truncate_prompt_tokens cannot cut a prompt with images (it could cut an image's "
                                "placeholders); shorten the text instead", "truncate_prompt_tokens")
        text, (token_ids, mm_inputs) = prompt, engine.engine.mm_processor.process(
            prompt, None, {"image": images}, request.add_special_tokens)
    else:
        text, token_ids = tokenize(tokenizer, prompt, request.add_special_tokens)
    # Truncated here rather than only in the engine, so max_tokens is fitted to the prompt actually run (0 means
    # none; other values out of range are refused by SamplingParams below).
    truncate = request.sampling.get("truncate_prompt_tokens") or None
    kept = truncate_tokens(token_ids, truncate if truncate is None or truncate >= -1 else 1, card.max_model_len)
    if len(kept) < len(token_ids):
        text, token_ids = None, kept  # echo (and the output's `prompt`) shows what the model sees: the kept tokens
    defaults = {k: v for k, v in card.default_sampling.items() if k != "max_tokens"}
    max_tokens = fit_max_tokens(request.max_tokens, default_max_tokens, len(token_ids), card,
                                state.settings.strict_max_tokens, max_tokens_param, prompt_param)
    kwargs = {**defaults, **request.sampling, "max_tokens": max_tokens, "logprobs": logprobs}
    if prompt_logprobs is not None and kwargs.get("prompt_logprobs") is None:
        kwargs["prompt_logprobs"] = prompt_logprobs
    params = SamplingParams(**kwargs)  # ValidationError (vLLM's wording) -> 400 in the middleware
    if params.bad_words:
        params.bad_words_token_ids = bad_words_token_ids or tokenize_bad_words(
            params.bad_words, tokenizer, engine.engine.vocab_size)
    if params.structured_outputs is not None:  # parsed here, off the engine thread; cached for the engine
        engine.engine.structured_outputs.validate(params.structured_outputs)
    params.output_kind = RequestOutputKind.DELTA  # the route assembles full texts itself when not streaming
    return PreparedPrompt(text, token_ids, params, mm_inputs)


async def prepare_prompts(state: ServingState, request: GenerationRequest, prompts: list[str | list[int]],
                          **kwargs: Any) -> list[PreparedPrompt]:
    """prepare_prompt for each prompt, on the tokenizer thread (a 15 MB prompt takes seconds to tokenize); the
    bad words are tokenized once for all of them."""
    def prepare_all() -> list[PreparedPrompt]:
        prepared: list[PreparedPrompt] = []
        for prompt in prompts:
            bad_words = prepared[0].params.bad_words_token_ids if prepared else None
            prepared.append(prepare_prompt(state, request, prompt, bad_words_token_ids=bad_words, **kwargs))
        return prepared

    return await state.off_loop(prepare_all)


async def submit(engine: AsyncLLMEngine, response_id: str, prompts: list[PreparedPrompt],
                 request: GenerationRequest, lora_request: Any = None) -> list[RequestStream]:
    """Add every prompt's request in one engine command (one step for all), or none of them."""
    requests = []
    for i, prepared in enumerate(prompts):
        engine_prompt: dict[str, Any] = {"prompt_token_ids": prepared.token_ids}
        if prepared.text is not None:
            engine_prompt["prompt"] = prepared.text
        if request.cache_salt is not None:
            engine_prompt["cache_salt"] = request.cache_salt
        if prepared.mm_inputs is not None:
            engine_prompt["multi_modal_data"] = prepared.mm_inputs
        requests.append((f"{response_id}-{i}", engine_prompt, prepared.params, True, request.priority, lora_request))
    try:
        return await engine.add_requests(requests)
    except ValueError as e:
        if isinstance(e, ValidationError):
            raise
        raise APIError(400, str(e)) from e  # e.g. a client-chosen request_id already in flight


@dataclass
class OutputMerger:
    """Outputs of several requests (one per prompt) as one stream of (prompt index, output).

    Its seats in the server's queue (n per prompt) are held until each request finishes or is aborted."""

    engine: AsyncLLMEngine
    streams: list[RequestStream]
    timers: list[RequestTimer]
    seats: list[int]  # per stream: the sequences it holds in the server's queue
    release: Callable[[int], None]
    usage: Usage = field(default_factory=Usage)

    @asynccontextmanager
    async def outputs(self) -> AsyncIterator[AsyncIterator[tuple[int, RequestOutput]]]:
        """`async with merger.outputs() as outputs: async for i, output in outputs: ...` -- the guard: leaving
        the block by any path (a disconnect before the first write included) aborts what is unfinished at once.
        A context manager, not a generator's `finally`: an async generator never started never runs its finally."""
        merged = self._merge()
        try:
            yield merged
        finally:
            await merged.aclose()
            # Leaving early (a disconnect, an error, a cancelled handler) frees the requests' KV blocks at once.
            for i, (stream, timer) in enumerate(zip(self.streams, self.timers)):
                if not stream.finished:
                    self.engine.abort(stream.request_id)
                timer.on_output(0, "abort")  # a no-op for a request already counted as finished
                self._free(i)

    def _free(self, index: int) -> None:
        if self.seats[index]:
            self.release(self.seats[index])
            self.seats[index] = 0

    async def _merge(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        queue: asyncio.Queue[tuple[int, RequestOutput | Exception]] = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for output in stream:
                    queue.put_nowait((index, output))
            except Exception as e:  # noqa: BLE001 - re-raised by the consumer below
                queue.put_nowait((index, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(self.streams)
            while remaining:
                index, item = await queue.get()
                if isinstance(item, Exception):
                    self.timers[index].on_output(0, "error")  # counted in /metrics like any other ending
                    raise item
                num_new = sum(len(c.token_ids) for c in item.outputs)
                self.usage.completion_tokens += num_new
                reason = (item.outputs[0].finish_reason or "abort") if item.finished and item.outputs else None
                self.timers[index].on_output(num_new, reason, item)
                if item.finished:
                    remaining -= 1
                    self._free(index)
                yield index, item
        finally:
            for task in tasks:
                task.cancel()


async def start(state: ServingState, response_id: str, prompts: list[PreparedPrompt],
                request: GenerationRequest) -> OutputMerger:
    """Take seats in the queue (503 when full), then submit. Enter `merger.outputs()` right after, with no
    await in between, so a client that leaves at any later point has its requests aborted."""
    engine, _ = state.require_engine()
    seats = [p.params.n for p in prompts]
    state.admit(sum(seats))
    try:
        streams = await submit(engine, response_id, prompts, request, state.loras.get(request.model))
    except BaseException:
        state.release(sum(seats))
        raise
    timers = [state.metrics.timer() for _ in prompts]
    merger = OutputMerger(engine, streams, timers, seats, state.release)
    merger.usage.prompt_tokens = sum(len(p.token_ids) for p in prompts)
    return merger


@dataclass
class Choice:
    """One choice's output gathered from DELTA outputs (non-streaming responses)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


async def collect(outputs: AsyncIterator[tuple[int, RequestOutput]], num_samples: int
                  ) -> tuple[dict[int, Choice], dict[int, RequestOutput]]:
    """Every choice (index prompt * n + sample, as OpenAI numbers them) and the last output of each prompt
    (its prompt_logprobs are complete)."""
    choices: dict[int, Choice] = {}
    last: dict[int, RequestOutput] = {}
    async for prompt_index, output in outputs:
        last[prompt_index] = output
        for completion in output.outputs:
            choice = choices.setdefault(prompt_index * num_samples + completion.index, Choice())
            choice.text += completion.text
            choice.token_ids += completion.token_ids
            choice.logprobs += completion.logprobs or []
            choice.finish_reason, choice.stop_reason = completion.finish_reason, completion.stop_reason
    return dict(sorted(choices.items())), last
