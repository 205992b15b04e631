"""The per-step state the "vllm" attention function reads: entered once per forward with `with`."""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hfbridge.attention_backends.metadata import AttentionMetadata

if TYPE_CHECKING:
    from hfbridge.attention_backends.base import AttentionBackend


@dataclass(frozen=True)
class ForwardContext:
    metadata: AttentionMetadata
    # layer_idx -> [2, num_blocks, block_size, num_kv_heads, head_dim]; empty for models without a cache (encoders)
    kv_caches: Mapping[int, torch.Tensor]
    backend: AttentionBackend


# A ContextVar, not a module global: each thread (the server's engine thread, a test) sees its own step.
_CURRENT: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("hfbridge_forward", default=None)


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    if _CURRENT.get() is not None:
        raise RuntimeError("forward_context() does not nest: a model step is already running in this context")
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def get_forward_context() -> ForwardContext:
    ctx = _CURRENT.get()
    if ctx is None:
        raise RuntimeError(
            "The 'vllm' attention implementation was called outside an hfbridge model step. "
            "It only works inside hfbridge's engine; use attn_implementation='sdpa' to run the model directly."
        )
    return ctx
