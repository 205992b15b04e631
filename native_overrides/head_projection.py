"""The LM head on the CPU: the one projection as wide as the vocabulary ([V, H], e.g. 49152 x 576), run for every
sampled row of every step. In float32 with MKL / oneDNN present, its weight is laid out once for those libraries'
GEMMs: MKL's packed format for the single-stream row (about half F.linear's time measured on SmolLM2's head) and
oneDNN's blocked format for batches (about two thirds of F.linear's time). Results equal F.linear's up to float32
summation order. Anything else (GPU, half precision, no MKL) calls F.linear."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _cpu_float32(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32


class HeadProjection:
    """hidden [N, H] -> logits [N, V] for weight [V, H]. Not a module: the laid-out copies are caches of the
    weight (rebuilt if the weight changes in place, e.g. through apply_model), never parameters or state."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.version = weight._version
        cpu32 = _cpu_float32(weight)
        self.packed_row = torch.ops.mkl._mkl_reorder_linear_weight(weight, 1) if cpu32 and torch._C.has_mkl else None
        self.blocked = weight.to_mkldnn() if cpu32 and torch.backends.mkldnn.is_available() else None

    def is_current(self, weight: torch.Tensor) -> bool:
        return weight is self.weight and weight._version == self.version

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        if hidden.dtype == torch.float32 and hidden.device.type == "cpu" and rows > 0:
            hidden = hidden.contiguous()
            if rows == 1 and self.packed_row is not None:
                return torch.ops.mkl._mkl_linear(hidden, self.packed_row, self.weight, None, 1)
            if rows > 1 and self.blocked is not None:
                return torch._C._nn.mkldnn_linear(hidden.to_mkldnn(), self.blocked, None).to_dense()
        return F.linear(hidden, self.weight)
