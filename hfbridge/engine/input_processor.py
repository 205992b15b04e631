"""Prompts in every form vLLM accepts -> token ids, validated against the model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hfbridge.errors import ValidationError
from hfbridge.multimodal.inputs import MultiModalInputs
from hfbridge.multimodal.processor import MultiModalProcessor


@dataclass(frozen=True)
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]
    token_type_ids: list[int] | None = None
    cache_salt: str | None = None  # seeds the first block's hash: prefix-cache entries are shared within a salt
    mm_inputs: MultiModalInputs | None = None  # the prompt's images (a vision-language model)


MAX_CACHE_SALT_CHARS = 128
# Keys of a prompt dict, and what hfbridge cannot serve yet: refused, never dropped (an image must not vanish).
_PROMPT_KEYS = frozenset({"prompt", "prompt_token_ids", "token_type_ids", "cache_salt"})
_UNSERVED_PROMPT_KEYS = {
    "multi_modal_data": "multimodal inputs (images, audio, video)",
    "mm_processor_kwargs": "multimodal processor options",
    "multi_modal_uuids": "multimodal inputs",
    "prompt_embeds": "prompt embeddings",
    "encoder_prompt": "encoder-decoder prompts",
    "decoder_prompt": "encoder-decoder prompts",
}


def check_cache_salt(salt: Any) -> str:
    """vLLM's rule: a non-empty string of at most 128 characters without '@', '/', '\\' or NUL."""
    if not isinstance(salt, str) or not salt:
        raise ValidationError("cache_salt must be a non-empty string if provided", parameter="cache_salt", value=salt)
    if len(salt) > MAX_CACHE_SALT_CHARS:
        raise ValidationError(
            f"cache_salt must be at most {MAX_CACHE_SALT_CHARS} characters, got {len(salt)}",
            parameter="cache_salt", value=len(salt),
        )
    bad = sorted({c for c in salt if c in "@/\\\0"})
    if bad:
        raise ValidationError(
            f"cache_salt must not contain {' '.join(map(repr, bad))}", parameter="cache_salt", value=salt[:40]
        )
    return salt


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
    multimodal: MultiModalProcessor | None = None,
) -> ProcessedPrompt:
    """multimodal: a vision-language model's processor; a prompt's multi_modal_data is refused without one."""
    text, token_ids = _parse(prompt, multimodal is not None)
    mm_inputs = None
    if isinstance(prompt, dict) and prompt.get("multi_modal_data") is not None:
        if truncate_prompt_tokens is not None:
            raise ValidationError("truncate_prompt_tokens cannot cut a prompt with images (it could cut an image's "
                                  "placeholders); shorten the text instead", parameter="truncate_prompt_tokens")
        data = prompt["multi_modal_data"]
        if isinstance(data, MultiModalInputs) and token_ids is not None:  # processed already (LLM.chat, the server)
            mm_inputs = data
        else:
            token_ids, mm_inputs = multimodal.process(text, token_ids, data, add_special_tokens)
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
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is not None:
        salt = check_cache_salt(salt)
    return ProcessedPrompt(text, list(token_ids), token_type_ids, salt, mm_inputs)


def _parse(prompt: Any, takes_images: bool = False) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if is_token_ids(prompt):
        return None, prompt
    if isinstance(prompt, dict):
        for key in prompt.keys() - _PROMPT_KEYS - ({"multi_modal_data"} if takes_images else set()):
            what = _UNSERVED_PROMPT_KEYS.get(key)
            if key == "multi_modal_data" and prompt[key] is not None:
                raise ValidationError(
                    "This model takes no multi_modal_data (images): it is a text-only model, or a vision-language "
                    "model served under tensor/pipeline parallelism, where images are not supported yet; send a "
                    "text prompt", parameter=key,
                )
            if what is not None and prompt[key] is not None:
                raise ValidationError(
                    f"The prompt's {key!r} asks for {what}, which hfbridge does not support yet; "
                    "send a text prompt without it", parameter=key,
                )
            if what is None:
                raise ValidationError(
                    f"Unknown prompt key {key!r}; a prompt dict takes {sorted(_PROMPT_KEYS)}", parameter=key
                )
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
