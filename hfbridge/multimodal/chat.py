"""Chat messages with image parts (OpenAI's content parts, and vLLM's image_pil) -> messages whose image parts are
{"type": "image"}, as processors' chat templates expect them, and the images in order."""
from __future__ import annotations

from typing import Any

from hfbridge.config import MultiModalConfig
from hfbridge.errors import ValidationError
from hfbridge.multimodal.media import PixelBudget, check_image, check_image_count, load_image_url

IMAGE_PART_TYPES = ("image_url", "image_pil", "image")


def count_image_parts(conversation: list[dict[str, Any]]) -> int:
    return sum(isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES
               for message in conversation if isinstance(message, dict) and isinstance(message.get("content"), list)
               for part in message["content"])


def split_images(conversation: list[dict[str, Any]], config: MultiModalConfig | None,
                 model: str = "this model") -> tuple[list[dict[str, Any]], list]:
    """config None: a model that takes no images (any image part is refused). The count is checked before any
    image is fetched or decoded."""
    if config is not None:
        check_image_count(count_image_parts(conversation), config, "messages")
    images, messages = [], []
    budget = PixelBudget(config, "messages") if config is not None else None
    for message in conversation:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            messages.append(message)
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in IMAGE_PART_TYPES:
                parts.append(part)
                continue
            if config is None:
                raise ValidationError(f"{model} takes no images (a text-only model, or images are not served with "
                                      f"its settings); send text content parts only", parameter="messages")
            images.append(_image_of(part, kind, budget))
            parts.append({"type": "image"})
        messages.append({**message, "content": parts})
    return messages, images


def _image_of(part: dict[str, Any], kind: str, budget: PixelBudget):
    value = part.get(kind)
    if kind == "image_url":
        url = value.get("url") if isinstance(value, dict) else value
        return load_image_url(url, budget)
    if isinstance(value, str):  # {"type": "image", "image": "data:..."}
        return load_image_url(value, budget)
    return check_image(value, budget)
