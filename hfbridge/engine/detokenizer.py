"""Incremental detokenization: the text each new token adds, correct across multi-byte characters and
tokenizers whose decode depends on the previous token (leading spaces, byte fallback)."""
from __future__ import annotations

from typing import Any

# Prompt tokens kept as left context, so the first output token decodes as it would mid-sequence.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Fast tokenizers step through `tokenizers`' own DecodeStream (as vLLM does: one token's worth of work in Rust,
    however long the output); any other tokenizer re-decodes a small window of tokens per step. Both hold back a
    token that ends inside a character, and flush what is left at the end as the full decode would show it."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.decode_kwargs = {
            "skip_special_tokens": skip_special_tokens,
            "spaces_between_special_tokens": spaces_between_special_tokens,
            "clean_up_tokenization_spaces": False,
        }
        self.token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = len(self.token_ids)  # tokens before this are already in the text
        self.stream = _decode_stream(tokenizer, self.token_ids, skip_special_tokens)

    def _decode(self, ids: list[int]) -> str:
        try:
            return self.tokenizer.decode(ids, **self.decode_kwargs)
        except TypeError:  # tokenizers that take no spaces_between_special_tokens
            kwargs = dict(self.decode_kwargs)
            kwargs.pop("spaces_between_special_tokens")
            return self.tokenizer.decode(ids, **kwargs)

    def add_token(self, token_id: int) -> str:
        """Append one token; returns the new text, "" while the token ends in an incomplete character."""
        self.token_ids.append(token_id)
        if self.stream is not None:
            text = self.stream.step(self.tokenizer._tokenizer, token_id)
            if text is None:
                return ""
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            return text
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """At the end of a request: the text still held back (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        if self.stream is not None:  # start again after what was flushed
            self.stream = _decode_stream(self.tokenizer, self.token_ids[-_CONTEXT_TOKENS:],
                                         self.decode_kwargs["skip_special_tokens"])
        return full_text[len(prefix_text) :]


def _decode_stream(tokenizer: Any, context_ids: list[int], skip_special_tokens: bool) -> Any:
    """A DecodeStream primed with the context, for a fast (Rust-backed) tokenizer; None for any other."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        return None
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # tokenizers before DecodeStream
        return None
    try:
        return DecodeStream(ids=list(context_ids), skip_special_tokens=skip_special_tokens)
    except TypeError:  # a DecodeStream that takes no context ids
        return None


def decode_token(tokenizer: Any, token_id: int) -> str:
    """One token on its own, as logprob entries show it."""
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
