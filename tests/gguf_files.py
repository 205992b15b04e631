"""GGUF files written in the tests from tiny Transformers models, with the `gguf` package's writer, as llama.cpp's
converter lays them out: llama.cpp's tensor names, q and k rows permuted for its rotary layout, each 2-D weight in
the type `type_of(gguf name)` picks (norms stay float32). Transformers' own GGUF reader then reads them back,
dequantized: the oracle."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

Quantizer = Callable[[np.ndarray, int], np.ndarray]  # float32 [rows, k] -> uint8 [rows, row_bytes]

HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.<module>.weight
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{suffix}"


def permute_for_llama_cpp(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order: each head's rows [2, dim / 2] -> [dim / 2, 2]."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def legacy_quantize(values: np.ndarray, qtype: int) -> np.ndarray:
    import gguf

    return gguf.quants.quantize(values, gguf.GGMLQuantizationType(qtype))


def write_llama_gguf(path: Path, model: torch.nn.Module, type_of: Callable[[str], int],
                     quantize: Quantizer = legacy_quantize) -> Path:
    """`model`: a Transformers LlamaForCausalLM. Its config's sizes go in as llama.* keys."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name, values = gguf_name(hf_name), tensor.float().numpy()
        if ".attn_q." in name:
            values = permute_for_llama_cpp(values, config.num_attention_heads)
        elif ".attn_k." in name:
            values = permute_for_llama_cpp(values, config.num_key_value_heads)
        qtype = type_of(name) if values.ndim == 2 else int(gguf.GGMLQuantizationType.F32)
        if qtype == int(gguf.GGMLQuantizationType.F32):
            writer.add_tensor(name, np.ascontiguousarray(values))
        else:
            writer.add_tensor(name, quantize(np.ascontiguousarray(values), qtype),
                              raw_dtype=gguf.GGMLQuantizationType(qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _f16_bytes(values: np.ndarray) -> np.ndarray:  # [n] float -> [n, 2] uint8
    return values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """Q4_K from its definition (a plain min/max fit, not llama.cpp's search): super-blocks of 256 values, 8
    sub-blocks of 32 each with a 6-bit scale and min; value = d * scale * q - dmin * min, q in 0..15.
    Block: d, dmin (float16), 12 bytes of packed scales and mins, 128 bytes of 4-bit q (two sub-blocks per 32
    bytes: low nibbles, then high)."""
    x = values.astype(np.float32).reshape(-1, 8, 32)
    low = np.minimum(x.min(-1), 0)  # [n, 8]
    scale, mins = (x.max(-1) - low) / 15, -low
    d, dmin = scale.max(-1) / 63, mins.max(-1) / 63  # [n]
    d16, dmin16 = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(np.divide(scale, d16[:, None], out=np.zeros_like(scale), where=d16[:, None] > 0)), 0, 63)
    mn = np.clip(np.rint(np.divide(mins, dmin16[:, None], out=np.zeros_like(mins), where=dmin16[:, None] > 0)), 0, 63)
    step, offset = (d16[:, None] * sc)[..., None], (dmin16[:, None] * mn)[..., None]
    q = np.clip(np.rint(np.divide(x + offset, step, out=np.zeros_like(x), where=step > 0)), 0, 15).astype(np.uint8)
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    packed = np.concatenate([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6), (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # sub-blocks 2i (low nibbles) and 2i+1 (high)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qs], axis=1)


def quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """Q6_K from its definition: super-blocks of 256 values, 16 sub-blocks of 16 with an int8 scale; value =
    d * scale * (q - 32), q in 0..63. Block: 128 bytes of q's low 4 bits, 64 of its high 2 bits, 16 scales, d."""
    x = values.astype(np.float32).reshape(-1, 16, 16)
    scale = np.abs(x).max(-1) / 32  # [n, 16]
    d = (scale.max(-1) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(np.divide(scale, d[:, None], out=np.zeros_like(scale), where=d[:, None] > 0)), -128, 127)
    step = (d[:, None] * sc)[..., None]
    q = (np.clip(np.rint(np.divide(x, step, out=np.zeros_like(x), where=step > 0)), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(-1, 2, 128)  # two halves of 128 values
    ql = (q[:, :, :64] & 15) | ((q[:, :, 64:] & 15) << 4)  # [n, 2, 64]
    high = (q >> 4).reshape(-1, 2, 4, 32)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)  # [n, 2, 32]
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8),
                           _f16_bytes(d)], axis=1)


def quantize_any(values: np.ndarray, qtype: int) -> np.ndarray:
    """[rows, k] float -> [rows, row_bytes]: Q4_K and Q6_K here, the legacy types by the gguf package."""
    import gguf

    kind = gguf.GGMLQuantizationType(qtype)
    if kind in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K):
        quantize = quantize_q4_k if kind == gguf.GGMLQuantizationType.Q4_K else quantize_q6_k
        return quantize(values).reshape(values.shape[0], -1)
    return legacy_quantize(values, qtype)
