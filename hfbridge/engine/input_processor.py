"""Prompts in every form vLLM accepts -> token ids, validated against the model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hfbridge.errors import ValidationError


@dataclass(frozen=True)
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]
    token_type_ids: list[int] | None = None


def is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def truncate_tokens(token_ids: list[int], truncate_prompt_tokens: int | None, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the last k tokens (-1: the last max_model_len); None keeps all."""
    if truncate_prompt_tokens is None:
        return token_ids
    keep = max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
    return token_ids[-keep:]


def process_prompt(
    prompt: Any,
    tokenizer: Any,
    vocab_size: int,
    max_model_len: int,
    truncate_prompt_tokens: int | None = None,
    add_special_tokens: bool = True,
) -> ProcessedPrompt:
    text, token_ids = _parse(prompt)
    if token_ids is None:
        if tokenizer is None:
            raise ValidationError("Text prompts need a tokenizer; pass prompt_token_ids instead", parameter="prompt")
        token_ids = tokenizer(text, add_special_tokens=add_special_tokens).input_ids
    token_ids = truncate_tokens(token_ids, truncate_prompt_tokens, max_model_len)
    if not token_ids:
        raise ValidationError("The decoder prompt cannot be empty", parameter="prompt", value=prompt)
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValidationError(
            f"Token id(s) {bad[:5]} in the prompt are out of vocabulary (size {vocab_size})",
            parameter="prompt_token_ids", value=bad[:5],
        )
    if len(token_ids) > max_model_len:
        raise ValidationError(
            f"The decoder prompt (length {len(token_ids)}) is longer than the maximum model length of "
            f"{max_model_len}. Make sure that `max_model_len` is no smaller than the number of text tokens.",
            parameter="prompt", value=len(token_ids),
        )
    token_type_ids = prompt.get("token_type_ids") if isinstance(prompt, dict) else None
    if token_type_ids is not None:
        token_type_ids = list(token_type_ids)[-len(token_ids) :]
    return ProcessedPrompt(text, list(token_ids), token_type_ids)


def _parse(prompt: Any) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if is_token_ids(prompt):
        return None, prompt
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not is_token_ids(ids):
                raise ValidationError("prompt_token_ids must be a list of ints", parameter="prompt_token_ids")
            return prompt.get("prompt"), list(ids)
        if isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], None
        raise ValidationError(
            f"A prompt dict needs 'prompt' (str) or 'prompt_token_ids' (list of int); got keys {sorted(prompt)}",
            parameter="prompt",
        )
    raise ValidationError(
        f"Unsupported prompt of type {type(prompt).__name__}: use a str, a list of token ids, "
        "{'prompt': str} or {'prompt_token_ids': [...]}",
        parameter="prompt",
    )
