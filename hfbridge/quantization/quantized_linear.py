"""Projections, the embedding and the LM head computed on GGUF blocks (gguf_kernels): the blocks are the only copy of
each weight in memory. Inputs are [T, in], as everywhere in the native decoders.

A fused projection (qkv_proj, gate_up_proj) is a list of parts stacked along the output, each a QuantizedWeight in
its own type (a Q4_K_M file mixes Q4_K and Q6_K within one layer's q, k and v) or a float tensor; the parts' outputs
are concatenated. The blocks are plain attributes, not parameters or buffers: `state_dict()` holds the float
tensors (norms, biases) only, and the blocks stay on the CPU, where their kernels run."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hfbridge.compilation import graph_op
from hfbridge.quantization import gguf_kernels
from hfbridge.quantization.gguf_checkpoint import QuantizedWeight
from hfbridge.sample.argmax_cpu import row_argmax

Part = QuantizedWeight | torch.Tensor  # a float part: [out_i, in] in the model's dtype


def _project(x: torch.Tensor, part: Part) -> torch.Tensor:  # [T, in] -> [T, out_i]
    if isinstance(part, QuantizedWeight):
        return gguf_kernels.quant_matmul(x, part.data, part.qtype, part.out_features)
    return F.linear(x, part)


def _lookup(ids: torch.Tensor, data: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """ids [T] -> rows [T, k] float32 of the quantized table data [V, row_bytes]."""
    return gguf_kernels.dequantize(data[ids], qtype, k)


gguf_lookup = graph_op("hfbridge::gguf_lookup", "(Tensor ids, Tensor data, int qtype, int k) -> Tensor", _lookup,
                       lambda ids, data, qtype, k: data.new_empty(ids.shape[0], k, dtype=torch.float32))


class QuantizedLinear(nn.Module):
    """[..., in] -> [..., out] = x @ W^T (+ bias), W the parts stacked along the output."""

    lora = None  # a hfbridge.lora LoRALayer (enable_lora): adds each adapter's delta to the output

    def __init__(self, parts: list[Part], bias: bool, dtype: torch.dtype):
        super().__init__()
        self.parts = parts
        self.in_features = parts[0].shape[1]
        self.out_features = sum(p.shape[0] for p in parts)
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device="meta"), requires_grad=False) \
            if bias else None

    def projection(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out], bias added
        rows = x.reshape(-1, self.in_features)  # Transformers' modules call with [batch, T, in]
        if all(isinstance(p, QuantizedWeight) for p in self.parts):  # one kernel call for all the parts
            out = gguf_kernels.quant_matmul_parts(rows, [p.data for p in self.parts], [p.qtype for p in self.parts],
                                                  [p.out_features for p in self.parts])
        else:  # a float part among them
            out = torch.cat([_project(rows, part) for part in self.parts], dim=-1)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.projection(x)
        return out if self.lora is None else self.lora(x, out)

    def extra_repr(self) -> str:
        types = ", ".join(p.type_name if isinstance(p, QuantizedWeight) else str(p.dtype) for p in self.parts)
        return f"in_features={self.in_features}, out_features={self.out_features}, parts=[{types}]"


class QuantizedGateUp(QuantizedLinear):
    """The MLP's gate and up projections (parts: gate, then up) with SiLU-and-mul: [T, in] -> [T, n]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.projection(x)
        if self.lora is not None:  # adapters add to gate_up before the activation
            gate_up = self.lora(x, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class QuantizedEmbedding(nn.Module):
    """ids [T] -> [T, hidden] in `dtype`: the rows of a quantized table, dequantized as they are looked up."""

    def __init__(self, table: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        self.table, self.dtype = table, dtype
        self.num_embeddings, self.embedding_dim = table.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return gguf_lookup(ids, self.table.data, self.table.qtype, self.embedding_dim).to(self.dtype)


class QuantizedHead:
    """hidden [N, H] -> logits [N, V] on a quantized head [V, H] (a tied head is the embedding's table): what
    native_overrides.head_projection.HeadProjection does for float heads."""

    def __init__(self, weight: QuantizedWeight):
        self.weight = weight

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return _project(hidden, self.weight)

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:  # [N] int64, each row's first largest logit
        return row_argmax(self(hidden).float())


def install_quantized_linears(model: nn.Module, weights: dict[str, Part]) -> dict[str, torch.Tensor]:
    """A Transformers model on meta: each nn.Linear whose weight `weights` (the model's own names) holds quantized
    becomes a QuantizedLinear; any other quantized tensor (an embedding, which tied heads share) is dequantized.
    Returns the float tensors left to load."""
    left: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if not isinstance(tensor, QuantizedWeight):
            left[name] = tensor
            continue
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf == "weight" and type(module) is nn.Linear:
            dtype = module.weight.dtype
            parent, _, attr = owner.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr,
                    QuantizedLinear([tensor], module.bias is not None, dtype))
        else:
            left[name] = tensor.dequantize()
    return left
