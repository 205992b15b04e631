"""A GGUF file's tensors under Transformers' parameter names, the quantized ones left in their blocks.

Transformers' own reader (`load_gguf_checkpoint`) dequantizes every tensor to float32; this one keeps each tensor of
a type with a kernel (gguf_kernels.KERNEL_TYPES) as a `QuantizedWeight`, the bytes as stored, and reads the names
the same way (`get_gguf_hf_weights_map` on a meta copy of the Transformers model). Llama-family files store the q and
k projections with their rows permuted for llama.cpp's rotary layout: whole rows move, so the blocks are permuted
back as they are (the permutation of Transformers' LlamaTensorProcessor, on rows of blocks).

Architectures whose conversion rewrites tensors beyond that (MoE experts split from one tensor, Bloom's fused qkv,
GPT-2's transposes, ...) go through Transformers' reader, dequantized, with a log line saying so."""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hfbridge.quantization import gguf_kernels
from hfbridge.quantization.gguf_index import read_index

logger = logging.getLogger(__name__)

# GGUF architectures whose tensors Transformers maps one to one, unchanged but for the q/k row permutation of
# "llama" files (Mistral's included), undone below; the others go through Transformers' reader.
PACKED_ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3"})
# Plain types: read as tensors of the model's dtype
FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight [out_features, in_features] as GGUF stores it: `data` uint8 [out_features, row_bytes], each row
    `in_features` values in blocks of `qtype` (a gguf.GGMLQuantizationType number)."""

    data: torch.Tensor
    qtype: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def type_name(self) -> str:
        return type_name(self.qtype)

    def dequantize(self) -> torch.Tensor:  # [out, in] float32
        return gguf_kernels.dequantize(self.data, self.qtype, self.in_features)


def type_name(qtype: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(qtype).name
    except ValueError:
        return f"type {qtype}"


def read_gguf_weights(path: Path, hf_names: Iterable[str], hf_config) -> dict[str, torch.Tensor | QuantizedWeight]:
    """{Transformers parameter name: float tensor or QuantizedWeight} for the parameter names `hf_names` (a
    Transformers model's state_dict keys). Types without a kernel are dequantized, with one log line naming them."""
    index = read_index(path)
    architecture = str(index.metadata["general.architecture"])
    if architecture not in PACKED_ARCHITECTURES:
        raise NotImplementedError(architecture)
    names = _hf_names(hf_names, architecture, hf_config.num_hidden_layers)
    weights: dict[str, torch.Tensor | QuantizedWeight] = {}
    dequantized: Counter[str] = Counter()
    for tensor in index.tensors:
        name = names.get(tensor.name)
        if name is None:  # e.g. rope_freqs, which Transformers recomputes
            continue
        qtype = int(tensor.tensor_type)
        packed = qtype in gguf_kernels.KERNEL_TYPES and len(tensor.shape) == 2
        if packed:  # an owned copy, uint8 [out, row_bytes]
            rows = torch.from_numpy(np.array(tensor.data, dtype=np.uint8))
        elif qtype in FLOAT_TYPES:  # BF16 comes as its bytes: viewed as the type, the last dim halves
            rows = torch.from_numpy(np.array(tensor.data)).view(FLOAT_TYPES[qtype])
        else:
            rows = _dequantize_any(path, tensor)
            dequantized[type_name(qtype)] += 1
        rows = _permuted(rows, tensor.name, architecture, hf_config)
        weights[name] = QuantizedWeight(rows, qtype, int(tensor.shape[0])) if packed else rows
    if dequantized:
        logger.info("%s: %s have no quantized kernel here; dequantized at load",
                    path.name, ", ".join(f"{n} tensors of {t}" for t, n in dequantized.items()))
    return weights


def _hf_names(hf_names: Iterable[str], architecture: str, num_layers: int) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name, through gguf's own name table (what Transformers'
    get_gguf_hf_weights_map does, with the table built once rather than once per submodule)."""
    import gguf

    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == architecture)
    table = gguf.get_tensor_name_map(arch, num_layers)
    names = {}
    for name in hf_names:
        stem, dot, suffix = name.rpartition(".")
        gguf_name = table.get_name(stem)
        if gguf_name is not None:
            names[f"{gguf_name}{dot}{suffix}"] = name
    return names


def _dequantize_any(path: Path, tensor) -> torch.Tensor:
    import gguf

    try:
        values = gguf.quants.dequantize(tensor.data, gguf.GGMLQuantizationType(tensor.tensor_type))
    except (NotImplementedError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: tensor {tensor.name} has type {type_name(int(tensor.tensor_type))}, which "
                         f"hfbridge can neither compute on nor dequantize ({e})") from e
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def _permuted(rows: torch.Tensor, gguf_name: str, architecture: str, hf_config) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (Llama files): each head's rows [dim / 2, 2] -> [2, dim / 2]."""
    if architecture != "llama" or not (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        return rows
    heads = hf_config.num_attention_heads
    if ".attn_k." in gguf_name:
        heads = getattr(hf_config, "num_key_value_heads", None) or heads
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape).contiguous()
