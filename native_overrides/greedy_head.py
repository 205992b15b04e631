"""Greedy tokens from the LM head without most of its float32 work (hfbridge/csrc/greedy_head.c): a bfloat16
screen of every logit, a proven bound on its distance from the float32 logit, and the float32 logits recomputed
(by panel_gemm's own tile, so with its bits) for the few columns the bound cannot rule out. The token is the one
row_argmax would take from the full float32 logits, ties and all; rows the bound cannot serve (a non-finite
value) come back as -1 and the caller computes them in full.

Where it pays: the decode step's LM head, run for every greedy row ([rows, V] x [V, H]: a sizeable share of a
float32 decode step for a small model's large vocabulary). Needs AVX512-BF16 (Zen 4, Sapphire Rapids and later); anything
else keeps the full head. Memory: one bfloat16 copy of the head (half its float32 size)."""
from __future__ import annotations

import ctypes
import functools

import torch

from hfbridge.native_build import declare, load_library
from hfbridge.native_overrides.packed_linear import lay_out


class GreedyHead:
    """The screen's copy of a head weight [V, K] (with its float32 panels from pack_weight) and a scratch of
    screen rows, reused across steps."""

    def __init__(self, lib: ctypes.CDLL, weight: torch.Tensor, bf16_weight: torch.Tensor, packed: torch.Tensor):
        num_panels, in_features, columns = packed.shape
        # [P, K/2, C, 2]: panel j, k pair p, column c -> (W[Cj + c, 2p], W[Cj + c, 2p + 1]): the float32 panels'
        # layout (lay_out, zero columns past V) with each k pair's two weights side by side
        panels = lay_out(bf16_weight, columns).view(num_panels, in_features // 2, 2, columns)
        self.bf16_panels = panels.transpose(2, 3).contiguous()
        self.norms = _row_norms(weight.detach())
        self.lib, self.packed, self.vocab = lib, packed, weight.shape[0]
        self.screen = torch.empty(0)

    @classmethod
    def build(cls, weight: torch.Tensor, packed: torch.Tensor | None) -> GreedyHead | None:
        """None where the screen does not apply: no float32 packed head, no AVX512-BF16 build, an odd hidden size, or a
        weight with a value that is not finite in float32 or in bfloat16."""
        lib = _library()
        if packed is None or packed.dtype != torch.float32 or lib is None or weight.shape[1] % 2:
            return None
        bf16_weight = weight.detach().to(torch.bfloat16)  # rounded to nearest even, as the kernel rounds x
        if not (bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bf16_weight).all())):
            return None
        return cls(lib, weight, bf16_weight, packed)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, K] float32 -> tokens [N] int64, -1 for the rows the caller must compute in full."""
        if hidden.dim() != 2 or hidden.dtype != torch.float32 or hidden.shape[1] != self.packed.shape[1]:
            raise ValueError(f"the greedy head takes hidden states [N, {self.packed.shape[1]}] float32, got "
                             f"{tuple(hidden.shape)} {hidden.dtype}")
        hidden = hidden.contiguous()
        rows, width = hidden.shape[0], self.packed.shape[0] * self.packed.shape[-1]
        if self.screen.numel() < rows * width:
            self.screen = torch.empty(rows * width, dtype=torch.float32)  # whatever torch's default dtype is
        tokens = torch.empty(rows, dtype=torch.int64)
        self.lib.greedy_head(hidden.data_ptr(), rows, hidden.shape[1], self.bf16_panels.data_ptr(),
                             self.packed.data_ptr(), self.norms.data_ptr(), self.vocab, self.screen.data_ptr(),
                             tokens.data_ptr(), torch.get_num_threads())
        return tokens


def _row_norms(weight: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
    """||W[v]|| for W [V, K], summed in float64 and rounded up so that the bound stays a bound; a chunk of rows at a
    time, so a large head never has a float64 copy of itself (a 128k x 4096 head would take 4 GB)."""
    norms = torch.empty(weight.shape[0], dtype=torch.float32)
    for start in range(0, weight.shape[0], chunk_rows):
        rows = weight[start : start + chunk_rows].double()
        norms[start : start + chunk_rows] = rows.norm(dim=1) * (1 + 2**-20)
    return norms


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The kernels for this machine, or None where it has no AVX512-BF16 (or no C compiler)."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib = declare(load_library("greedy_head.c"), {
        "greedy_head": ([ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, ctypes.c_int], None),
        "greedy_head_available": ([], ctypes.c_int)})
    return lib if lib is not None and lib.greedy_head_available() else None
