"""The plan styles: how each shards a module (or one parameter) of a model still on the meta device.

Module surgery as gpt-fast does it: parameters are replaced by their local shard (still on meta, tagged with a
ShardSpec the weight loader reads), and the few communications are forward hooks; the model's code is untouched.
Shapes: Linear weight [out, in] (colwise shards dim -2 = out, rowwise dim -1 = in); expert tensors
[E, out, in] are sharded the same way, so one rule serves both."""
from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hfbridge.parallel.shard_spec import ShardSpec, even_ranges
from hfbridge.parallel.state import TPGroup

FIX = 'hf_overrides={"base_model_tp_plan": {...}}'


class TPPlanError(ValueError):
    """A plan hfbridge cannot apply; raised before any weight is read."""


@dataclass(frozen=True)
class ShardContext:
    tp: TPGroup
    num_kv_heads: int
    head_dim: int

    def kv_head_ranges(self, out_features: int) -> tuple[tuple[int, int], ...] | None:
        """K/V projections when tp > num_kv_heads: each rank keeps the one whole KV head its query heads use."""
        if self.num_kv_heads >= self.tp.size or out_features != self.num_kv_heads * self.head_dim:
            return None
        head = self.tp.rank * self.num_kv_heads // self.tp.size
        return ((head * self.head_dim, (head + 1) * self.head_dim),)


def shard_parameter(owner: nn.Module, leaf: str, dim: int, ctx: ShardContext, name: str, pieces: int = 1,
                    ranges: tuple[tuple[int, int], ...] | None = None) -> None:
    param = owner._parameters[leaf]
    full = tuple(param.shape)
    size = full[dim]
    if ranges is None:
        if size % (pieces * ctx.tp.size):
            raise TPPlanError(
                f"{name}: dimension {dim} of size {size} ({pieces} packed piece(s)) does not split over "
                f"tensor_parallel_size={ctx.tp.size}; use a tp that divides it, or replicate this module with {FIX}"
            )
        ranges = even_ranges(size, ctx.tp.rank, ctx.tp.size, pieces)
    spec = ShardSpec(dim, ranges, full)
    local = nn.Parameter(torch.empty(spec.local_shape(), dtype=param.dtype, device="meta"), requires_grad=False)
    local.shard_spec = spec
    owner._parameters[leaf] = local
    if leaf == "weight":  # kept on the module too: loading replaces the parameter (LoRA layers read it)
        owner.weight_shard_spec = spec


def _weight_and_bias(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "weight" not in module._parameters:
        raise TPPlanError(f"{name} ({type(module).__name__}) has no weight to shard; fix the plan with {FIX}")
    return module, "weight"


def colwise(module: nn.Module, ctx: ShardContext, name: str, pieces: int = 1) -> None:
    owner, leaf = _weight_and_bias(module, name)
    kv = ctx.kv_head_ranges(owner._parameters[leaf].shape[-2]) if pieces == 1 else None
    shard_parameter(owner, leaf, -2, ctx, name, pieces, kv)
    if module._parameters.get("bias") is not None:
        shard_parameter(module, "bias", -1, ctx, name, pieces, kv)
    if isinstance(module, nn.Linear):
        module.out_features = module.weight.shape[0]


def packed_colwise(module: nn.Module, ctx: ShardContext, name: str) -> None:
    colwise(module, ctx, name, pieces=2)  # fused gate_up: the rank's part of gate, then of up


def _rowwise_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = self._tp.all_reduce(F.linear(x, self.weight))  # partial sums over the local input features
    return out if self.bias is None else out + self.bias  # the bias once, after the sum


def rowwise(module: nn.Module, ctx: ShardContext, name: str) -> None:
    owner, leaf = _weight_and_bias(module, name)
    shard_parameter(owner, leaf, -1, ctx, name)
    if not isinstance(module, nn.Linear):
        if module._parameters.get("bias") is not None:
            raise TPPlanError(f"{name}: rowwise on a {type(module).__name__} with a bias is not built; fix with {FIX}")
        module.register_forward_hook(lambda m, args, out: ctx.tp.all_reduce(out))
        return
    module.in_features = module.weight.shape[1]
    module._tp = ctx.tp
    module.forward = types.MethodType(_rowwise_linear_forward, module)


def rowwise_split_input(module: nn.Module, ctx: ShardContext, name: str) -> None:
    """Rowwise whose input arrives whole: each rank first keeps its slice of the last dimension."""
    rowwise(module, ctx, name)
    local = module.weight.shape[-1]
    start = ctx.tp.rank * local

    def split(m, args):
        return (args[0].narrow(-1, start, local), *args[1:])

    module.register_forward_pre_hook(split)


def colwise_gather_output(module: nn.Module, ctx: ShardContext, name: str) -> None:
    """Colwise, then the local outputs gathered so every rank holds the whole output (the LM head's logits)."""
    colwise(module, ctx, name)
    module.register_forward_hook(lambda m, args, out: ctx.tp.all_gather_last_dim(out))


def embedding_rowwise(module: nn.Module, ctx: ShardContext, name: str) -> None:
    """Vocab-parallel embedding: each rank looks up the ids in its vocab range, zeros the rest, then a sum."""
    shard_parameter(module, "weight", 0, ctx, name)
    local = module.weight.shape[0]
    start = ctx.tp.rank * local
    outside: dict[str, torch.Tensor] = {}

    def to_local(m, args):
        ids = args[0]
        outside["mask"] = (ids < start) | (ids >= start + local)
        return ((ids - start).masked_fill(outside["mask"], 0), *args[1:])

    def reduce(m, args, out):
        # Works for scaled embeddings too (Gemma multiplies in forward): zero rows stay zero.
        return ctx.tp.all_reduce(out.masked_fill(outside.pop("mask")[..., None], 0))

    module.register_forward_pre_hook(to_local)
    module.register_forward_hook(reduce)


def replicate(module: nn.Module, ctx: ShardContext, name: str) -> None:
    """Every rank holds the whole module (norms, routers, MLA's small latent projection)."""


def all_reduce_output(module: nn.Module, ctx: ShardContext, name: str) -> None:
    module.register_forward_hook(lambda m, args, out: ctx.tp.all_reduce(out))


_EXPERT_TENSORS = {"gate_up_proj": (-2, 2), "gate_proj": (-2, 1), "up_proj": (-2, 1), "down_proj": (-1, 1)}


def moe_experts(module: nn.Module, ctx: ShardContext, name: str) -> None:
    """Experts sharded on their intermediate dimension (every rank holds every expert's slice; the router stays
    replicated, so routing is identical everywhere), their weighted sum all-reduced. Expert parallelism is not
    built. 3D expert tensors the plan lists on their own were sharded already; the rest are sharded here."""
    for leaf, param in list(module._parameters.items()):
        if param is None or hasattr(param, "shard_spec") or param.dim() != 3:
            continue
        if leaf not in _EXPERT_TENSORS:
            raise TPPlanError(
                f"{name}.{leaf}: expert tensor of unknown role; intermediate-dim sharding knows "
                f"{sorted(_EXPERT_TENSORS)} (expert parallelism is not built); fix the plan with {FIX}"
            )
        dim, pieces = _EXPERT_TENSORS[leaf]
        shard_parameter(module, leaf, dim, ctx, f"{name}.{leaf}", pieces)
    all_reduce_output(module, ctx, name)


Style = Callable[[nn.Module, ShardContext, str], None]

# Every style the installed Transformers' configs use is here or in REFUSED (tests/test_tensor_parallel.py counts).
STYLES: dict[str, Style] = {
    "colwise": colwise,
    "unit_colwise": colwise,  # per-head K/V colwise: colwise keeps whole KV heads, replicated when tp > heads
    "rowwise": rowwise,
    "packed_colwise": packed_colwise,
    "colwise_gather_output": colwise_gather_output,
    "rowwise_split_input": rowwise_split_input,
    "embedding_rowwise": embedding_rowwise,
    "replicate": replicate,
    "replicated_with_grad_allreduce": replicate,  # the gradient all-reduce means nothing at inference
    "mla_kv_a_proj": replicate,  # MLA's latent KV projection is small: every rank computes it whole
    "all_reduce": all_reduce_output,
    "moe_tp_experts": moe_experts,
    "grouped_gemm": moe_experts,
    "ep_dispatch_experts": moe_experts,  # served by intermediate-dim sharding, not expert dispatch
}
# Styles some Transformers config uses that hfbridge does not build: refused with the reason.
REFUSED: dict[str, str] = {
    "packed_rowwise": "fused rowwise expert tensors are not built",
    "local_params": "local (DTensor-only) parameters are not built",
    "moe_identity_expert": "identity experts need expert parallelism, which is not built",
    "embedding_colwise": "hidden-dim sharded embeddings are not built",
}
