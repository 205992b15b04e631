"""Linear projections on a copy of the weight laid out for hfbridge/csrc/panel_gemm.c, for CPU float32 and bfloat16
weights (bfloat16 panels are widened to float32 as they are read: half the bytes, float32 arithmetic): vLLM-CPU's
prepacked-weight idea (`onednn_mm`) with a kernel of our own. The weight [out, in] is laid out once, in panels of
C output columns ([ceil(out / C), in, C], zero-padded; C is two of the machine's vectors: 32 floats with AVX-512,
16 with AVX2), and every call, from one token to a 2048-token prefill, runs the one C kernel on it.

Why not oneDNN's packed GEMM (torch.ops.mkldnn._linear_pointwise, which this module called before): the kernel
is faster from 1 to 64 rows and within a few percent at 2048 (the table: docs/kernel-measurements.md), and
F.linear's MKL sgemm is slower than both.

It is also batch invariant: a row's output has the same bits whatever else is in the batch (one sequential sum
over `in` per element), where oneDNN picks its algorithm by row count.

The call is a torch custom op, so compiled regions keep it as one opaque kernel. The panels are the only copy of a
packed weight: once laid out, the plain parameter is released (a meta tensor of the same shape and dtype stands in
for it), and `WeightPacks.plain_weights()` puts the plain weights back, read from the panels, for as long as code
outside the forward needs them (`apply_model`: `state_dict`, in-place edits, which are laid out again when it ends).
Anything else (GPU, float16, no C compiler) keeps the plain weight and calls F.linear.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hfbridge.compilation import graph_op
from hfbridge.native_build import declare, load_library

def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [out, in] -> its panels for this machine's panel_gemm (`lay_out`), or None where the kernel does not
    apply (then the caller runs F.linear)."""
    if not _packs(weight):
        return None
    return lay_out(weight, _panel_gemm().panel_columns())


# The weight dtypes the kernel reads: float32, and bfloat16 (widened to float32 as it is read, at half the bytes)
PANEL_DTYPES = (torch.float32, torch.bfloat16)


def _packs(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in PANEL_DTYPES and weight.dim() == 2 and (
        _panel_gemm() is not None)


def interleave_gate_up(t: torch.Tensor, lanes: int) -> torch.Tensor:
    """A gate_up weight [2n, in] (or bias [2n]) -> rows gate[0:L], up[0:L], gate[L:2L], up[L:2L], ... (L = `lanes`,
    each half zero-padded to a multiple of L): laid out in panels of 2L columns, each panel holds the gate and the
    up rows of the same L outputs, as panel_gemm_silu_mul reads them."""
    n = t.shape[0] // 2
    groups = -(-n // lanes)
    halves = t.detach().new_zeros(2, groups * lanes, *t.shape[1:])
    halves[0, :n], halves[1, :n] = t.detach()[:n], t.detach()[n:]
    return halves.view(2, groups, lanes, *t.shape[1:]).transpose(0, 1).reshape(groups * 2 * lanes, *t.shape[1:])


def deinterleave_gate_up(t: torch.Tensor, lanes: int, n: int) -> torch.Tensor:
    """interleave_gate_up's inverse: rows gate[0:L], up[0:L], gate[L:2L], ... -> [2n, ...] (gate rows, then up)."""
    groups = t.shape[0] // (2 * lanes)
    halves = t.reshape(groups, 2, lanes, *t.shape[1:]).transpose(0, 1).reshape(2, groups * lanes, *t.shape[1:])
    return halves[:, :n].reshape(2 * n, *t.shape[1:])


def unlay(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """lay_out's inverse: panels [P, in, C] -> weight [out_features, in] (a new contiguous tensor)."""
    num_panels, in_features, columns = packed.shape
    return packed.transpose(1, 2).reshape(num_panels * columns, in_features)[:out_features].contiguous()


def lay_out(weight: torch.Tensor, columns: int) -> torch.Tensor:
    """weight [out, in] -> panels [ceil(out / C), in, C] with C = `columns` (panels[j, k, c] = weight[C j + c, k],
    zeros past `out`)."""
    out_features, in_features = weight.shape
    num_panels, padded = -(-out_features // columns), weight.detach()
    if out_features % columns:  # one copy fewer at start-up where no padding is needed (the usual case)
        padded = padded.new_zeros(num_panels * columns, in_features)
        padded[:out_features] = weight.detach()
    return padded.reshape(num_panels, columns, in_features).transpose(1, 2).contiguous()


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                   out_features: int) -> torch.Tensor:
    """x [T, in] -> [T, out] = x @ weight^T (+ bias), for `packed` from pack_weight(weight [out, in])."""
    return run_panel_gemm(_panel_gemm(), x, packed, bias, out_features)


def _packed_silu_mul(x: torch.Tensor, packed: torch.Tensor, packed_bias: torch.Tensor | None,
                     out_features: int) -> torch.Tensor:
    """x [T, in] -> [T, n] = silu(gate) * up of gate_up = x @ weight^T + bias ([T, 2n], n = out_features), for
    `packed` and `packed_bias` laid out by interleave_gate_up (then lay_out)."""
    return run_panel_gemm(_panel_gemm(), x, packed, packed_bias, out_features, silu_mul=True)


# Operators inside torch.compile graphs, plain calls in eager code (graph_op)
packed_linear = graph_op(
    "hfbridge::packed_linear", "(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor",
    _packed_linear, lambda x, packed, bias, out_features: x.new_empty(x.shape[0], out_features))
packed_silu_mul = graph_op(
    "hfbridge::packed_silu_mul", "(Tensor x, Tensor packed, Tensor? packed_bias, int out_features) -> Tensor",
    _packed_silu_mul, lambda x, packed, packed_bias, out_features: x.new_empty(x.shape[0], out_features))


def run_panel_gemm(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                   out_features: int, silu_mul: bool = False) -> torch.Tensor:
    """x [T, in] -> [T, out_features] through `lib`'s panel_gemm (or panel_gemm_silu_mul), on panels laid out for
    it, in x's dtype. Bfloat16 panels take bfloat16 x: the kernel computes in float32 (x and the weights widened
    exactly) and the result is rounded to bfloat16 once, as torch's bfloat16 matmul does. Shapes and dtypes are
    checked here: the kernel would read out of bounds instead."""
    check_panel_inputs(x, packed, bias, out_features)
    dtype = x.dtype
    x = x.float().contiguous()
    out = x.new_empty(x.shape[0], out_features)
    if x.shape[0] > 0:
        bias = None if bias is None else bias.float().contiguous()
        if packed.dtype == torch.bfloat16:
            gemm = lib.panel_gemm_silu_mul_bf16 if silu_mul else lib.panel_gemm_bf16
        else:
            gemm = lib.panel_gemm_silu_mul if silu_mul else lib.panel_gemm
        gemm(x.data_ptr(), packed.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(), x.shape[0],
             out_features, x.shape[1], torch.get_num_threads())
    return out.to(dtype)


def check_panel_inputs(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> None:
    """x [T, in] on CPU, panels [P, in, C] of x's dtype (float32 or bfloat16) holding at least out_features
    columns, bias [out]."""
    if x.dim() != 2 or x.dtype not in PANEL_DTYPES or x.device.type != "cpu":
        raise ValueError(f"panel_gemm takes x [T, in] float32 or bfloat16 on CPU, got {tuple(x.shape)} {x.dtype} on "
                         f"{x.device}")
    if packed.dim() != 3 or packed.dtype != x.dtype or packed.shape[1] != x.shape[1]:
        raise ValueError(f"panel_gemm's panels {tuple(packed.shape)} {packed.dtype} do not match x's width "
                         f"{x.shape[1]} and dtype {x.dtype} (panels [P, in, C] of x's dtype)")
    if not 0 <= out_features <= packed.shape[0] * packed.shape[2]:
        raise ValueError(f"out_features={out_features} exceeds the panels' {packed.shape[0] * packed.shape[2]} columns")
    if bias is not None and (bias.dtype not in PANEL_DTYPES or bias.numel() < out_features):
        raise ValueError(f"panel_gemm's bias must be float32 or bfloat16 with {out_features} values, got "
                         f"{tuple(bias.shape)} {bias.dtype}")


@functools.cache
def _panel_gemm(vector_bytes: int | None = None) -> ctypes.CDLL | None:
    """The kernel built for this machine's vector width, or for `vector_bytes` (16, 32, 64: the tests run all)."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    gemm = ([ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int], None)
    return declare(load_library("panel_gemm.c", vector_bytes=vector_bytes),
                   {"panel_gemm": gemm, "panel_gemm_silu_mul": gemm, "panel_gemm_bf16": gemm,
                    "panel_gemm_silu_mul_bf16": gemm, "panel_columns": ([], ctypes.c_int)})


class PackedLinear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) that runs on `packed` once WeightPacks has set it; its
    weight is then a meta stand-in until WeightPacks.plain_weights() reads it back. Inputs are [T, in], as
    everywhere in the native decoders."""

    packed: torch.Tensor | None = None
    lora = None  # a hfbridge.lora LoRALayer (enable_lora): adds each adapter's delta to the output

    def pack(self) -> None:
        """Lay the plain weight out in panels, and release the plain copy where it did."""
        self.packed = pack_weight(self.weight)
        self._release()

    def _release(self) -> None:
        if self.packed is not None:
            release_weight(self)

    def unpack(self) -> None:
        """Put the plain weight back, read from the panels."""
        if self.weight.is_meta and self.packed is not None:
            self.weight = nn.Parameter(self._read_panels(), requires_grad=False)

    def _read_panels(self) -> torch.Tensor:  # [out, in]
        return unlay(self.packed, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            out = F.linear(x, self.weight, self.bias)
        else:
            out = packed_linear(x.to(self.packed.dtype), self.packed, self.bias, self.out_features).to(x.dtype)
        return out if self.lora is None else self.lora(x, out)


class GateUpLinear(PackedLinear):
    """The MLP's fused gate_up projection ([2n, in]: gate rows, then up rows) with its SiLU-and-mul: [T, in] ->
    silu(gate) * up, [T, n]. Packed, one kernel pass computes both and writes only the product (a 2048-token prefill
    of SmolLM2-135M: the [2048, 3072] projection, 25 MB a layer, is never written nor read back)."""

    packed_bias: torch.Tensor | None = None  # the bias in the panels' column order

    def pack(self) -> None:
        if not _packs(self.weight):
            self.packed = self.packed_bias = None
            return
        lanes = _panel_gemm().panel_columns() // 2
        self.packed = lay_out(interleave_gate_up(self.weight, lanes), 2 * lanes)
        self.packed_bias = None if self.bias is None else interleave_gate_up(self.bias, lanes)
        self._release()

    def _read_panels(self) -> torch.Tensor:  # [2n, in]: the panels' interleaved rows put back in order
        num_panels, _, columns = self.packed.shape
        return deinterleave_gate_up(unlay(self.packed, num_panels * columns), columns // 2, self.out_features // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora is not None and self.lora.is_active:  # adapters add to gate_up before the activation
            gate, up = self.lora(x, self._gate_up(x)).chunk(2, dim=-1)
            return F.silu(gate) * up
        if self.packed is None:
            gate, up = F.linear(x, self.weight, self.bias).chunk(2, dim=-1)
            return F.silu(gate) * up
        return packed_silu_mul(x.to(self.packed.dtype), self.packed, self.packed_bias,
                               self.out_features // 2).to(x.dtype)

    def _gate_up(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> gate_up [T, 2n] before the activation: the panels' interleaved columns put back in order."""
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        num_panels, _, columns = self.packed.shape
        out = run_panel_gemm(_panel_gemm(), x.to(self.packed.dtype), self.packed, self.packed_bias,
                             num_panels * columns).to(x.dtype)
        return deinterleave_gate_up(out.T, columns // 2, self.out_features // 2).T


def release_weight(module: nn.Module) -> None:
    """Drop a module's plain weight, once panels hold it: a meta parameter of the same shape and dtype stands in."""
    if not module.weight.is_meta:
        module.weight = nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)


class PackedEmbedding(nn.Embedding):
    """A tied model's embedding, whose weight [V, H] is also its LM head's: once the head's panels [P, H, C] hold it
    (`packed`, set by the model with the plain weight released), a token's row is column v % C of panel v // C."""

    packed: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        if self.packed is None:
            return super().forward(input_ids)
        columns = self.packed.shape[2]
        return self.packed[input_ids // columns, :, input_ids % columns]


class WeightPacks:
    """The panels of a model's PackedLinear weights (and GateUpLinear's reordered bias): laid out by `refresh` (the
    plain weights released), and laid out again after plain_weights() when a weight or bias was changed in place or
    replaced. `refresh` costs one version read per parameter."""

    def __init__(self, model: nn.Module):
        self.linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
        self.versions: list[tuple] | None = None

    @staticmethod
    def _version(m: PackedLinear) -> tuple:
        bias = None if m.bias is None else (id(m.bias), m.bias._version)
        return id(m.weight), m.weight._version, bias

    def _record(self) -> None:
        self.versions = [self._version(m) for m in self.linears]

    def refresh(self) -> None:
        versions = [self._version(m) for m in self.linears]
        if versions == self.versions:
            return
        old = self.versions or [None] * len(self.linears)
        for m, before, now in zip(self.linears, old, versions):
            if before != now and not m.weight.is_meta:  # loaded, edited or replaced: lay it out (again)
                m.pack()
                _return_freed_memory()  # one weight's plain copy at a time: no peak of both copies of every one
        self._record()

    @contextlib.contextmanager
    def plain_weights(self) -> Iterator[None]:
        """The plain weights, read back from the panels, while the block runs; then laid out again where they
        changed, and released."""
        self.refresh()
        for m in self.linears:
            m.unpack()
        self._record()
        try:
            yield
        finally:
            self.refresh()  # lays out what changed (releasing it)
            for m in self.linears:
                m._release()  # the rest: their panels still hold them
            self._record()
            _return_freed_memory()


def _return_freed_memory() -> None:
    """Give the pages of freed plain weights back to the OS: glibc keeps freed heap chunks below its top, and the
    process's resident size would not fall (malloc_trim releases every whole free page)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):  # no C library to open by the process's own name (Windows)
        return None
