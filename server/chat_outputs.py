"""What a chat choice's text becomes: reasoning, content and tool calls, whole (non-streamed) or as deltas.

The request decides which parsers apply (ChatOutputs.for_request): the server's --reasoning-parser; a tool parser
when tool_choice is "auto"; for "required" and a named function, decoding is constrained (tool_choice.py) and the
text is read as that constraint's JSON. Streaming re-reads the whole text so far after each token and sends only
what is new, under the parsers' contract (a part only grows, a call appears once complete): the deltas add up to
exactly the non-streamed message.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from hfbridge.server.reasoning_parsers import ReasoningParser
from hfbridge.server.tool_parsers import ParsedTools, ToolCall, ToolParser, call_from_object


class RequiredCallsParser(ToolParser):
    """tool_choice "required": the text is the constrained JSON array [{"name", "parameters"}, ...]."""

    name = "required"

    def parse(self, text: str, final: bool) -> ParsedTools:
        if not final:
            return ParsedTools("")
        try:
            items = json.loads(text)
        except ValueError:
            return ParsedTools(text)
        calls = [call_from_object(item, ("parameters",)) for item in items] if isinstance(items, list) else []
        return ParsedTools("", calls) if calls and all(calls) else ParsedTools(text)


class NamedCallParser(ToolParser):
    """A named function: the text is that function's constrained arguments object."""

    name = "named"

    def __init__(self, function: str):
        self.function = function

    def parse(self, text: str, final: bool) -> ParsedTools:
        if not final:
            return ParsedTools("")
        call = call_from_object({"name": self.function, "arguments": text})
        return ParsedTools("", [call]) if call else ParsedTools(text)


@dataclass
class _ChoiceState:
    text: str = ""
    sent_reasoning: int = 0
    sent_content: int = 0
    sent_calls: int = 0


@dataclass
class ChatOutputs:
    reasoning: ReasoningParser | None = None
    tools: ToolParser | None = None
    calls_finish: bool = True  # finish_reason "tool_calls" when calls were made (not for a named function)
    include_reasoning: bool = True  # the request's include_reasoning: False leaves the reasoning out
    max_calls: int | None = None  # parallel_tool_calls=false: 1 (vLLM keeps the first call)
    _choices: dict[int, _ChoiceState] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.reasoning is not None or self.tools is not None

    def split(self, text: str, final: bool) -> tuple[str, str, list[ToolCall]]:
        """(reasoning, content, calls) of a choice's text so far; tool calls come from the content only. Once a
        tool parser reads the content, whitespace-only content next to calls is none, so on a partial text a
        trailing run of whitespace is held back until more text shows whether it is content."""
        reasoning, content = self.reasoning.split(text, final) if self.reasoning is not None else ("", text)
        if not self.include_reasoning:
            reasoning = ""
        if self.tools is None:
            return reasoning, content, []
        parsed = self.tools.parse(content, final)
        content = parsed.content
        if not content.strip() and (parsed.calls or not final):
            content = ""
        elif not final:  # what precedes a complete call is settled, its whitespace included
            content = content[: max(len(content.rstrip()), parsed.settled)]
        return reasoning, content, parsed.calls[: self.max_calls]

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The non-streamed message fields (content, reasoning, tool_calls) and the finish reason."""
        reasoning, content, calls = self.split(text, final=True)
        fields: dict[str, Any] = {"content": content if content or not (calls or self.reasoning) else None}
        if self.reasoning is not None:
            fields["reasoning"] = fields["reasoning_content"] = reasoning or None
        if calls:
            fields["tool_calls"] = [_call_json(call) for call in calls]
        return fields, _finish(finish_reason, bool(calls), self.calls_finish)

    def deltas(self, index: int, new_text: str, finished: bool) -> list[dict[str, Any]]:
        """The delta objects to stream for choice `index` after `new_text` arrived (the last call: finished)."""
        state = self._choices.setdefault(index, _ChoiceState())
        state.text += new_text
        reasoning, content, calls = self.split(state.text, final=finished)
        out: list[dict[str, Any]] = []
        if len(reasoning) > state.sent_reasoning:
            piece = reasoning[state.sent_reasoning :]
            out.append({"reasoning": piece, "reasoning_content": piece})
            state.sent_reasoning = len(reasoning)
        if len(content) > state.sent_content:
            out.append({"content": content[state.sent_content :]})
            state.sent_content = len(content)
        for i, call in enumerate(calls[state.sent_calls :], start=state.sent_calls):
            whole = _call_json(call)
            out.append({"tool_calls": [{"index": i, "id": whole["id"], "type": "function",
                                        "function": {"name": call.name, "arguments": ""}}]})
            out.append({"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]})
        state.sent_calls = len(calls)
        return out

    def finish_reason(self, index: int, finish_reason: str | None) -> str | None:
        state = self._choices.get(index)
        return _finish(finish_reason, state is not None and state.sent_calls > 0, self.calls_finish)


def _call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def _finish(finish_reason: str | None, made_calls: bool, calls_finish: bool) -> str | None:
    """vLLM's rule: "tool_calls" when calls were parsed, the model stopped by itself, and no function was named."""
    return "tool_calls" if made_calls and calls_finish and finish_reason == "stop" else finish_reason
