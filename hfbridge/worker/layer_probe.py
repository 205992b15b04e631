"""What each attention layer of a model looks like, found by running it once.

Layer shapes are not guessed from config fields (which differ per architecture): a one-token forward
records what each call to the "vllm" attention entry actually receives. It doubles as the compatibility
check that the model's attention goes through `ALL_ATTENTION_FUNCTIONS` at all."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hfbridge.attention_backends import AttentionMetadata, ForwardContext, LayerOptions, forward_context
from hfbridge.model.compatibility import UnsupportedModelError


@dataclass(frozen=True)
class LayerSpec:
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    is_causal: bool
    sliding_window: int | None = None


class _ProbeBackend:
    """Records the K/V shape each layer passes and returns zeros."""

    name = "probe"

    def __init__(self):
        self.layers: dict[int, LayerSpec] = {}

    def forward(self, query, key, value, kv_cache, metadata, layer: LayerOptions) -> torch.Tensor:
        self.layers[layer.layer_idx] = LayerSpec(
            key.shape[1], key.shape[2], key.dtype, layer.is_causal, layer.sliding_window
        )
        return torch.zeros_like(query)


def probe_attention_layers(model: nn.Module, device: torch.device) -> dict[int, LayerSpec]:
    probe = _ProbeBackend()
    metadata = AttentionMetadata.build(slot_mapping=[-1], query_lens=[1], seq_lens=[1], block_tables=[[]], device=device)
    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    with torch.inference_mode(), forward_context(ForwardContext(metadata, {}, probe)):
        model(ids, ids.clone())
    if not probe.layers:
        raise UnsupportedModelError(
            f"{_user_class_name(model)} made no call to the 'vllm' attention function: its attention modules "
            "must call ALL_ATTENTION_FUNCTIONS[config._attn_implementation] (not sdpa or eager directly), so that "
            "hfbridge can run attention over its KV cache"
        )
    return dict(sorted(probe.layers.items()))


def _user_class_name(model: nn.Module) -> str:
    """The innermost Transformers model under hfbridge's wrappers (what the user wrote or chose)."""
    while hasattr(model, "model") and isinstance(model.model, nn.Module):
        model = model.model
    base = getattr(model, "base_model", None)
    return type(base if isinstance(base, nn.Module) else model).__name__
