"""Tool-call parsers: a model's text -> content and tool calls, one small class per output format, named as vLLM
names them (--tool-call-parser NAME).

Each parser reads the whole text so far, `final` or not. The streaming contract that makes streamed calls equal
the non-streamed ones: on a partial text, `content` may only grow (it is a prefix of the final content) and a call
is reported only once its text is complete and parses, so it never changes afterwards. Text that could still become
a call is held back (`pending`) and, if the end shows it is not one, returned as content: nothing is lost.
"""
from __future__ import annotations

import ast
import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object's text


@dataclass(frozen=True)
class ParsedTools:
    content: str  # the text outside the calls (all of it once final)
    calls: list[ToolCall] = field(default_factory=list)
    settled: int = 0  # how much of `content` precedes the last complete call: it can no longer change


class ToolParser:
    name: ClassVar[str]
    # The call markers are special tokens for some models: their text must survive detokenization.
    skip_special_tokens: ClassVar[bool] = True

    def parse(self, text: str, final: bool) -> ParsedTools:
        raise NotImplementedError


def call_from_object(value: Any, arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """{"name": ..., "arguments": {...}} (or "parameters") -> a ToolCall; None if it is not that shape."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = next((value[k] for k in arguments_keys if k in value), {})
    if isinstance(arguments, str):  # some models encode the arguments object as a string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def held_back(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `marker` (it may be a marker in the making)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class HermesToolParser(ToolParser):
    """Hermes / Qwen2.5 / Qwen3: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, any number,
    text around them kept as content. A block whose JSON is not a call stays content."""

    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> ParsedTools:
        content, calls, position, settled = [], [], 0, 0
        while True:
            begin = text.find(self.start, position)
            if begin < 0:
                rest = text[position:]
                content.append(rest if final else rest[: len(rest) - held_back(rest, self.start)])
                break
            close = text.find(self.end, begin)
            if close < 0:  # an open call: held back until it closes, content if it never does
                content.append(text[position:] if final else text[position:begin])
                break
            call = _json_call(text[begin + len(self.start) : close])
            content.append(text[position:begin] if call else text[position : close + len(self.end)])
            if call:
                calls.append(call)
                settled = sum(map(len, content))
            position = close + len(self.end)
        return ParsedTools("".join(content), calls, settled)


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x: the whole answer is `{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`),
    several separated by `;`. Anything else is content."""

    name = "llama3_json"
    tag = "<|python_tag|>"
    skip_special_tokens = False

    def parse(self, text: str, final: bool) -> ParsedTools:
        body = text.lstrip()
        if body.startswith(self.tag):
            body = body[len(self.tag) :]
        elif not body.startswith("{"):
            if not final and (not body or self.tag.startswith(body)):
                return ParsedTools("")
            return ParsedTools(text)
        if not final:
            return ParsedTools("")
        calls = _json_sequence(body, separators="; \n\t\r", arguments_keys=("parameters", "arguments"))
        return ParsedTools("", calls) if calls else ParsedTools(text)


class MistralToolParser(ToolParser):
    """Mistral: content, then `[TOOL_CALLS]` and either a JSON array of {"name", "arguments"} or, in newer
    tokenizers, `name[ARGS]{...}` / `name{...}` once per call."""

    name = "mistral"
    marker = "[TOOL_CALLS]"
    skip_special_tokens = False

    def parse(self, text: str, final: bool) -> ParsedTools:
        begin = text.find(self.marker)
        if begin < 0:
            return ParsedTools(text if final else text[: len(text) - held_back(text, self.marker)])
        if not final:
            return ParsedTools(text[:begin])
        calls = []
        for part in text[begin:].split(self.marker)[1:]:
            part = part.strip()
            found = (_json_sequence(part, separators=", \n") if part.startswith("[") or part.startswith("{")
                     else _named_call(part))
            if not found:
                return ParsedTools(text)
            calls += found
        return ParsedTools(text[:begin], calls)


class PythonicToolParser(ToolParser):
    """Llama 4 / pythonic: the answer is a Python list of calls, `[f(a=1), g(b="x")]` (optionally inside
    `<|python_start|>` ... `<|python_end|>`), read with Python's own parser; arguments must be literals."""

    name = "pythonic"
    skip_special_tokens = False

    def parse(self, text: str, final: bool) -> ParsedTools:
        body = text.strip().removeprefix("<|python_start|>").removesuffix("<|python_end|>").strip()
        if not body.startswith("["):
            if not final and (not body or "<|python_start|>".startswith(body)):
                return ParsedTools("")
            return ParsedTools(text)
        if not final:
            return ParsedTools("")
        calls = _python_calls(body)
        return ParsedTools("", calls) if calls else ParsedTools(text)


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls for cls in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser)
}


@functools.lru_cache(maxsize=256)  # a stream re-reads its complete calls after every token
def _json_call(body: str) -> ToolCall | None:
    try:
        return call_from_object(json.loads(body))
    except ValueError:
        return None


def _json_sequence(body: str, separators: str, arguments_keys=("arguments", "parameters")) -> list[ToolCall]:
    """Objects (or arrays of objects) one after another; [] unless every one is a call."""
    decoder, calls, position = json.JSONDecoder(), [], 0
    while position < len(body):
        if body[position] in separators:
            position += 1
            continue
        try:
            value, position = decoder.raw_decode(body, position)
        except ValueError:
            return []
        for item in value if isinstance(value, list) else [value]:
            call = call_from_object(item, arguments_keys)
            if call is None:
                return []
            calls.append(call)
    return calls


def _named_call(part: str) -> list[ToolCall]:
    """`name[ARGS]{...}` or `name{...}` -> one call."""
    match = re.match(r"^([A-Za-z0-9_.-]+)(?:\[ARGS\])?\s*(\{.*\})\s*$", part, re.DOTALL)
    if match is None:
        return []
    call = _json_call(json.dumps({"name": match.group(1), "arguments": match.group(2)}))
    return [call] if call else []


def _python_calls(body: str) -> list[ToolCall]:
    try:
        tree = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    if not isinstance(tree, ast.List) or not tree.elts:
        return []
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return []
        try:
            arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
            calls.append(ToolCall(node.func.id, json.dumps(arguments, ensure_ascii=False)))
        except (ValueError, TypeError, SyntaxError, RecursionError):
            return []
    return calls
