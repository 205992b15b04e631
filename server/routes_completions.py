"""POST /v1/completions: prompts (text or token ids) in, OpenAI `text_completion` objects or SSE chunks out."""
from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from hfbridge.engine.detokenizer import decode_token
from hfbridge.server.errors import read_json_object
from hfbridge.server.generation import OutputMerger, collect, new_response_id, prepare_prompts, start
from hfbridge.server.logprobs import CompletionLogprobs, merge_completion_logprobs, prompt_logprobs_json
from hfbridge.server.protocol import CompletionRequest, parse_completion_request
from hfbridge.server.sse import EventStream
from hfbridge.server.state import STATE, ServingState

DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for completions


async def create_completion(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = parse_completion_request(await read_json_object(request))
    model = state.resolve_model(body.model)
    _, card = state.require_engine()
    k = body.logprobs
    prepared = await prepare_prompts(
        state, body, body.prompts, logprobs=k,
        prompt_logprobs=k if body.echo and k is not None else None,
        default_max_tokens=card.default_sampling.get("max_tokens", DEFAULT_MAX_TOKENS),
        max_tokens_param="max_tokens", prompt_param="prompt",
    )
    response_id = new_response_id("cmpl", body, request)
    head = {"id": response_id, "object": "text_completion", "created": int(time.time()), "model": model}
    renderer = _Renderer(state, body, [p.token_ids for p in prepared], [p.text for p in prepared], prepared[0].params.n)
    merger = await start(state, response_id, prepared, body)
    # The abort guard is entered before anything is written: a client gone before its first chunk is aborted too.
    async with merger.outputs() as outputs:
        if body.stream:
            return await _stream(request, outputs, merger, head, renderer, body)
        choices, last = await collect(outputs, renderer.n)
    rendered = []
    prompt_logprobs: dict[int, Any] = {}  # per prompt, rendered once however many choices carry them
    for index, choice in choices.items():
        prompt_index = index // renderer.n
        logprobs = None
        if k is not None:
            logprobs = renderer.logprobs(index, last[prompt_index].prompt_logprobs, choice.token_ids, choice.logprobs)
        rendered.append({
            "index": index, "text": renderer.echo_text(index) + choice.text, "logprobs": logprobs,
            "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason,
        })
        if body.sampling.get("prompt_logprobs") is not None:  # vLLM puts them on the choice, echo or not
            if prompt_index not in prompt_logprobs:
                prompt_logprobs[prompt_index] = prompt_logprobs_json(last[prompt_index].prompt_logprobs,
                                                                     renderer.decode)
            rendered[-1]["prompt_logprobs"] = prompt_logprobs[prompt_index]
    return web.json_response({**head, "choices": rendered, "usage": merger.usage.as_dict()})


class _Renderer:
    """Per-choice echo and logprob state (text_offset runs across chunks)."""

    def __init__(self, state: ServingState, body: CompletionRequest, prompt_ids: list[list[int]],
                 prompt_texts: list[str | None], n: int):
        engine, _ = state.require_engine()
        self.tokenizer = engine.engine.get_tokenizer()
        self.body, self.prompt_ids, self.prompt_texts, self.n = body, prompt_ids, prompt_texts, n
        self.pending_echo = set(range(len(prompt_ids) * n)) if body.echo else set()
        self.logprob_builders: dict[int, CompletionLogprobs] = {}
        self.echoed_logprobs: dict[int, tuple[dict, int]] = {}  # per prompt: its echoed logprobs, their end offset

    def decode(self, token_id: int) -> str:
        return decode_token(self.tokenizer, token_id)

    def echo_text(self, index: int) -> str:
        """The prompt, the first time a choice is rendered with echo on; "" otherwise."""
        if index not in self.pending_echo:
            return ""
        text = self.prompt_texts[index // self.n]
        if text is None:
            text = self.tokenizer.decode(self.prompt_ids[index // self.n])
        return text

    def logprobs(self, index: int, prompt_logprobs: Any, token_ids: list[int], logprobs: list[dict]) -> dict:
        builder = self.logprob_builders.setdefault(index, CompletionLogprobs(self.body.logprobs, self.decode))
        result = None
        if index in self.pending_echo:  # the prompt's part is the same for its n choices: built once
            prompt_index = index // self.n
            if prompt_index not in self.echoed_logprobs:
                echo = CompletionLogprobs(self.body.logprobs, self.decode)
                part = echo.prompt(self.prompt_ids[prompt_index], prompt_logprobs)
                self.echoed_logprobs[prompt_index] = (part, echo.text_offset)
            result, builder.text_offset = self.echoed_logprobs[prompt_index]
        return merge_completion_logprobs(result, builder.sample(token_ids, logprobs))

    def stream_choice(self, prompt_index: int, output: Any, completion: Any) -> dict[str, Any] | None:
        """One streamed choice for this delta; None when there is nothing to send yet (text held back)."""
        index = prompt_index * self.n + completion.index
        wants_tokens = self.body.logprobs is not None and completion.token_ids
        if not (completion.text or completion.finish_reason or wants_tokens or index in self.pending_echo):
            return None  # a token whose text is still held back (a partial character or a possible stop)
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = self.logprobs(index, output.prompt_logprobs, completion.token_ids, completion.logprobs or [])
        choice = {
            "index": index, "text": self.echo_text(index) + completion.text, "logprobs": logprobs,
            "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason,
        }
        self.pending_echo.discard(index)
        return choice


async def _stream(request: web.Request, outputs: Any, merger: OutputMerger, head: dict[str, Any],
                  renderer: _Renderer, body: CompletionRequest) -> web.StreamResponse:
    force_usage = request.app[STATE].settings.enable_force_include_usage
    events = EventStream(request)
    try:
        await events.open()
        async for prompt_index, output in outputs:
            for completion in output.outputs:
                choice = renderer.stream_choice(prompt_index, output, completion)
                if choice is None:
                    continue
                chunk = {**head, "choices": [choice]}
                if body.continuous_usage or force_usage:
                    chunk["usage"] = merger.usage.as_dict()
                await events.send(chunk)
        if body.include_usage or force_usage:
            await events.send({**head, "choices": [], "usage": merger.usage.as_dict()})
    except Exception as e:  # noqa: BLE001 - the stream reports it, or ends quietly if the client left
        return await events.fail(e)
    return await events.close()
