"""Attention backends by name, imported lazily; `auto` picks the fastest one that runs here."""
from __future__ import annotations

import importlib
import logging
import os

import torch

from hfbridge.attention_backends.base import AttentionBackend

logger = logging.getLogger(__name__)

# name -> (module inside hfbridge.attention_backends, class)
BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("torch_backend", "TorchReferenceBackend"),
}


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run on `device`, else why not."""
    if name not in BACKENDS:
        return f"unknown attention backend {name!r}; choose one of {['auto', *BACKENDS]}"
    return None


def auto_backend_name(device: torch.device) -> str:
    for name in ("flash_attn", "triton"):
        if name in BACKENDS and unavailable_reason(name, device) is None:
            return name
    return "torch"


def get_attention_backend(name: str | None, device: torch.device) -> AttentionBackend:
    name = name or os.environ.get("HFBRIDGE_ATTENTION_BACKEND") or "auto"
    if name == "auto":
        name = auto_backend_name(device)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise ValueError(f"attention_backend={name!r} cannot be used: {reason}")
    module_name, class_name = BACKENDS[name]
    module = importlib.import_module(f"hfbridge.attention_backends.{module_name}")
    backend = getattr(module, class_name)()
    logger.info("Attention backend: %s", name)
    return backend
