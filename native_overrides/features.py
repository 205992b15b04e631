"""Which configs the native Llama-family code implements: anything else runs through Transformers.

`unsupported_reason(config)` returns None when the native decoder reproduces Transformers' model exactly, else
one sentence naming the config field and value it lacks (logged under model_impl="auto", raised under "native").
"""
from __future__ import annotations

# Rope types whose cos/sin depend only on the position (a table computed once is exact). "dynamic" and "longrope"
# rescale with the current sequence length, which a packed batch of requests does not have.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def rope_parameters(config) -> dict:
    return getattr(config, "rope_parameters", None) or {}


def unsupported_reason(config) -> str | None:
    for check in (_rope, _activation, _layer_types):
        reason = check(config)
        if reason is not None:
            return reason
    return None


def _rope(config) -> str | None:
    params = rope_parameters(config)
    if "rope_type" not in params:  # per-layer-type rope tables (a dict of dicts) are not implemented
        return f"rope_parameters={params!r} has no single rope_type"
    if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
        return f"rope_type={params['rope_type']!r} is not one of the native rope types {list(SUPPORTED_ROPE_TYPES)}"
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        return f"partial_rotary_factor={params['partial_rotary_factor']} (partial rotary) is not implemented natively"
    return None


def _activation(config) -> str | None:
    act = getattr(config, "hidden_act", "silu")
    return None if act == "silu" else f"hidden_act={act!r} (the native MLP is SiLU-and-mul only)"


def _layer_types(config) -> str | None:
    unknown = sorted(set(getattr(config, "layer_types", None) or []) - set(SUPPORTED_LAYER_TYPES))
    return f"layer_types {unknown} are not implemented natively" if unknown else None

