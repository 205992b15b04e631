"""Request bodies -> typed requests: type checks with messages that name the field, the OpenAI/vLLM field
set, and the rule that a field the server cannot honour is a 400, never silently ignored.

Value checks (ranges, vLLM's wording) stay in SamplingParams; this file only makes sure each field has a
usable type. JSON null means "not set" everywhere.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hfbridge.engine.input_processor import check_cache_salt
from hfbridge.sample.sampling_params import check_table_size
from hfbridge.server.errors import APIError
from hfbridge.server.structured_outputs import GUIDED_FIELDS, GUIDED_OPTIONS, structured_outputs_of

logger = logging.getLogger(__name__)

Check = Callable[[str, Any], Any]
_INT64 = (-(2**63), 2**63 - 1)
MAX_PROMPTS = 1024
MAX_SEQUENCES_PER_REQUEST = 1024  # n x prompts: each one is a running sequence with its own KV blocks
MAX_STOP_STRINGS = 64  # each one is searched after every token; OpenAI allows 4


def _fail(name: str, expected: str, value: Any) -> APIError:
    return APIError(400, f"`{name}` must be {expected}, got {type(value).__name__}: {str(value)[:100]}", name)


def as_int(name: str, value: Any) -> int:
    """An integer that fits in int64 (every integer field ends in a torch tensor or a C long somewhere)."""
    # 5.0 is accepted as 5, as pydantic's lax mode does; True is not an int here.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(name, "an integer", value)
    if not _INT64[0] <= value <= _INT64[1]:
        raise APIError(400, f"`{name}` must fit in a signed 64-bit integer, got {str(value)[:40]}", name)
    return value


def _number(name: str, value: Any) -> float:
    """A finite number: Python's json accepts NaN and Infinity, which no sampling field can mean."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _fail(name, "a number", value)
    try:
        number = float(value)
    except OverflowError:  # an integer literal with 400 digits
        number = math.inf
    if not math.isfinite(number):
        raise APIError(400, f"`{name}` must be a finite number, got {str(value)[:40]}", name)
    return number


def as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, "true or false", value)
    return value


def as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(name, "a string", value)
    return value


def _dict(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(name, "an object", value)
    return value


def as_int_list(name: str, value: Any) -> list[int]:
    if not isinstance(value, list):
        raise _fail(name, "a list of integers", value)
    return [as_int(name, v) for v in value]


def _str_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(name, "a string or a list of strings", value)
    return value


def _stop(name: str, value: Any) -> list[str]:
    stops = _str_list(name, value)
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"`stop` may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}", name)
    return stops


def _logit_bias(name: str, value: Any) -> dict[str, float]:
    bias = _dict(name, value)
    check_table_size(name, len(bias))  # before the entries: each step applies the whole table
    return {k: _number(f"{name}[{k}]", v) for k, v in bias.items()}


def _sized(check: Check) -> Check:
    """`check`, after refusing a list longer than SamplingParams' cap for the field (allowed_token_ids, bad_words)."""
    def checked(name: str, value: Any) -> Any:
        if isinstance(value, list):
            check_table_size(name, len(value))
        return check(name, value)

    return checked


# SamplingParams fields a request may set, with their types (vLLM's extras included).
SAMPLING_FIELDS: dict[str, Check] = {
    "n": as_int, "best_of": as_int, "temperature": _number, "top_p": _number, "top_k": as_int, "min_p": _number,
    "presence_penalty": _number, "frequency_penalty": _number, "repetition_penalty": _number, "seed": as_int,
    "stop": _stop, "stop_token_ids": as_int_list, "bad_words": _sized(_str_list), "ignore_eos": as_bool,
    "min_tokens": as_int,
    "skip_special_tokens": as_bool, "spaces_between_special_tokens": as_bool, "include_stop_str_in_output": as_bool,
    "logit_bias": _logit_bias, "allowed_token_ids": _sized(as_int_list), "prompt_logprobs": as_int,
    "truncate_prompt_tokens": as_int,
}
_COMMON_FIELDS: dict[str, Check] = {
    "model": as_str, "max_tokens": as_int, "stream": as_bool, "stream_options": _dict, "echo": as_bool,
    "add_special_tokens": as_bool, "request_id": as_str, "user": as_str, "priority": as_int,
    "cache_salt": lambda name, value: check_cache_salt(value),
    # decoding constraints, read together by structured_outputs_of
    **dict.fromkeys(["response_format", "structured_outputs", *GUIDED_FIELDS, *GUIDED_OPTIONS,
                     "guided_decoding_backend"], lambda name, value: value),
}
# Fields that would change the output in ways the engine cannot deliver yet: refused with the reason when set to
# anything but their no-op value, never ignored. name -> (the values that ask for nothing, what it asks for).
_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "suffix": ((None, ""), "fill-in-the-middle (suffix), which hfbridge does not support yet"),
    "prompt_embeds": ((None, "", []), "prompt embeddings, which hfbridge does not support yet"),
    "lora_request": ((None, {}), "a LoRA adapter by an engine-side object; pick a served adapter by its name in "
                                 "`model` (--lora-modules)"),
    "functions": ((None, []), "the deprecated function-calling API; send `tools` instead"),
    "function_call": ((None,), "the deprecated function-calling API; send `tool_choice` instead"),
    "modalities": ((None, ["text"]), "output modalities other than text, which hfbridge does not produce"),
    "audio": ((None,), "audio output, which hfbridge does not produce"),
    "web_search_options": ((None,), "web search, which hfbridge does not do"),
    "mm_processor_kwargs": ((None, {}), "multimodal processing, which hfbridge does not support yet"),
    "kv_transfer_params": ((None, {}), "disaggregated prefill (KV transfer), which hfbridge does not support"),
    "vllm_xargs": ((None, {}), "custom logits-processor arguments, which hfbridge does not support"),
    "return_token_ids": ((None, False), "token ids in the response, which hfbridge does not return yet; "
                                        "use logprobs or /tokenize"),
}
# OpenAI fields that cannot change the output: dropped with one warning each per process (vLLM drops them silently).
_DROPPED = frozenset({"store", "metadata", "prediction", "service_tier"})
_warned: set[str] = set()


@dataclass(frozen=True)
class GenerationRequest:
    """What completions and chat have in common."""

    model: str | None
    sampling: dict[str, Any]  # SamplingParams kwargs the client set
    max_tokens: int | None
    stream: bool
    include_usage: bool
    continuous_usage: bool
    echo: bool
    add_special_tokens: bool
    request_id: str | None
    priority: int  # lower first under --scheduling-policy priority; non-zero is refused under fcfs
    cache_salt: str | None  # prefix-cache entries are shared only within one salt


@dataclass(frozen=True)
class CompletionRequest(GenerationRequest):
    prompts: list[str | list[int]]
    logprobs: int | None


@dataclass(frozen=True)
class ChatRequest(GenerationRequest):
    messages: list[dict[str, Any]]
    logprobs: bool
    top_logprobs: int | None
    add_generation_prompt: bool
    continue_final_message: bool
    chat_template: str | None
    chat_template_kwargs: dict[str, Any]
    tools: list[dict[str, Any]] | None
    tool_choice: Any  # "none" | "auto" | "required" | {"type": "function", ...}; None: unset (server/tool_choice.py)
    parallel_tool_calls: bool  # False: at most one tool call per choice (vLLM keeps the first)
    include_reasoning: bool  # False: the reasoning parser's part is left out of the message
    documents: list[dict[str, Any]] | None  # for RAG templates: apply_chat_template(documents=...)
    reasoning_effort: str | None  # a chat-template variable, as vLLM passes it


def _take(body: dict[str, Any], schema: dict[str, Check]) -> dict[str, Any]:
    """Checked values of the fields in `schema` that the body sets (null counts as unset)."""
    for name, (no_op, what) in _REFUSED.items():
        if name in body and body[name] not in no_op:
            raise APIError(400, f"`{name}` asks for {what}", name)
    for name in body.keys() - schema.keys():
        if name in _DROPPED and name not in _warned:
            _warned.add(name)
            logger.warning("Request field %r is not supported and is ignored", name)
    return {name: check(name, body[name]) for name, check in schema.items() if body.get(name) is not None}


def _generation_fields(values: dict[str, Any]) -> dict[str, Any]:
    stream = values.get("stream", False)
    options = values.get("stream_options") or {}
    if options and not stream:
        raise APIError(400, "Stream options can only be defined when `stream=True`.", "stream_options")
    if stream and values.get("prompt_logprobs") is not None:
        raise APIError(400, "`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
    sampling = {k: values[k] for k in SAMPLING_FIELDS if k in values}
    constraint = structured_outputs_of(values)
    if constraint is not None:
        sampling["structured_outputs"] = constraint
    return dict(
        model=values.get("model"),
        sampling=sampling,
        max_tokens=values.get("max_tokens"),
        stream=stream,
        # An empty stream_options adds no usage chunk (vLLM PR #36379 fixed exactly this).
        include_usage=_option(options, "include_usage"),
        continuous_usage=_option(options, "continuous_usage_stats"),
        echo=values.get("echo", False),
        request_id=values.get("request_id"),
        priority=values.get("priority", 0),
        cache_salt=values.get("cache_salt"),
    )


def _option(options: dict[str, Any], name: str) -> bool:
    value = options.get(name)
    return False if value is None else as_bool(f"stream_options.{name}", value)


def parse_completion_request(body: dict[str, Any]) -> CompletionRequest:
    values = _take(body, {**SAMPLING_FIELDS, **_COMMON_FIELDS, "prompt": _prompts, "logprobs": as_int})
    if "prompt" not in values:
        raise APIError(400, "Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    _check_num_sequences(values.get("n", 1), len(values["prompt"]))
    return CompletionRequest(
        **_generation_fields(values),
        add_special_tokens=values.get("add_special_tokens", True),
        prompts=values["prompt"],
        logprobs=values.get("logprobs"),
    )


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    schema = {
        **SAMPLING_FIELDS, **_COMMON_FIELDS, "messages": _messages, "max_completion_tokens": as_int,
        "logprobs": as_bool, "top_logprobs": as_int, "add_generation_prompt": as_bool, "continue_final_message": as_bool,
        "chat_template": as_str, "chat_template_kwargs": _dict, "tools": _tools, "tool_choice": _any,
        "parallel_tool_calls": as_bool, "include_reasoning": as_bool, "documents": _documents,
        "reasoning_effort": _reasoning_effort,
    }
    values = _take(body, schema)
    if "messages" not in values:
        raise APIError(400, "`messages` is required: a non-empty list of {role, content} objects", "messages")
    _check_num_sequences(values.get("n", 1), 1)
    top_logprobs = values.get("top_logprobs")
    if top_logprobs not in (None, 0) and not values.get("logprobs", False):
        raise APIError(400, "when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
    # max_completion_tokens is OpenAI's current name and wins over the deprecated max_tokens.
    max_tokens = values.get("max_completion_tokens", values.get("max_tokens"))
    return ChatRequest(
        **{**_generation_fields(values), "max_tokens": max_tokens},
        add_special_tokens=values.get("add_special_tokens", False),  # the template already holds them
        messages=values["messages"],
        logprobs=values.get("logprobs", False),
        top_logprobs=top_logprobs,
        add_generation_prompt=values.get("add_generation_prompt", True),
        continue_final_message=values.get("continue_final_message", False),
        chat_template=values.get("chat_template"),
        chat_template_kwargs=values.get("chat_template_kwargs", {}),
        tools=values.get("tools"),
        tool_choice=values.get("tool_choice"),
        parallel_tool_calls=values.get("parallel_tool_calls", True),
        include_reasoning=values.get("include_reasoning", True),
        documents=values.get("documents"),
        reasoning_effort=values.get("reasoning_effort"),
    )


def _documents(name: str, value: Any) -> list[dict[str, Any]]:
    """vLLM's shape: a list of objects whose keys and values are strings (e.g. {"title", "text"})."""
    if not isinstance(value, list) or not all(
        isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()) for d in value
    ):
        raise _fail(name, "a list of objects with string values (e.g. {\"title\": ..., \"text\": ...})", value)
    return value


def _reasoning_effort(name: str, value: Any) -> str:
    if value not in ("low", "medium", "high"):
        raise APIError(400, f"`{name}` must be one of 'low', 'medium', 'high', got {str(value)[:40]!r}", name)
    return value


def _check_num_sequences(n: int, num_prompts: int) -> None:
    if n * num_prompts > MAX_SEQUENCES_PER_REQUEST:
        raise APIError(400, f"n x prompts = {n} x {num_prompts} = {n * num_prompts} sequences, more than the "
                            f"{MAX_SEQUENCES_PER_REQUEST} one request may ask for; split the request", "n")


def _any(name: str, value: Any) -> Any:
    return value


def as_prompt_list(name: str, value: Any, max_items: int) -> list[str | list[int]]:
    """str | list[str] | list[int] | list[list[int]] -> a list of prompts, each a string or token ids."""
    if isinstance(value, str):
        prompts: list[Any] = [value]
    elif isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
        prompts = [v if isinstance(v, str) else as_int_list(name, v) for v in value]
    else:
        raise _fail(name, "a string, a list of strings, a list of token ids or a list of such lists", value)
    if len(prompts) > max_items:
        raise APIError(400, f"At most {max_items} prompts per request, got {len(prompts)}", name)
    for prompt in prompts:
        if isinstance(prompt, list) and any(t < 0 for t in prompt):
            raise APIError(400, f"Token ids in `{name}` must be non-negative", name)
    return prompts


def _prompts(name: str, value: Any) -> list[str | list[int]]:
    if value == []:
        raise APIError(400, "Either prompt or prompt_embeds must be provided and non-empty.", name)
    return as_prompt_list(name, value, MAX_PROMPTS)


def _messages(name: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _fail(name, "a non-empty list of messages", value)
    out = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _fail(where, "an object with a string `role`", message)
        message = dict(message)
        message["content"] = _content(f"{where}.content", message.get("content"))
        # `reasoning` (vLLM >= 0.12) and `reasoning_content` (before): accept either, give templates both.
        reasoning = message.get("reasoning", message.get("reasoning_content"))
        if reasoning is not None:
            message["reasoning"] = message["reasoning_content"] = reasoning
        if message.get("tool_calls") is not None:
            message["tool_calls"] = _tool_calls(f"{where}.tool_calls", message["tool_calls"])
        if message["role"] == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise APIError(400, f"{where}: a tool message needs the `tool_call_id` of the call it answers", name)
        out.append(message)
    return out


def _content(name: str, value: Any) -> str | list[dict[str, Any]] | None:
    """Text content: a string, or a list of text parts joined by newlines (vLLM's "string" format). With image
    parts, the list of parts: {"type": "text", "text": ...} and {"type": "image_url", "image_url": {"url": ...}}."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _fail(name, "a string or a list of content parts", value)
    parts: list[dict[str, Any]] = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise APIError(400, f"{name}: an image_url part needs an `image_url` object with a string `url`",
                               "messages")
            parts.append({"type": "image_url", "image_url": {"url": url}})
            continue
        if kind not in ("text", "input_text") or not isinstance(part.get("text"), str):
            raise APIError(400, f"{name}: content parts must be text or image_url, got "
                                f"{kind or type(part).__name__}", "messages")
        parts.append({"type": "text", "text": part["text"]})
    if any(part["type"] == "image_url" for part in parts):
        return parts
    return "\n".join(part["text"] for part in parts)


def _tool_calls(name: str, value: Any) -> list[dict[str, Any]]:
    """An assistant message's tool_calls, with each call's `arguments` as the object templates expect (vLLM
    turns the JSON text into a dict the same way)."""
    if not isinstance(value, list):
        raise _fail(name, "a list of tool calls", value)
    calls = []
    for i, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _fail(f"{name}[{i}]", "a call with a `function` object naming the function", call)
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError as e:
                raise APIError(400, f"{name}[{i}].function.arguments is not valid JSON: {e}", "messages") from e
        calls.append({**call, "function": {**function, "arguments": arguments}})
    return calls


def _tools(name: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise _fail(name, "a list of tool objects", value)
    if not value:
        raise APIError(400, "`tools` must not be an empty array; omit it instead", name)
    return value
