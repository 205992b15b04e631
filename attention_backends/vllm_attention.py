"""The "vllm" entry in Transformers' AttentionInterface: every attention call of a loaded model lands here."""
from __future__ import annotations

import torch

from hfbridge.attention_backends.forward_context import get_forward_context
from hfbridge.attention_backends.metadata import LayerOptions

ATTENTION_NAME = "vllm"


def vllm_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, D], all requests of the step packed along T
    key: torch.Tensor,  # [1, Hkv, T, D], after RoPE; only this step's tokens (use_cache=False)
    value: torch.Tensor,  # [1, Hkv, T, D]
    attention_mask: torch.Tensor | None,  # always None: no mask function is registered under this name
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    ctx = get_forward_context()
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None and ctx.kv_caches:  # encoders keep no cache and may leave layer_idx unset
        raise RuntimeError(f"{type(module).__name__} has no integer `layer_idx`; hfbridge finds each layer's cache by it")
    head_dim = query.shape[-1]
    layer = LayerOptions(
        layer_idx=layer_idx,
        scaling=head_dim**-0.5 if scaling is None else float(scaling),
        sliding_window=kwargs.get("sliding_window"),
        softcap=kwargs.get("softcap"),
        is_causal=bool(kwargs.get("is_causal", getattr(module, "is_causal", True))),
        sinks=kwargs.get("s_aux"),
    )
    value_dim = value.shape[-1]
    if value_dim < head_dim:  # MLA (DeepSeek): V heads narrower than Q/K; zero columns add nothing to the output
        value = torch.nn.functional.pad(value, (0, head_dim - value_dim))
    out = ctx.backend.forward(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        ctx.kv_caches.get(layer_idx) if layer_idx is not None else None,
        ctx.metadata,
        layer,
    )
    return out[None, ..., :value_dim], None  # [1, T, H, Dv]


def register_vllm_attention() -> None:
    """Called explicitly at engine start. Only the attention interface: with no mask function under this
    name, Transformers builds no attention masks at all. Imported here: Transformers' modeling_utils costs seconds
    of start-up, and natively implemented models never need it."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, vllm_attention_forward)
