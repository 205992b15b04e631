"""Attention for hfbridge: the "vllm" entry in Transformers' AttentionInterface and the paged backends under it."""
from hfbridge.attention_backends.forward_context import ForwardContext, forward_context, get_forward_context
from hfbridge.attention_backends.metadata import AttentionMetadata, LayerOptions
from hfbridge.attention_backends.registry import get_attention_backend
from hfbridge.attention_backends.vllm_attention import ATTENTION_NAME, register_vllm_attention

__all__ = [
    "ATTENTION_NAME",
    "AttentionMetadata",
    "ForwardContext",
    "LayerOptions",
    "forward_context",
    "get_attention_backend",
    "get_forward_context",
    "register_vllm_attention",
]
