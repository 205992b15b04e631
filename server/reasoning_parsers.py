"""Reasoning parsers: a model's text -> (reasoning, content), named as vLLM names them (--reasoning-parser NAME).

Same contract as the tool parsers: on a partial text both parts may only grow, so streamed deltas add up to the
final split; a partly generated end tag is held back until it is complete or turns out to be text.
"""
from __future__ import annotations

from typing import ClassVar

from hfbridge.server.tool_parsers import held_back
from hfbridge.structured_output.reasoning import REASONING_TAGS


class ReasoningParser:
    name: ClassVar[str]
    start: ClassVar[str] = REASONING_TAGS["qwen3"].start
    end: ClassVar[str] = REASONING_TAGS["qwen3"].end

    def split(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, content) of the text so far."""
        body = text.lstrip()
        if not final and self.start.startswith(body):  # nothing yet, or the start tag still arriving
            return "", ""
        if body.startswith(self.start):
            body = body[len(self.start) :]
        elif not self.thinks_without_start_tag(body, final):
            return "", text
        close = body.find(self.end)
        if close >= 0:
            return body[:close], body[close + len(self.end) :]
        return (body if final else body[: len(body) - held_back(body, self.end)]), ""

    def thinks_without_start_tag(self, body: str, final: bool) -> bool:
        raise NotImplementedError


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1: its template opens `<think>` in the prompt, so the answer reasons first whether or not it
    repeats the tag; everything before `</think>` is reasoning (all of it, if the tag never comes)."""

    name = "deepseek_r1"

    def thinks_without_start_tag(self, body: str, final: bool) -> bool:
        return True


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3: reasoning inside `<think>...</think>`; with thinking off (`enable_thinking: false`) the answer has
    no tags and is all content. An answer that closes `</think>` without opening it reasons before the tag."""

    name = "qwen3"

    def thinks_without_start_tag(self, body: str, final: bool) -> bool:
        return self.end in body


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    cls.name: cls for cls in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)
}
