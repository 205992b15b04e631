"""A native decoder on a GGUF file's blocks: each projection whose checkpoint tensors are quantized becomes a
QuantizedLinear (the fused qkv_proj and gate_up_proj take their parts in the fused order), a quantized embedding
a QuantizedEmbedding, a quantized head a QuantizedHead. Done on the meta model, before any parameter is allocated,
so no float copy of a quantized weight is ever made."""
from __future__ import annotations

import torch
from torch import nn

from hfbridge.quantization.gguf_checkpoint import QuantizedWeight
from hfbridge.quantization.quantized_linear import QuantizedEmbedding, QuantizedGateUp, QuantizedHead, QuantizedLinear

Weights = dict[str, torch.Tensor | QuantizedWeight]


def install_quantized(model: nn.Module, weights: Weights) -> Weights:
    """Swap `model`'s (a NativeCausalLM on meta) modules for the quantized ones `weights` (Transformers names)
    calls for; returns the float tensors left for `load_weights`."""
    opts, dtype, left = model.options, model.model.norm.weight.dtype, dict(weights)
    for i, layer in enumerate(model.model.layers):
        attn, mlp, prefix = layer.self_attn, layer.mlp, f"model.layers.{i}"
        _swap(attn, "qkv_proj", left, [f"{prefix}.self_attn.{p}_proj" for p in "qkv"], opts.qkv_bias, dtype)
        _swap(attn, "o_proj", left, [f"{prefix}.self_attn.o_proj"], opts.o_bias, dtype)
        _swap(mlp, "gate_up_proj", left, [f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"], opts.mlp_bias,
              dtype, QuantizedGateUp)
        _swap(mlp, "down_proj", left, [f"{prefix}.mlp.down_proj"], opts.mlp_bias, dtype)
    embedding = left.get("model.embed_tokens.weight")
    if isinstance(embedding, QuantizedWeight):
        model.model.embed_tokens = QuantizedEmbedding(left.pop("model.embed_tokens.weight"), dtype)
    head = embedding if opts.tie_word_embeddings else left.get("lm_head.weight")
    if isinstance(head, QuantizedWeight):
        left.pop("lm_head.weight", None)
        if hasattr(model, "lm_head"):
            del model.lm_head
        model.quantized_head = QuantizedHead(head)
    return left


def _swap(parent: nn.Module, attr: str, weights: Weights, names: list[str], bias: bool, dtype: torch.dtype,
          cls: type[QuantizedLinear] = QuantizedLinear) -> None:
    parts = [weights.get(f"{name}.weight") for name in names]
    if not any(isinstance(p, QuantizedWeight) for p in parts):
        return  # all float: the packed float projection serves it
    if any(p is None for p in parts):
        raise ValueError(f"The GGUF file has no weight for {[n for n, p in zip(names, parts) if p is None]}")
    for name in names:
        del weights[f"{name}.weight"]
    setattr(parent, attr, cls([p if isinstance(p, QuantizedWeight) else p.to(dtype) for p in parts], bias, dtype))
