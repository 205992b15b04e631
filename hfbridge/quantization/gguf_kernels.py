"""Matmuls and dequantization on GGUF's quantized blocks (llama.cpp's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K to Q6_K)
through hfbridge/csrc/gguf_matmul.c: out = x @ W^T with W [n, k] read in its blocks, never dequantized whole (a
decode step reads each weight byte once). x may be float32 or bfloat16; the kernel computes in float32 and the result
is rounded to x's dtype once. Each output row has the same bits whatever else shares the call (batch invariance).

Without a C compiler (`load_library` returns None), and for the types without a kernel that gguf-py reads (F16,
BF16, the IQ types, ...), gguf-py's numpy dequantizer and then F.linear run instead: slow, and the same values up to
float32 summation order."""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from hfbridge.compilation import graph_op
from hfbridge.native_build import declare, load_library

# The types with a kernel, by GGML type number (gguf.GGMLQuantizationType): (name, elements and bytes per block),
# as gguf.GGML_QUANT_SIZES has them (gguf itself, slow to import, is imported only for the other types)
BLOCKS = {2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
          10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
          14: ("Q6_K", 256, 210)}
KERNEL_TYPES: frozenset[int] = frozenset(BLOCKS)
X_DTYPES = (torch.float32, torch.bfloat16)
MAX_PARTS = 8  # parts of one gguf_matmul_parts call (as gguf_matmul.c has it)


def _block(qtype: int) -> tuple[str, int, int]:
    """(name, elements, bytes) of a block of `qtype`; ValueError for a number that names no GGML type."""
    if qtype in BLOCKS:
        return BLOCKS[qtype]
    import gguf
    try:
        kind = gguf.GGMLQuantizationType(qtype)
        return (kind.name, *gguf.GGML_QUANT_SIZES[kind])
    except (ValueError, KeyError):
        raise ValueError(f"qtype={qtype} is not a GGML type that gguf knows") from None


def row_bytes(qtype: int, k: int) -> int:
    """Bytes of one row of k values of `qtype`."""
    name, block, size = _block(qtype)
    if k <= 0 or k % block:
        raise ValueError(f"a row of {name} holds blocks of {block} values: k={k} is not a positive multiple of {block}")
    return k // block * size


def _check_data(data: torch.Tensor, qtype: int, rows: int | None, k: int) -> None:
    """data uint8 [rows, row_bytes(qtype, k)] on CPU (rows: any where None)."""
    expected = row_bytes(qtype, k)
    if (data.dtype != torch.uint8 or not data.is_cpu or data.dim() != 2 or data.shape[1] != expected
            or (rows is not None and data.shape[0] != rows)):
        raise ValueError(f"{_block(qtype)[0]} blocks for {'' if rows is None else f'{rows} rows of '}{k} values must "
                         f"be uint8 [{'rows' if rows is None else rows}, {expected}] on CPU, got {tuple(data.shape)} "
                         f"{data.dtype} on {data.device}")


def _check_x(x: torch.Tensor) -> None:
    if x.dtype not in X_DTYPES or not x.is_cpu or x.dim() != 2:
        raise ValueError(f"x must be [T, k] float32 or bfloat16 on CPU, got {tuple(x.shape)} {x.dtype} on {x.device}")


def _quant_matmul(x: torch.Tensor, data: torch.Tensor, qtype: int, out_features: int) -> torch.Tensor:
    """x [T, k] (float32 or bfloat16, CPU) @ W^T -> [T, out_features] in x's dtype, W [out_features, k] the rows of
    blocks `data` (uint8 [out_features, row_bytes(qtype, k)]) of GGML type number `qtype`."""
    _check_x(x)
    _check_data(data, qtype, out_features, x.shape[1])
    lib = _library() if qtype in KERNEL_TYPES else None
    if lib is None:
        return F.linear(x.float(), dequantize(data, qtype, x.shape[1])).to(x.dtype)
    return run_quant_matmul(lib, x, data, qtype, out_features)


# An operator inside torch.compile graphs, a plain call in eager code (graph_op)
quant_matmul = graph_op("hfbridge::gguf_matmul", "(Tensor x, Tensor data, int qtype, int out_features) -> Tensor",
                        _quant_matmul, lambda x, data, qtype, out_features: x.new_empty(x.shape[0], out_features))


def run_quant_matmul(lib: ctypes.CDLL, x: torch.Tensor, data: torch.Tensor, qtype: int,
                     out_features: int) -> torch.Tensor:
    """quant_matmul through `lib` (a build of gguf_matmul.c), on inputs already checked."""
    return run_quant_matmul_parts(lib, x, [data], [qtype], [out_features])


def _quant_matmul_parts(x: torch.Tensor, datas: list[torch.Tensor], qtypes: list[int],
                        out_features: list[int]) -> torch.Tensor:
    """x [T, k] @ [W_0; W_1; ...]^T -> [T, sum(out_features)] in x's dtype: a fused projection (q, k, v; gate, up)
    whose parts are blocks of their own types, in one kernel call where every type has a kernel (the threads then
    share out all the parts' rows); each part's columns equal quant_matmul's on that part alone."""
    _check_x(x)
    for data, qtype, n in zip(datas, qtypes, out_features, strict=True):
        _check_data(data, qtype, n, x.shape[1])
    lib = _library() if len(qtypes) <= MAX_PARTS and all(q in KERNEL_TYPES for q in qtypes) else None
    if lib is None:
        return torch.cat([_quant_matmul(x, d, q, n) for d, q, n in zip(datas, qtypes, out_features)], dim=-1)
    return run_quant_matmul_parts(lib, x, datas, qtypes, out_features)


quant_matmul_parts = graph_op(
    "hfbridge::gguf_matmul_parts", "(Tensor x, Tensor[] datas, int[] qtypes, int[] out_features) -> Tensor",
    _quant_matmul_parts, lambda x, datas, qtypes, out_features: x.new_empty(x.shape[0], sum(out_features)))


def run_quant_matmul_parts(lib: ctypes.CDLL, x: torch.Tensor, datas: list[torch.Tensor], qtypes: list[int],
                           out_features: list[int]) -> torch.Tensor:
    """quant_matmul_parts through `lib`, on inputs already checked."""
    dtype, (m, k), count = x.dtype, x.shape, len(datas)
    x = x.float().contiguous()  # no copy when already so
    datas = [d.contiguous() for d in datas]
    out = torch.empty(m, sum(out_features))
    if m and out.shape[1]:
        parts = (ctypes.c_int * count)(*qtypes), (ctypes.c_void_p * count)(*(d.data_ptr() for d in datas)), \
            (ctypes.c_int64 * count)(*out_features)
        if not lib.gguf_matmul_parts(count, *parts, x.data_ptr(), out.data_ptr(), m, k, out.shape[1],
                                     torch.get_num_threads()):
            raise ValueError(f"gguf_matmul_parts refused types {qtypes} with out_features {out_features}")
    return out if dtype == torch.float32 else out.to(dtype)


def dequantize(data: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """Rows of blocks, uint8 [r, row_bytes(qtype, k)] -> float32 [r, k], gguf-py's values exactly (any type gguf-py
    reads: the kernel's ten in C, the others in gguf-py's numpy)."""
    _check_data(data, qtype, None, k)
    lib = _library() if qtype in KERNEL_TYPES else None
    if lib is not None:
        return run_dequantize(lib, data, qtype, k)
    if data.shape[0] == 0:
        return torch.empty(0, k)
    import gguf.quants
    values = gguf.quants.dequantize(data.contiguous().numpy(), gguf.GGMLQuantizationType(qtype))
    return torch.from_numpy(values.astype("float32")).reshape(data.shape[0], k)  # a copy: F32 comes back as a view


def run_dequantize(lib: ctypes.CDLL, data: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """dequantize through `lib`, on inputs already checked."""
    data = data.contiguous()
    out = torch.empty(data.shape[0], k)
    if data.shape[0]:
        lib.gguf_dequantize(qtype, data.data_ptr(), out.data_ptr(), data.shape[0], k, torch.get_num_threads())
    return out


def build_kernels() -> bool:
    """Builds (or loads) gguf_matmul.c now rather than at the first call; whether the kernels run here."""
    return _library() is not None


@functools.cache
def _library(vector_bytes: int | None = None, defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The kernels built for this machine's vector width, or for `vector_bytes` (16, 32, 64: the tests run all)."""
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    return declare(load_library("gguf_matmul.c", defines, vector_bytes), {
        "gguf_supported": ([c_int], c_int),
        "gguf_dequantize": ([c_int, ptr, ptr, i64, i64, c_int], None),
        "gguf_matmul_parts": ([c_int, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, c_int], c_int)})
