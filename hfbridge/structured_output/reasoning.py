"""Where a reasoning model's thinking ends, for structured outputs: vLLM constrains only what follows the reasoning,
so a constrained request's grammar starts after the end tag (and the server's reasoning parsers split the same tags).

Tags are matched as token ids: reasoning models tokenize `<think>` / `</think>` as single added tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hfbridge.errors import ValidationError


@dataclass(frozen=True)
class ReasoningTags:
    start: str
    end: str


REASONING_TAGS = {"deepseek_r1": ReasoningTags("<think>", "</think>"), "qwen3": ReasoningTags("<think>", "</think>")}


def check_reasoning_parser(name: str | None) -> None:
    if name is not None and name not in REASONING_TAGS:
        raise ValidationError(f"reasoning_parser {name!r} is unknown; known: {sorted(REASONING_TAGS)}",
                              parameter="reasoning_parser", value=name)


@dataclass(frozen=True)
class ReasoningEnd:
    """The tags' token ids, and whether a token sequence has left the reasoning."""

    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]

    @classmethod
    def for_parser(cls, name: str | None, tokenizer: Any) -> ReasoningEnd | None:
        if name is None or tokenizer is None:
            return None
        tags = REASONING_TAGS[name]
        encode = lambda text: tuple(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
        return cls(encode(tags.start), encode(tags.end))

    def ended_in(self, token_ids: list[int]) -> bool:
        """Whether the last end tag comes after the last start tag (a prompt that closed its thinking, as Qwen3's
        template does with enable_thinking off; a prompt that opened it, as DeepSeek-R1's does, has not)."""
        return _last(token_ids, self.end_ids) > _last(token_ids, self.start_ids)

    def ends_with(self, token_ids: list[int]) -> bool:
        """Whether the tokens so far end with the end tag (the next token is the first the grammar sees)."""
        n = len(self.end_ids)
        return n > 0 and tuple(token_ids[-n:]) == self.end_ids


def _last(token_ids: list[int], pattern: tuple[int, ...]) -> int:
    n = len(pattern)
    for i in range(len(token_ids) - n, -1, -1):
        if tuple(token_ids[i : i + n]) == pattern:
            return i
    return -1
