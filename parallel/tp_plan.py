"""Apply the tensor-parallel plan Transformers merged for a built model (`model._tp_plan`) to that model while
it is still on the meta device: after this, each parameter has its local shape and a ShardSpec, so the weight
loader reads only this rank's slices. Every check here runs before a single weight is read."""
from __future__ import annotations

import logging
import re
from typing import Any

from torch import nn

from hfbridge.parallel.pp_plan import MissingLayer
from hfbridge.parallel.state import TPGroup
from hfbridge.parallel.styles import FIX, REFUSED, STYLES, ShardContext, TPPlanError, shard_parameter

logger = logging.getLogger(__name__)

# A plan entry that names a parameter (3D expert tensors) rather than a module: sharding dim and packed pieces.
_PARAMETER_STYLES = {"colwise": (-2, 1), "packed_colwise": (-2, 2), "rowwise": (-1, 1)}


def tp_plan_of(model: nn.Module) -> dict[str, Any]:
    """The merged plan with full module names. The shallowest module carrying `_tp_plan` holds it (Transformers
    merges children's plans into the top model); hfbridge's own wrappers add their child's prefix."""
    for prefix, module in model.named_modules():
        plan = getattr(module, "_tp_plan", None)
        if plan is not None:
            return {(f"{prefix}.{key}" if prefix else key): style for key, style in plan.items()}
    return {}


def check_heads(text_config: Any, tp: int) -> ShardContext | None:
    heads = getattr(text_config, "num_attention_heads", None)
    if heads is None:
        return None
    if heads % tp:
        raise TPPlanError(
            f"num_attention_heads={heads} is not divisible by tensor_parallel_size={tp}; use a tp that divides it"
        )
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    if kv < tp and tp % kv:
        raise TPPlanError(
            f"num_key_value_heads={kv} < tensor_parallel_size={tp} and {tp} is not a multiple of {kv}: KV heads "
            "cannot be replicated evenly; use a tp that divides or is a multiple of the KV head count"
        )
    return kv, getattr(text_config, "head_dim", None) or text_config.hidden_size // heads


def _pattern(key: str) -> re.Pattern:
    return re.compile(re.escape(key).replace(r"\*", r"[^.]+") + r"\Z")


def _check_style(name: str, style: Any) -> None:
    if not isinstance(style, str):
        raise TPPlanError(
            f"tp plan entry {name!r} has style {style!r} of type {type(style).__name__}; styles are strings "
            f"such as 'colwise' / 'rowwise'; fix it with {FIX}"
        )
    if style in REFUSED:
        raise TPPlanError(f"tp plan entry {name!r} uses style {style!r}: {REFUSED[style]}; replace it with {FIX}")
    if style not in STYLES:
        raise TPPlanError(
            f"tp plan entry {name!r} uses style {style!r}, which hfbridge does not know (known: {sorted(STYLES)}); "
            f"it is never replicated silently: replace it with {FIX}"
        )


def shard_model(model: nn.Module, text_config: Any, tp: TPGroup) -> dict[str, str]:
    """Shard `model` (on meta) for this rank; returns module/parameter name -> style applied."""
    plan = tp_plan_of(model)
    if not plan:
        raise TPPlanError(
            f"{type(model).__name__} has no base_model_tp_plan, so tensor_parallel_size={tp.size} has nothing to "
            f"shard by; give it one with {FIX}, or use tensor_parallel_size=1"
        )
    for key, style in plan.items():
        _check_style(key, style)
    kv, head_dim = check_heads(text_config, tp.size) or (1 << 30, 1)
    ctx = ShardContext(tp, kv, head_dim)
    patterns = [(_pattern(key), style) for key, style in plan.items()]
    applied: dict[str, str] = {}
    # Parameters first (expert tensors named on their own), then modules (whose styles may add hooks).
    for name, _ in list(model.named_parameters()):
        style = next((s for p, s in patterns if p.match(name)), None)
        if style is None:
            continue
        if style not in _PARAMETER_STYLES:
            raise TPPlanError(f"tp plan entry for parameter {name!r} has style {style!r}, built only for modules; {FIX}")
        owner_name, _, leaf = name.rpartition(".")
        dim, pieces = _PARAMETER_STYLES[style]
        shard_parameter(model.get_submodule(owner_name), leaf, dim, ctx, name, pieces)
        applied[name] = style
    for name, module in list(model.named_modules()):
        style = next((s for p, s in patterns if p.match(name)), None)
        if style is not None and name and not isinstance(module, MissingLayer):  # another pipeline stage's
            STYLES[style](module, ctx, name)
            applied[name] = style
    if not applied:
        raise TPPlanError(
            f"The tp plan of {type(model).__name__} names no module it has (e.g. {next(iter(plan))!r}); "
            f"tensor_parallel_size={tp.size} would shard nothing; fix the names with {FIX}"
        )
    logger.info("Tensor parallel rank %d/%d: %d modules sharded by the plan", tp.rank, tp.size, len(applied))
    return applied
