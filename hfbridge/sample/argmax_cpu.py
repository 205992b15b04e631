"""Greedy tokens: the row argmax of the logits, through hfbridge/csrc/row_argmax.c on CPU float32 (built on first
use), torch.argmax anywhere else. Same answer as torch.argmax, ties and NaN included; torch's CPU argmax walks a
row one element at a time (figures: docs/kernel-measurements.md)."""
from __future__ import annotations

import ctypes
import functools

import torch

from hfbridge.native_build import declare, load_library


def row_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] -> [N] int64, the first index of each row's largest value (a NaN counts as largest)."""
    lib = _library() if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 else None
    if lib is None or logits.shape[1] == 0:
        return logits.argmax(dim=-1)
    return run_row_argmax(lib, logits)


def run_row_argmax(lib: ctypes.CDLL, logits: torch.Tensor) -> torch.Tensor:
    logits = logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    if logits.shape[0] > 0:
        lib.row_argmax(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


def build_kernel() -> bool:
    """Builds (or loads) the kernel now; whether it runs here."""
    return _library() is not None


@functools.cache
def _library(vector_bytes: int | None = None) -> ctypes.CDLL | None:
    """The kernel built for this machine's vector width, or for `vector_bytes` (16, 32, 64: the tests run all)."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    return declare(load_library("row_argmax.c", vector_bytes=vector_bytes),
                   {"row_argmax": ([ptr, i64, i64, ptr, ctypes.c_int], None)})
