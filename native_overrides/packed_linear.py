"""Linear projections on a copy of the weight laid out for hfbridge/csrc/panel_gemm.c, for CPU float32: vLLM-CPU's
prepacked-weight idea (`onednn_mm`) with a kernel of our own. The weight [out, in] is laid out once, in panels of
32 output columns ([ceil(out / 32), in, 32], zero-padded), and every call, from one token to a 2048-token prefill,
runs the one C kernel on it.

Why not oneDNN's packed GEMM (torch.ops.mkldnn._linear_pointwise, which this module called before): measured on
the 2-core AVX-512 machine with SmolLM2-135M's four projections, 30 copies each so the weights come from memory
as in a real step, ms per decoder step (F.linear's MKL sgemm is slower than both):

| rows | oneDNN packed | panel_gemm.c |
|---|---|---|
| 1 | 28.8 (the earlier one-row C kernel) | 19.0 |
| 4 | 27.5 | 21.7 |
| 16 | 42.3 | 33.6 |
| 64 | 94.5 | 90.2 |
| 2048 | 2767 | 2833 |

It is also batch invariant: a row's output has the same bits whatever else is in the batch (one sequential sum
over `in` per element), where oneDNN picks its algorithm by row count.

The call is a torch custom op, so compiled regions keep it as one opaque kernel. The panel copy is a cache of the
weight, never a parameter: the checkpoint names, `state_dict` and `apply_model` see the plain weight, and
`WeightPacks.refresh` lays it out again when any weight was changed in place. Memory: one more copy of each
weight. Anything else (GPU, half precision, no C compiler) calls F.linear.
"""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import nn

from hfbridge.native_build import load_library

PANEL_COLUMNS = 32  # output columns per panel; COLS in panel_gemm.c


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [out, in] -> panels [ceil(out / 32), in, 32] (panels[j, k, c] = weight[32 j + c, k], zeros past
    `out`), or None where the kernel does not apply (then the caller runs F.linear)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2 or _panel_gemm() is None:
        return None
    out_features, in_features = weight.shape
    num_panels, padded = -(-out_features // PANEL_COLUMNS), weight.detach()
    if out_features % PANEL_COLUMNS:  # one copy fewer at start-up where no padding is needed (the usual case)
        padded = padded.new_zeros(num_panels * PANEL_COLUMNS, in_features)
        padded[:out_features] = weight.detach()
    return padded.reshape(num_panels, PANEL_COLUMNS, in_features).transpose(1, 2).contiguous()


@torch.library.custom_op("hfbridge::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] -> [T, out] = x @ weight^T (+ bias), for `packed` from pack_weight(weight)."""
    out_features, in_features = weight.shape
    x, out = x.contiguous(), x.new_empty(x.shape[0], out_features)
    if x.shape[0] > 0:
        bias = None if bias is None else bias.contiguous()
        _panel_gemm().panel_gemm(x.data_ptr(), packed.data_ptr(), None if bias is None else bias.data_ptr(),
                                 out.data_ptr(), x.shape[0], out_features, in_features, torch.get_num_threads())
    return out


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@functools.cache
def _panel_gemm() -> ctypes.CDLL | None:
    lib = load_library("panel_gemm.c")
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.panel_gemm.argtypes, lib.panel_gemm.restype = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int], None
    return lib


class PackedLinear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) that runs on `packed` once WeightPacks has set it.
    Inputs are [T, in], as everywhere in the native decoders."""

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or x.dtype != torch.float32:
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
