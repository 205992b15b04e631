"""Attention backends by name, imported lazily; `auto` picks the fastest one that runs here."""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable

import torch

from hfbridge.attention_backends.base import AttentionBackend

logger = logging.getLogger(__name__)

# name -> (module inside hfbridge.attention_backends, class)
BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("torch_backend", "TorchReferenceBackend"),
    "triton": ("triton_backend", "TritonAttentionBackend"),
    "flash_attn": ("flash_attn_backend", "FlashAttnBackend"),
}
ENV_VAR = "HFBRIDGE_ATTENTION_BACKEND"


def _triton_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux x86-64 with a CUDA GPU)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        kernels = sys.modules.get("hfbridge.attention_backends.triton_kernels")
        if kernels is not None and not kernels.INTERPRETED:
            return "hfbridge's Triton kernels were imported before TRITON_INTERPRET=1 was set; set it earlier"
        return None  # the CPU interpreter: slow, for tests only
    return (f"Triton needs a CUDA device (got {device.type}), or TRITON_INTERPRET=1 for its slow, test-only CPU "
            "interpreter (set before hfbridge imports its kernels)")


def _flash_attn_reason(device: torch.device) -> str | None:
    reasons = []
    if importlib.util.find_spec("flash_attn") is None:
        reasons.append("flash_attn is not installed (pip install hfbridge[flash])")
    if device.type != "cuda":
        reasons.append(f"flash_attn needs CUDA (got device {device.type})")
    if not reasons:
        try:
            importlib.import_module("flash_attn")
        except Exception as e:  # e.g. built against another torch: undefined symbols
            reasons.append(f"flash_attn is installed but does not import: {e}")
    return "; ".join(reasons) or None


# backend -> check; backends not listed run anywhere
_CHECKS: dict[str, Callable[[torch.device], str | None]] = {
    "triton": _triton_reason,
    "flash_attn": _flash_attn_reason,
}


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run on `device`, else why not."""
    if name not in BACKENDS:
        return f"unknown attention backend {name!r}; choose one of {['auto', *BACKENDS]}"
    check = _CHECKS.get(name)
    return None if check is None else check(device)


def auto_backend_name(device: torch.device) -> str:
    """flash-attn, then Triton, on CUDA; the torch reference elsewhere (the Triton interpreter is for tests)."""
    if device.type != "cuda":
        return "torch"
    for name in ("flash_attn", "triton"):
        if unavailable_reason(name, device) is None:
            return name
    return "torch"


def resolve_backend_name(name: str | None, device: torch.device) -> str:
    """`name` in auto | torch | triton | flash_attn; None or "auto" defer to $HFBRIDGE_ATTENTION_BACKEND, then
    pick the fastest available. Raises ValueError naming why an explicit choice cannot run."""
    source = ""
    if name in (None, "auto") and os.environ.get(ENV_VAR):
        name, source = os.environ[ENV_VAR], f" (from ${ENV_VAR})"
    if name in (None, "auto"):
        name = auto_backend_name(device)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise ValueError(f"attention_backend={name!r}{source} cannot be used: {reason}")
    return name


def get_attention_backend(name: str | None, device: torch.device) -> AttentionBackend:
    name = resolve_backend_name(name, device)
    module_name, class_name = BACKENDS[name]
    module = importlib.import_module(f"hfbridge.attention_backends.{module_name}")
    backend = getattr(module, class_name)()
    logger.info("Attention backend: %s", name)
    return backend
