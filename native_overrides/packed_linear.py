"""Linear projections on a copy of the weight laid out for hfbridge/csrc/panel_gemm.c, for CPU float32: vLLM-CPU's
prepacked-weight idea (`onednn_mm`) with a kernel of our own. The weight [out, in] is laid out once, in panels of
C output columns ([ceil(out / C), in, C], zero-padded; C is two of the machine's vectors: 32 floats with AVX-512,
16 with AVX2), and every call, from one token to a 2048-token prefill, runs the one C kernel on it.

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

from hfbridge.compilation import graph_op
from hfbridge.native_build import load_library

def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [out, in] -> its panels for this machine's panel_gemm (`lay_out`), or None where the kernel does not
    apply (then the caller runs F.linear)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2 or _panel_gemm() is None:
        return None
    return lay_out(weight, _panel_gemm().panel_columns())


def lay_out(weight: torch.Tensor, columns: int) -> torch.Tensor:
    """weight [out, in] -> panels [ceil(out / C), in, C] with C = `columns` (panels[j, k, c] = weight[C j + c, k],
    zeros past `out`)."""
    out_features, in_features = weight.shape
    num_panels, padded = -(-out_features // columns), weight.detach()
    if out_features % columns:  # one copy fewer at start-up where no padding is needed (the usual case)
        padded = padded.new_zeros(num_panels * columns, in_features)
        padded[:out_features] = weight.detach()
    return padded.reshape(num_panels, columns, in_features).transpose(1, 2).contiguous()


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] -> [T, out] = x @ weight^T (+ bias), for `packed` from pack_weight(weight)."""
    return run_panel_gemm(_panel_gemm(), x, packed, bias, weight.shape[0])


# An operator inside torch.compile graphs, a plain call in eager code (graph_op)
packed_linear = graph_op(
    "hfbridge::packed_linear", "(Tensor x, Tensor weight, Tensor packed, Tensor? bias) -> Tensor", _packed_linear,
    lambda x, weight, packed, bias: x.new_empty(x.shape[0], weight.shape[0]))


def run_panel_gemm(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                   out_features: int) -> torch.Tensor:
    """x [T, in] -> [T, out_features] through `lib`'s panel_gemm, on panels laid out for it."""
    x, out = x.contiguous(), x.new_empty(x.shape[0], out_features)
    if x.shape[0] > 0:
        bias = None if bias is None else bias.contiguous()
        lib.panel_gemm(x.data_ptr(), packed.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
                       x.shape[0], out_features, x.shape[1], torch.get_num_threads())
    return out


@functools.cache
def _panel_gemm(vector_bytes: int | None = None) -> ctypes.CDLL | None:
    """The kernel built for this machine's vector width, or for `vector_bytes` (16, 32, 64: the tests run all)."""
    lib = load_library("panel_gemm.c", vector_bytes=vector_bytes)
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.panel_gemm.argtypes, lib.panel_gemm.restype = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int], None
        lib.panel_columns.argtypes, lib.panel_columns.restype = [], ctypes.c_int
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
