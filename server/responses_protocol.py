"""OpenAI's Responses API as a chat request: `input` items -> chat messages, its fields -> chat fields, and the
reply back as Responses output items. The chat route's checks, tools and parsers then apply unchanged.
"""
from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from hfbridge.server.errors import APIError

MAX_STORED_RESPONSES = 512  # oldest evicted first; a response holds its conversation, so the bound is on count
_IGNORED = {"metadata", "user", "store", "parallel_tool_calls", "include", "service_tier", "prompt_cache_key",
            "safety_identifier", "stream_options"}
_CHAT_FIELDS = {"model": "model", "max_output_tokens": "max_completion_tokens", "temperature": "temperature",
                "top_p": "top_p", "stream": "stream", "seed": "seed", "top_logprobs": "top_logprobs"}


@dataclass
class StoredResponse:
    messages: list[dict[str, Any]]  # the whole conversation, the reply included, as chat messages
    body: dict[str, Any]  # the Response object as it was returned


@dataclass
class ResponseStore:
    """Stored responses for previous_response_id and GET /v1/responses/{id}, bounded, oldest out first."""

    max_size: int = MAX_STORED_RESPONSES
    items: OrderedDict[str, StoredResponse] = field(default_factory=OrderedDict)

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self.items[response_id] = stored
        while len(self.items) > self.max_size:
            self.items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse:
        stored = self.items.get(response_id)
        if stored is None:
            raise APIError(404, f"Response with id {response_id!r} not found (never stored, stored with "
                                f"store=false, or evicted: the server keeps the last {self.max_size})",
                           "previous_response_id")
        return stored


def chat_body(body: dict[str, Any], store: ResponseStore) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The chat request that runs this Responses request, and the conversation it continues (for storing)."""
    refused = [name for name in ("background", "conversation", "prompt") if body.get(name) not in (None, False)]
    if refused:
        raise APIError(400, f"`{refused[0]}` is not supported by hfbridge's Responses API", refused[0])
    if body.get("truncation") not in (None, "disabled"):
        raise APIError(400, "truncation must be 'disabled': hfbridge does not drop input to fit", "truncation")
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        raise APIError(400, "reasoning.effort is not supported; use chat_template_kwargs on /v1/chat/completions",
                       "reasoning")
    unknown = sorted(set(body) - set(_CHAT_FIELDS) - _IGNORED - {
        "input", "instructions", "tools", "tool_choice", "previous_response_id", "text", "reasoning", "truncation",
        "background", "conversation", "prompt"})
    if unknown:
        raise APIError(400, f"Unknown Responses field(s) {unknown}", unknown[0])
    history = []
    if body.get("previous_response_id") is not None:
        if not isinstance(body["previous_response_id"], str):
            raise APIError(400, "previous_response_id must be a string", "previous_response_id")
        history = list(store.get(body["previous_response_id"]).messages)
    messages = history + input_messages(body.get("input"))
    if isinstance(body.get("instructions"), str):  # instructions are not carried over to the next response
        messages = [m for m in messages if m.get("role") != "system"]
        messages.insert(0, {"role": "system", "content": body["instructions"]})
    chat = {chat_name: body[name] for name, chat_name in _CHAT_FIELDS.items() if body.get(name) is not None}
    if body.get("top_logprobs"):
        chat["logprobs"] = True
    chat["messages"] = messages
    if body.get("tools") is not None:
        chat["tools"] = [_chat_tool(i, tool) for i, tool in enumerate(_list("tools", body["tools"]))]
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _chat_tool_choice(body["tool_choice"])
    if body.get("text") is not None and not isinstance(body["text"], dict):
        raise APIError(400, "`text` must be an object such as {\"format\": {\"type\": \"json_object\"}}", "text")
    text_format = (body.get("text") or {}).get("format")
    if text_format is not None:
        chat["response_format"] = _response_format(text_format)
    return chat, messages


def input_messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(_list("input", value)):
        if not isinstance(item, dict):
            raise APIError(400, f"input[{i}] must be an object", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"input[{i}].role must be user, system, developer or assistant", "input")
            messages.append({"role": "system" if role == "developer" else role,
                             "content": _text(f"input[{i}].content", item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else _text(f"input[{i}].output", output)})
        elif kind == "reasoning":
            continue  # earlier reasoning is not shown to the model again (as chat templates drop it)
        else:
            raise APIError(400, f"input[{i}].type {str(kind)[:40]!r} is not supported; use message, function_call, "
                                "function_call_output or reasoning", "input")
    if not messages:
        raise APIError(400, "`input` must be a non-empty string or list of items", "input")
    return messages


def output_items(fields: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat message's fields (content, reasoning, tool_calls) -> Responses output items, in that order."""
    items = []
    if fields.get("reasoning"):
        items.append(reasoning_item(new_id("rs"), fields["reasoning"]))
    if fields.get("content"):
        items.append(message_item(new_id("msg"), fields["content"]))
    for call in fields.get("tool_calls") or []:
        items.append(call_item(new_id("fc"), call["id"], call["function"]["name"], call["function"]["arguments"]))
    return items


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def message_item(item_id: str, text: str | None, status: str = "completed") -> dict[str, Any]:
    content = [] if text is None else [output_text(text)]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def history_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reply's items as chat messages, for the next response's history."""
    messages: list[dict[str, Any]] = []
    text = "".join(part["text"] for item in items if item["type"] == "message" for part in item["content"])
    calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
             for i in items if i["type"] == "function_call"]
    messages.append({"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})})
    return messages


def response_object(response_id: str, body: dict[str, Any], model: str, output: list[dict[str, Any]],
                    usage: dict[str, int] | None, status: str, finish_reason: str | None = None) -> dict[str, Any]:
    incomplete = {"reason": "max_output_tokens"} if finish_reason == "length" else None
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()), "model": model,
        "status": "incomplete" if incomplete and status == "completed" else status, "output": output,
        "incomplete_details": incomplete, "error": None, "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "temperature": body.get("temperature"),
        "top_p": body.get("top_p"), "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice", "auto"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"), "store": body.get("store", True),
        "text": body.get("text") or {"format": {"type": "text"}}, "truncation": "disabled",
        "metadata": body.get("metadata") or {}, "reasoning": body.get("reasoning"), "user": body.get("user"),
        "usage": None if usage is None else {
            "input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}},
    }


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _list(name: str, value: Any) -> list:
    if not isinstance(value, list):
        raise APIError(400, f"`{name}` must be a list", name)
    return value


def _text(name: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in _list(name, content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") \
                or not isinstance(part.get("text"), str):
            raise APIError(400, f"{name}: only text parts (input_text, output_text) are supported", "input")
        parts.append(part["text"])
    return "\n".join(parts)


def _chat_tool(index: int, tool: Any) -> dict[str, Any]:
    """Responses' flat function tool -> chat's {"type": "function", "function": {...}}."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
        raise APIError(400, f"tools[{index}]: only function tools are supported, got {str(kind)[:40]!r}", "tools")
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _response_format(text_format: Any) -> dict[str, Any]:
    """Responses' text.format (flat json_schema) -> chat's response_format."""
    if isinstance(text_format, dict) and text_format.get("type") == "json_schema":
        spec = {k: text_format[k] for k in ("name", "description", "schema", "strict") if k in text_format}
        return {"type": "json_schema", "json_schema": spec}
    return text_format
