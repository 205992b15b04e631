"""POST /v1/chat/completions: messages rendered with the chat template, then generated like a completion."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import jinja2
from aiohttp import web

from hfbridge.engine.chat_utils import render_chat
from hfbridge.engine.detokenizer import decode_token
from hfbridge.errors import ValidationError
from hfbridge.multimodal.chat import count_image_parts, split_images
from hfbridge.server.errors import APIError, read_json_object
from hfbridge.server.generation import OutputMerger, PreparedPrompt, collect, new_response_id, prepare_prompt, start
from hfbridge.server.logprobs import chat_logprobs, prompt_logprobs_json
from hfbridge.server.protocol import ChatRequest, parse_chat_request
from hfbridge.server.chat_outputs import ChatOutputs
from hfbridge.server.sse import EventStream
from hfbridge.server.state import STATE, ModelCard, ServingState, max_rendered_chars
from hfbridge.server.tool_choice import ToolPlan, plan_tools


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    raw = await read_json_object(request)
    body = parse_chat_request(raw)
    model = state.resolve_model(body.model)
    engine, card = state.require_engine()
    body, plan = with_tools(state, body)
    max_tokens_param = "max_completion_tokens" if raw.get("max_completion_tokens") is not None else "max_tokens"
    response_id = new_response_id("chatcmpl", body, request)
    prepared = await prepare_chat(state, card, body, max_tokens_param)
    head = {"id": response_id, "object": "chat.completion", "created": int(time.time()), "model": model}
    tokenizer = engine.engine.get_tokenizer()

    def decode(token_id: int) -> str:
        return decode_token(tokenizer, token_id)

    role = state.settings.response_role
    echo = _echo_text(body, role)
    merger = await start(state, response_id, [prepared], body)
    # The abort guard is entered before the role chunk is written: a client gone before it is aborted too.
    async with merger.outputs() as outputs:
        if body.stream:
            return await _stream(request, outputs, merger, {**head, "object": "chat.completion.chunk"}, body,
                                 prepared.params.n, role, echo, decode, plan.outputs)
        choices, last = await collect(outputs, prepared.params.n)
    rendered = []
    for index, choice in choices.items():
        logprobs = None
        if body.logprobs:
            logprobs = {"content": chat_logprobs(choice.token_ids, choice.logprobs, body.top_logprobs or 0, decode)}
        fields, finish_reason = {"content": choice.text}, choice.finish_reason
        if plan.outputs.active:
            fields, finish_reason = plan.outputs.message(choice.text, choice.finish_reason)
        fields["content"] = echo + fields["content"] if fields["content"] is not None else (echo or None)
        message = {"role": role, **fields, "refusal": None, "annotations": None, "audio": None,
                   "function_call": None}
        rendered.append({"index": index, "message": message, "logprobs": logprobs,
                         "finish_reason": finish_reason, "stop_reason": choice.stop_reason})
    response = {**head, "choices": rendered, "usage": merger.usage.as_dict()}
    if body.sampling.get("prompt_logprobs") is not None:  # vLLM: on the response, not on a choice
        response["prompt_logprobs"] = prompt_logprobs_json(last[0].prompt_logprobs, decode)
    return web.json_response(response)


async def prepare_chat(state: ServingState, card: ModelCard, body: ChatRequest, max_tokens_param: str) -> PreparedPrompt:
    """Render (a request's own template in the sandbox) and tokenize on the tokenizer thread (seconds for a huge
    conversation). Image parts are fetched and decoded first, on a thread of their own (a slow URL must not hold
    up everyone's tokenizing), and become {"type": "image"} parts for the template."""
    images = None
    if count_image_parts(body.messages):
        engine, _ = state.require_engine()
        messages, images = await asyncio.get_running_loop().run_in_executor(
            None, split_images, body.messages, engine.engine.config.multimodal_config, card.names[0])
        body = dataclasses.replace(body, messages=messages)
    own_template = await render_with_request_template(state, body)  # None: the model's template, below

    def render_and_prepare() -> PreparedPrompt:
        return prepare_prompt(
            state, body, own_template if own_template is not None else render_messages(state, card, body),
            logprobs=(body.top_logprobs or 0) if body.logprobs else None, prompt_logprobs=None,
            # Unset means "whatever the context has left" (vLLM), unless generation_config.json names a limit;
            # either way the request holds its seat in the queue like any other.
            default_max_tokens=card.default_sampling.get("max_tokens"),
            max_tokens_param=max_tokens_param, prompt_param="messages", images=images,
        )

    return await state.off_loop(render_and_prepare)


def render_messages(state: ServingState, card: ModelCard, body: ChatRequest) -> str:
    """The conversation as text with the model's template (or --chat-template), on the tokenizer thread."""
    engine, _ = state.require_engine()
    try:
        text = render_chat(engine.engine.get_tokenizer(), body.messages, chat_template=card.chat_template,
                           **_render_options(state, body))
    except ValidationError:
        raise  # our own checks, with their parameter
    except (jinja2.TemplateError, TypeError, KeyError, IndexError, ValueError, OverflowError) as e:
        # Templates raise for conversations they do not accept (roles out of order, a missing field), and
        # apply_chat_template for arguments it does not take: bad input, never a server fault.
        raise APIError(400, f"The chat template could not render these messages: {e}", "messages") from e
    check_rendered_length(text, card)
    return text


async def render_with_request_template(state: ServingState, body: ChatRequest) -> str | None:
    """The conversation rendered with the template the request brings (None when it brings none): in the template
    sandbox, a child process bounded in time, memory and output, waited for on a thread of its own so that the
    tokenizer thread serves everyone else meanwhile."""
    if body.chat_template is None:
        return None
    if not state.settings.trust_request_chat_template:
        raise APIError(400, "Chat template is passed with request, but --trust-request-chat-template is not "
                            "set. Refused request with untrusted chat template.", "chat_template")
    return await state.render_in_sandbox(body.messages, chat_template=body.chat_template,
                                         **_render_options(state, body))


def _render_options(state: ServingState, body: ChatRequest) -> dict[str, Any]:
    template_kwargs = {**state.settings.default_chat_template_kwargs, **body.chat_template_kwargs}
    if body.reasoning_effort is not None:  # a template variable, as vLLM passes it
        template_kwargs["reasoning_effort"] = body.reasoning_effort
    return dict(add_generation_prompt=body.add_generation_prompt, continue_final_message=body.continue_final_message,
                tools=body.tools, documents=body.documents, chat_template_kwargs=template_kwargs)


def check_rendered_length(text: str, card: ModelCard) -> None:
    """A rendered chat too long to be a prompt of this context is refused before it is tokenized."""
    limit = max_rendered_chars(card.max_model_len)
    if len(text) > limit:
        raise APIError(400, f"The rendered chat has {len(text)} characters, more than the {limit} that can fit the "
                            f"model's context of {card.max_model_len} tokens", "messages")


def _echo_text(body: ChatRequest, role: str) -> str:
    """With echo, the last message's content when it has the role being generated (a continued message)."""
    last = body.messages[-1]
    if body.echo and last.get("role") == role and isinstance(last.get("content"), str):
        return last["content"]
    return ""


def with_tools(state: ServingState, body: ChatRequest) -> tuple[ChatRequest, ToolPlan]:
    """The request as the engine should run it once its tools and tool_choice are read: the tools the template
    sees, the constraint of a "required" or named choice, special tokens kept where the tool parser reads them."""
    settings = state.settings.tools
    has_constraint = body.sampling.get("structured_outputs") is not None
    engine, _ = state.require_engine()
    plan = plan_tools(settings, body.tools, body.tool_choice, has_constraint)
    if (has_constraint or plan.constraint is not None) and settings.reasoning_parser is not None \
            and engine.engine.model_config.reasoning_parser != settings.reasoning_parser:
        raise APIError(400, f"Structured outputs with --reasoning-parser {settings.reasoning_parser} need the engine "
                            "to know the reasoning format too (hfbridge serve passes it; an engine built by hand "
                            "needs reasoning_parser=...)", "response_format")
    plan.outputs.include_reasoning = body.include_reasoning
    plan.outputs.max_calls = None if body.parallel_tool_calls else 1
    sampling = dict(body.sampling)
    if plan.constraint is not None:
        sampling["structured_outputs"] = plan.constraint
    if not plan.skip_special_tokens:
        sampling.setdefault("skip_special_tokens", False)
    return dataclasses.replace(body, tools=plan.template_tools, sampling=sampling), plan


async def _stream(request: web.Request, outputs: Any, merger: OutputMerger, head: dict[str, Any], body: ChatRequest,
                  n: int, role: str, echo: str, decode: Any, parsed: ChatOutputs) -> web.StreamResponse:
    force_usage = request.app[STATE].settings.enable_force_include_usage
    continuous = body.continuous_usage or force_usage
    events = EventStream(request)

    async def send(choice: dict[str, Any]) -> None:
        chunk = {**head, "choices": [choice]}
        if continuous:
            chunk["usage"] = merger.usage.as_dict()
        await events.send(chunk)

    try:
        await events.open()
        # The first chunk of every choice carries the role, before any token exists.
        for index in range(n):
            await send({"index": index, "delta": {"role": role, "content": echo}, "logprobs": None,
                        "finish_reason": None})
        async for _, output in outputs:
            for completion in output.outputs:
                if parsed.active:
                    for choice in _parsed_choices(body, completion, decode, parsed):
                        await send(choice)
                    continue
                choice = _stream_choice(body, completion, decode)
                if choice is not None:
                    await send(choice)
        if body.include_usage or force_usage:
            await events.send({**head, "choices": [], "usage": merger.usage.as_dict()})
    except Exception as e:  # noqa: BLE001 - the stream reports it, or ends quietly if the client left
        return await events.fail(e)
    return await events.close()


def _parsed_choices(body: ChatRequest, completion: Any, decode: Any, parsed: ChatOutputs) -> list[dict[str, Any]]:
    """The streamed choices of one delta read through the reasoning and tool parsers: one per new part (reasoning,
    content, a call's name, its arguments), the finish reason on a last, empty delta."""
    finished = completion.finish_reason is not None
    deltas = parsed.deltas(completion.index, completion.text, finished)
    logprobs = None
    if body.logprobs and completion.token_ids:
        logprobs = {"content": chat_logprobs(completion.token_ids, completion.logprobs or [], body.top_logprobs or 0,
                                             decode)}
        deltas = deltas or [{}]  # the tokens' logprobs go out even while their text is held back
    choices = [{"index": completion.index, "delta": delta, "logprobs": logprobs if i == 0 else None,
                "finish_reason": None} for i, delta in enumerate(deltas)]
    if finished:
        choices.append({"index": completion.index, "delta": {}, "logprobs": None, "stop_reason": completion.stop_reason,
                        "finish_reason": parsed.finish_reason(completion.index, completion.finish_reason)})
    return choices


def _stream_choice(body: ChatRequest, completion: Any, decode: Any) -> dict[str, Any] | None:
    """One streamed choice for this delta; None when there is nothing to send yet (text held back)."""
    if not (completion.text or completion.finish_reason or (body.logprobs and completion.token_ids)):
        return None  # a token whose text is still held back (a partial character or a possible stop)
    logprobs = None
    if body.logprobs:
        logprobs = {"content": chat_logprobs(completion.token_ids, completion.logprobs or [], body.top_logprobs or 0,
                                             decode)}
    choice = {"index": completion.index, "delta": {"content": completion.text} if completion.text else {},
              "logprobs": logprobs, "finish_reason": completion.finish_reason}
    if completion.finish_reason is not None:
        choice["stop_reason"] = completion.stop_reason
    return choice
