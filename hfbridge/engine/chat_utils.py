"""Rendering conversations with a tokenizer's chat template."""
from __future__ import annotations

import inspect
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
    documents: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> str:
    """documents: for RAG templates (Transformers' apply_chat_template(documents=...)); None renders none."""
    if tokenizer is None:
        raise ValidationError("chat needs a tokenizer; the engine was started with skip_tokenizer_init=True")
    if add_generation_prompt and continue_final_message:
        raise ValidationError(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            parameter="continue_final_message",
        )
    if continue_final_message and (not conversation or not isinstance(conversation[-1], dict)
                                   or conversation[-1].get("content") is None):
        raise ValidationError(
            "continue_final_message continues the last message's content, and the last message has none (its "
            "content is null); send its text, or set continue_final_message to false",
            parameter="continue_final_message",
        )
    # null content (an assistant turn that only calls tools) renders as "", as vLLM renders it: templates that
    # concatenate content would fail on None
    conversation = [{**m, "content": ""} if isinstance(m, dict) and m.get("content") is None else m
                    for m in conversation]
    reserved = sorted(set(chat_template_kwargs or ()) & reserved_template_kwargs(tokenizer))
    if reserved:
        raise ValidationError(
            f"chat_template_kwargs cannot set {', '.join(reserved)}: those are parameters of the tokenizer's "
            "apply_chat_template (set by hfbridge, or by their own request fields), not template variables",
            parameter="chat_template_kwargs",
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
        documents=documents,
        **(chat_template_kwargs or {}),
    )


CONTENT_FORMATS = ("auto", "string", "openai")


def format_conversation(
    conversation: list[dict[str, Any]], content_format: str, chat_template: str | None
) -> list[dict[str, Any]]:
    """Messages' `content` in the form the template expects (vLLM's chat_template_content_format): "string"
    (text parts joined by newlines), "openai" (a list of {"type": "text", "text": ...} parts), or "auto": "openai"
    when the template loops over a message's content, else "string"."""
    if content_format not in CONTENT_FORMATS:
        raise ValidationError(
            f"chat_template_content_format must be one of {list(CONTENT_FORMATS)}, got {content_format!r}",
            parameter="chat_template_content_format", value=content_format,
        )
    if content_format == "auto":
        content_format = "openai" if _loops_over_content(chat_template) else "string"
    return [
        {**m, "content": _format_content(m["content"], content_format)} if m.get("content") is not None else m
        for m in conversation
    ]


def _format_content(content: Any, content_format: str) -> str | list[dict[str, str]]:
    parts = [content] if isinstance(content, str) else list(content)
    if content_format == "string":
        if any(_is_image(part) for part in parts):
            raise ValidationError("the chat template takes each message's content as a string, so it cannot place "
                                  "images; use a template that loops over content parts "
                                  "(chat_template_content_format='openai')", parameter="chat_template_content_format")
        return "\n".join(_text_of(part) for part in parts)
    return [part if _is_image(part) else {"type": "text", "text": _text_of(part)} for part in parts]


def _is_image(part: Any) -> bool:
    """An image part as multimodal/chat.py leaves it for the template."""
    return isinstance(part, dict) and part.get("type") == "image" and len(part) == 1


def _text_of(part: Any) -> str:
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    raise ValidationError(f"only text content parts are supported, got {kind!r}", parameter="messages")


def _loops_over_content(chat_template: str | None) -> bool:
    """Whether the Jinja template has a `{% for ... in <something>.content %}` / `[...]['content']` loop."""
    if not chat_template:
        return False
    import jinja2
    from jinja2 import nodes

    try:
        ast = jinja2.Environment().parse(chat_template)
    except jinja2.TemplateSyntaxError:
        return False
    for loop in ast.find_all(nodes.For):
        target = loop.iter
        if isinstance(target, nodes.Getattr) and target.attr == "content":
            return True
        if isinstance(target, nodes.Getitem) and isinstance(target.arg, nodes.Const) and target.arg.value == "content":
            return True
    return False


def reserved_template_kwargs(tokenizer: Any) -> frozenset[str]:
    """Names a chat_template_kwargs entry may not take: apply_chat_template's own parameters (tokenize,
    return_dict, ...: they change what it returns, not what the template sees) and `messages`."""
    signature = inspect.signature(tokenizer.apply_chat_template)
    named = (p.name for p in signature.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
    return frozenset(named) | {"messages"}
