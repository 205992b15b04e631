"""Which projections of a served model take LoRA layers, under the names PEFT gives them.

Native decoders (native_overrides/llama.py): fused qkv_proj and gate_up_proj take the q/k/v and gate/up slices of
the Transformers names (`model.layers.0.self_attn.q_proj`, ...), o_proj and down_proj their own; the projection
calls its `lora` in forward. Transformers models: every nn.Linear but the LM head, a forward hook adding the
delta to the module's output (the module's own code is untouched, sharded or not)."""
from __future__ import annotations

import torch
from torch import nn

from hfbridge.config import LoRAConfig
from hfbridge.lora.layers import LoRALayer, LoRAStepState, ShardedIO
from hfbridge.quantization.quantized_linear import QuantizedLinear


def install_lora_layers(model: nn.Module, state: LoRAStepState, config: LoRAConfig, dtype: torch.dtype,
                        device: torch.device) -> list[LoRALayer]:
    def layer(names, in_features, out_sizes, sharded=None) -> LoRALayer:
        return LoRALayer(state, names, in_features, out_sizes, config.max_loras, config.max_lora_rank, dtype,
                         device, sharded)

    if hasattr(model, "packs"):  # a native decoder
        return _install_native(model, layer)
    hf_model = getattr(model, "model", None)
    if hf_model is None or not hasattr(hf_model, "get_output_embeddings"):
        raise ValueError(f"LoRA adapters are not supported for {type(model).__name__}")
    return _install_transformers(hf_model, layer)


def _install_native(model: nn.Module, layer) -> list[LoRALayer]:
    layers = []
    for i, decoder in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        attn, mlp = decoder.self_attn, decoder.mlp
        q, kv = attn.q_size, attn.kv_size
        hidden, inter = attn.qkv_proj.in_features, mlp.down_proj.in_features
        specs = [
            (attn.qkv_proj, [f"{prefix}.self_attn.{p}_proj" for p in "qkv"], hidden, [q, kv, kv]),
            (attn.o_proj, [f"{prefix}.self_attn.o_proj"], q, [hidden]),
            (mlp.gate_up_proj, [f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"], hidden, [inter, inter]),
            (mlp.down_proj, [f"{prefix}.mlp.down_proj"], inter, [hidden]),
        ]
        for module, names, in_features, out_sizes in specs:
            module.lora = layer(names, in_features, out_sizes)
            layers.append(module.lora)
    return layers


def _install_transformers(hf_model: nn.Module, layer) -> list[LoRALayer]:
    head = hf_model.get_output_embeddings()
    layers = []
    for name, module in hf_model.named_modules():
        if not isinstance(module, (nn.Linear, QuantizedLinear)) or module is head:  # a GGUF's, on its blocks
            continue
        spec = getattr(module, "weight_shard_spec", None)  # set by parallel/styles.py when tensor parallel
        sharded, in_features, out_features = None, module.in_features, module.out_features
        if spec is not None:
            out_features, in_features = spec.full_shape[-2], spec.full_shape[-1]
            if spec.dim % 2 == 0:  # colwise: dim -2 of [out, in]
                sharded = ShardedIO(out_ranges=spec.ranges)
            elif getattr(module, "_tp", None) is not None:  # rowwise nn.Linear (parallel/styles.py: rowwise)
                sharded = ShardedIO(in_ranges=spec.ranges, tp=module._tp)
            else:
                raise ValueError(f"LoRA on the sharded module {name} ({type(module).__name__}) is not built")
        lora = layer([name], in_features, [out_features], sharded)
        module.register_forward_hook(lambda m, args, out, lora=lora: lora(args[0], out))
        layers.append(lora)
    return layers
