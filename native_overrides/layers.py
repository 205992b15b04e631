"""The building blocks of the native decoders: fused RMSNorm + residual, the rotary table, and attention through
hfbridge's backend (the same call and KV layout the "vllm" Transformers entry makes). SiLU-and-mul runs inside the
gate_up projection (packed_linear.GateUpLinear)."""
from __future__ import annotations

import torch
from torch import nn

from hfbridge.attention_backends.forward_context import get_forward_context
from hfbridge.attention_backends.metadata import LayerOptions


class RMSNorm(nn.Module):
    """Transformers' RMSNorm arithmetic (float32 statistics, weight applied in the input dtype), with the residual
    add fused: `norm(x, residual)` returns (normed(x + residual), x + residual)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual


class RotaryTable(nn.Module):
    """cos/sin for every position up to `max_positions`, computed once with Transformers' own rope init function
    (so inv_freq and the attention scaling of linear / llama3 / yarn rope are exactly Transformers')."""

    def __init__(self, config, head_dim: int, max_positions: int, dtype: torch.dtype, device):
        super().__init__()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = config.rope_parameters
        if params["rope_type"] == "default":
            inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D], the same layout as Transformers' rotate_half
        self.register_buffer("cos", (emb.cos() * scaling).to(device=device, dtype=dtype), persistent=False)
        # sin with its first half negated: see _rotate
        signs = torch.cat((-torch.ones(head_dim // 2), torch.ones(head_dim // 2)))
        self.register_buffer("signed_sin", (emb.sin() * scaling * signs).to(device=device, dtype=dtype),
                             persistent=False)

    def warm_up_positions(self, num_tokens: int) -> torch.Tensor:
        """[num_tokens] positions for a compile warm-up, wrapped into the table (a short max_model_len makes it
        shorter than a warm-up's token count; an index past it aborts the compiled kernel)."""
        return torch.arange(num_tokens, device=self.cos.device) % self.cos.shape[0]

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        """q [T, H, D], k [T, Hkv, D], positions [T] -> rotated q, k."""
        cos, signed_sin = self.cos[positions][:, None, :], self.signed_sin[positions][:, None, :]
        return _rotate(q, cos, signed_sin), _rotate(k, cos, signed_sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Transformers' x * cos + rotate_half(x) * sin, bit for bit: for halves (x1, x2), rotate_half(x) * sin is
    (-x2 * sin1, x1 * sin2), and -x2 * sin1 == x2 * -sin1 exactly. Written per half, Inductor fuses each half into
    one loop, where materialising rotate_half's negated, concatenated copy took three (about 2-3x the time:
    docs/kernel-measurements.md)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos[..., :half] + x2 * signed_sin[..., :half],
                      x2 * cos[..., half:] + x1 * signed_sin[..., half:]), dim=-1)


def backend_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: LayerOptions
) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D], through this step's backend and this layer's KV cache."""
    ctx = get_forward_context()
    return ctx.backend.forward(query, key, value, ctx.kv_caches.get(layer.layer_idx), ctx.metadata, layer)
