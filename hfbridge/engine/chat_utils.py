"""Rendering conversations with a tokenizer's chat template."""
from __future__ import annotations

import os
from typing import Any

from hfbridge.errors import ValidationError


def load_chat_template(chat_template: str | None) -> str | None:
    """A file path or the Jinja text itself."""
    if chat_template is not None and len(chat_template) < 4096 and os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            return f.read()
    return chat_template


def render_chat(
    tokenizer: Any,
    conversation: list[dict[str, Any]],
    *,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> str:
    if tokenizer is None:
        raise ValidationError("chat needs a tokenizer; the engine was started with skip_tokenizer_init=True")
    if add_generation_prompt and continue_final_message:
        raise ValidationError(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            parameter="continue_final_message",
        )
    template = load_chat_template(chat_template) or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValidationError(
            "The model's tokenizer has no chat template, so chat messages cannot be turned into a prompt. "
            "Pass a Jinja template with chat_template=... (--chat-template on the server), or send plain "
            "prompts with generate() / the /v1/completions route.",
            parameter="chat_template",
        )
    return tokenizer.apply_chat_template(
        conversation,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        tools=tools,
        **(chat_template_kwargs or {}),
    )
