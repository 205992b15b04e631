"""Linear projections on oneDNN's prepacked weights, for CPU float32: vLLM-CPU's `onednn_mm` idea with torch's own
ops. The weight [out, in] is laid out once (`torch.ops.mkldnn._reorder_linear_weight`, no batch-size hint: one
layout serves every token count) and each call runs oneDNN's GEMM on it. Against `F.linear` (MKL sgemm on the
plain weight), measured on the 2-core AVX-512 machine with SmolLM2-135M's shapes, ms per call:

| projection [out x in] | 1 token | 7 tokens | 64 tokens | 2048 tokens |
|---|---|---|---|---|
| qkv 960 x 576 | 0.22 -> 0.10 | 0.29 -> 0.12 | 0.72 -> 0.45 | 17.5 -> 12.9 |
| gate_up 3072 x 576 | 0.74 -> 0.47 | 1.02 -> 0.45 | 2.48 -> 1.36 | 46.9 -> 33.9 |
| down 576 x 1536 | 0.33 -> 0.22 | 0.43 -> 0.24 | 0.95 -> 0.73 | 23.8 -> 17.6 |
| LM head 49152 x 576 | 10.8 -> 6.1 | 40.7 -> 4.7 | 40.4 -> 19.6 | 869 -> 636 |

The call is a torch custom op, so compiled regions keep it as one opaque kernel (Inductor's own oneDNN lowering
wants the packed weight as a graph constant, which a graph shared by every layer cannot have). The packed copy
is a cache of the weight, never a parameter: the checkpoint names, `state_dict` and `apply_model` see the plain
weight, and `WeightPacks.refresh` re-lays it out when any weight was changed in place. Memory: one more copy of
each packed weight. Anything else (GPU, half precision, no oneDNN) calls F.linear.

One or two rows (decode steps of one or two requests) skip oneDNN for hfbridge/csrc/small_gemm.c on the plain
weight: at that size the time is reading the weight, which that kernel does closer to the memory's speed
(single-stream SmolLM2-135M, compiled, same tokens: 39 ms per token against 45-55 with oneDNN, in one process).
"""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import nn

from hfbridge.native_build import load_library

SMALL_GEMM_ROWS = 2  # up to this many rows, hfbridge/csrc/small_gemm.c instead of oneDNN


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [out, in] -> oneDNN's blocked layout of it, or None where the packed GEMM does not apply."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


@torch.library.custom_op("hfbridge::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] (T >= 1) -> [T, out], for `packed` from pack_weight(weight). One or two rows (decode steps of one
    or two requests, where reading the weight is the time) go through small_gemm.c on the plain weight, where it
    builds; more rows through oneDNN on the packed copy."""
    lib = _small_gemm() if x.shape[0] <= SMALL_GEMM_ROWS and weight.shape[1] % 16 == 0 else None
    if lib is None:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    x, out = x.contiguous(), x.new_empty(x.shape[0], weight.shape[0])
    lib.small_gemm(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
                   x.shape[0], weight.shape[0], weight.shape[1], torch.get_num_threads())
    return out


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@functools.cache
def _small_gemm() -> ctypes.CDLL | None:
    lib = load_library("small_gemm.c")
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.small_gemm.argtypes, lib.small_gemm.restype = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int], None
    return lib


class PackedLinear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) that runs on `packed` once WeightPacks has set it.
    Inputs are [T, in], as everywhere in the native decoders."""

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return packed_linear(x, self.weight, self.packed, self.bias)


class WeightPacks:
    """The packed copies of a model's PackedLinear weights, laid out again whenever a weight's version moved (a
    load, or an in-place edit through apply_model). `refresh` costs one version read per projection."""

    def __init__(self, model: nn.Module):
        self.linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
        self.versions: list[int] | None = None

    def refresh(self) -> None:
        versions = [m.weight._version for m in self.linears]
        if versions != self.versions:
            for m in self.linears:
                m.packed = pack_weight(m.weight)
            self.versions = versions
