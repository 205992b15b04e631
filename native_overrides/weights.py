"""Unfused checkpoint tensors into the native model's fused parameters (vLLM's stacked-parameter loading)."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

# (fused module name, checkpoint module name, shard): `...q_proj.weight` fills shard "q" of `...qkv_proj.weight`.
STACKED_PARAMS = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)

# fused module name -> its checkpoint modules, in the fused order: "qkv_proj" -> ["q_proj", "k_proj", "v_proj"]
FUSED_PARTS = {fused: [s for f, s, _ in STACKED_PARAMS if f == fused] for fused, _, _ in STACKED_PARAMS}


def _shard_rows(module: nn.Module, shard) -> slice:
    """Rows of the fused weight (dim 0) that one checkpoint tensor fills."""
    if shard in ("q", "k", "v"):  # module is an Attention
        q, kv = module.q_size, module.kv_size
        start = {"q": 0, "k": q, "v": q + kv}[shard]
        return slice(start, start + (q if shard == "q" else kv))
    size = module.gate_up_proj.out_features // 2  # module is an MLP
    return slice(shard * size, (shard + 1) * size)


def load_stacked_weights(
    model: nn.Module, weights: Iterable[tuple[str, Callable[[], torch.Tensor]]], skip_prefixes: tuple[str, ...] = ()
) -> set[str]:
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}  # parameter name -> rows filled
    for name, load in weights:
        if name.startswith(skip_prefixes) or "rotary_emb" in name:
            continue
        target, rows = _locate(model, name)
        if target not in params:
            raise ValueError(f"Checkpoint tensor {name} has no place in the native {type(model).__name__}; "
                             "use model_impl='transformers' for this checkpoint")
        param, tensor = params[target], load()
        dest = param.data if rows is None else param.data[rows]
        if tuple(tensor.shape) != tuple(dest.shape):
            raise ValueError(f"Checkpoint tensor {name} has shape {tuple(tensor.shape)} but the native model expects "
                             f"{tuple(dest.shape)} for {target}; the config does not match the weights")
        with torch.no_grad():
            dest.copy_(tensor)
        filled[target] = filled.get(target, 0) + dest.shape[0]
    missing = [n for n, p in params.items() if filled.get(n, 0) < p.shape[0]]
    if missing:
        raise ValueError(f"The checkpoint has no weights for {len(missing)} native model tensors (or only some of "
                         f"their rows) (e.g. {missing[:5]}); it does not match the config")
    return set(filled)


def _locate(model: nn.Module, name: str) -> tuple[str, slice | None]:
    """Checkpoint name -> (parameter name in the native model, rows of it or None for all)."""
    for fused, single, shard in STACKED_PARAMS:
        marker = f".{single}."
        if marker in name:
            target = name.replace(marker, f".{fused}.")
            module = model.get_submodule(target.rsplit(".", 2)[0])
            return target, _shard_rows(module, shard)
    return name, None


def checkpoint_names(model: nn.Module) -> list[str]:
    """The unfused checkpoint names `model`'s parameters load from (Transformers' own: `...q_proj.weight` for a
    shard of `...qkv_proj.weight`), found without building the Transformers model."""
    names = []
    for name in model.state_dict():
        fused = next((f for f in FUSED_PARTS if f".{f}." in name), None)
        names += [name.replace(f".{fused}.", f".{single}.") for single in FUSED_PARTS[fused]] if fused else [name]
    return names
