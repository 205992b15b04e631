"""A native decoder on a GGUF file's blocks: each projection whose checkpoint tensors are quantized becomes a
QuantizedLinear (the fused qkv_proj and gate_up_proj take their parts in the fused order), a quantized embedding
a QuantizedEmbedding, a quantized head a QuantizedHead. Done on the meta model, before any parameter is allocated,
so no float copy of a quantized weight is ever made."""
from __future__ import annotations

import torch
from torch import nn

from hfbridge.native_overrides.packed_linear import GateUpLinear, PackedLinear
from hfbridge.native_overrides.weights import FUSED_PARTS
from hfbridge.quantization.gguf_checkpoint import QuantizedWeight
from hfbridge.quantization.quantized_linear import QuantizedEmbedding, QuantizedGateUp, QuantizedHead, QuantizedLinear

Weights = dict[str, torch.Tensor | QuantizedWeight]


def install_quantized(model: nn.Module, weights: Weights) -> Weights:
    """Swap `model`'s (a NativeCausalLM on meta) modules for the quantized ones `weights` (Transformers names)
    calls for; returns the float tensors left for `load_weights`."""
    dtype, left = model.model.norm.weight.dtype, dict(weights)
    for i, layer in enumerate(model.model.layers):
        for block in ("self_attn", "mlp"):
            for attr, linear in list(getattr(layer, block).named_children()):
                if isinstance(linear, PackedLinear):
                    names = [f"model.layers.{i}.{block}.{part}" for part in FUSED_PARTS.get(attr, [attr])]
                    _swap(getattr(layer, block), attr, linear, left, names, dtype)
    embedding = left.get("model.embed_tokens.weight")
    if isinstance(embedding, QuantizedWeight):
        model.model.embed_tokens = QuantizedEmbedding(left.pop("model.embed_tokens.weight"), dtype)
    head = embedding if model.options.tie_word_embeddings else left.get("lm_head.weight")
    if isinstance(head, QuantizedWeight):
        left.pop("lm_head.weight", None)
        if hasattr(model, "lm_head"):
            del model.lm_head
        model.quantized_head = QuantizedHead(head)
    return left


def _swap(parent: nn.Module, attr: str, linear: PackedLinear, weights: Weights, names: list[str],
          dtype: torch.dtype) -> None:
    """parent.attr (`linear`, loading the checkpoint modules `names`) -> its quantized twin, if any part is."""
    parts = [weights.get(f"{name}.weight") for name in names]
    if not any(isinstance(p, QuantizedWeight) for p in parts):
        return  # all float: the packed float projection serves it
    if any(p is None for p in parts):
        raise ValueError(f"The GGUF file has no weight for {[n for n, p in zip(names, parts) if p is None]}")
    for name in names:
        del weights[f"{name}.weight"]
    cls = QuantizedGateUp if isinstance(linear, GateUpLinear) else QuantizedLinear
    parts = [p if isinstance(p, QuantizedWeight) else p.to(dtype) for p in parts]
    setattr(parent, attr, cls(parts, linear.bias is not None, dtype))
