"""One decoder for the Llama family (Llama, Mistral, Qwen2, Qwen3): fused qkv_proj and gate_up_proj, RMSNorm with
the residual add fused, rotary from a cached table, attention through hfbridge's backend, logits only at the
sampled positions. The families differ only in config-driven details, read once into `DecoderOptions`."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hfbridge.attention_backends.metadata import LayerOptions
from hfbridge.native_overrides.compiled_regions import CompiledRegions, Regions
from hfbridge.native_overrides.decode_graph import DecodeGraph
from hfbridge.native_overrides.head_projection import HeadProjection
from hfbridge.native_overrides.layers import RMSNorm, RotaryTable, backend_attention
from hfbridge.native_overrides.packed_linear import (GateUpLinear, PackedEmbedding, PackedLinear, WeightPacks,
                                                     release_weight)
from hfbridge.native_overrides.weights import load_stacked_weights
from hfbridge.quantization.quantized_linear import QuantizedHead


@dataclass(frozen=True)
class DecoderOptions:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]  # per layer
    tie_word_embeddings: bool


def _sliding_windows(config, family: str) -> tuple[int | None, ...]:
    n, window = config.num_hidden_layers, getattr(config, "sliding_window", None)
    if family == "mistral":  # every layer, when the config sets a window
        return (window,) * n
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * n
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def decoder_options(config, family: str) -> DecoderOptions:
    heads = config.num_attention_heads
    attention_bias = bool(getattr(config, "attention_bias", False))
    return DecoderOptions(
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        vocab_size=config.vocab_size,
        eps=config.rms_norm_eps,
        qkv_bias=True if family == "qwen2" else attention_bias,  # Qwen2 always has q/k/v bias, never o bias
        o_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        qk_norm=family == "qwen3",
        sliding_windows=_sliding_windows(config, family),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


class Attention(nn.Module):
    def __init__(self, opts: DecoderOptions, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = opts.num_heads, opts.num_kv_heads, opts.head_dim
        self.q_size, self.kv_size = opts.num_heads * opts.head_dim, opts.num_kv_heads * opts.head_dim
        self.qkv_proj = PackedLinear(opts.hidden_size, self.q_size + 2 * self.kv_size, bias=opts.qkv_bias, dtype=dtype)
        self.o_proj = PackedLinear(self.q_size, opts.hidden_size, bias=opts.o_bias, dtype=dtype)
        if opts.qk_norm:
            self.q_norm = RMSNorm(opts.head_dim, opts.eps, dtype, "meta")
            self.k_norm = RMSNorm(opts.head_dim, opts.eps, dtype, "meta")
        self.options = LayerOptions(
            layer_idx=layer_idx, scaling=opts.head_dim**-0.5, sliding_window=opts.sliding_windows[layer_idx]
        )

    def project(self, hidden: torch.Tensor, positions: torch.Tensor, rotary: RotaryTable):
        # hidden [T, hidden] -> qkv [T, q + 2 kv] -> q [T, H, D], k/v [T, Hkv, D], rotary applied
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):  # Qwen3: RMSNorm over each head, before rotary
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q, k, positions)
        return q, k, v.contiguous()


class MLP(nn.Module):
    def __init__(self, opts: DecoderOptions, dtype: torch.dtype):
        super().__init__()
        size = opts.intermediate_size
        self.gate_up_proj = GateUpLinear(opts.hidden_size, 2 * size, bias=opts.mlp_bias, dtype=dtype)  # + SiLU-and-mul
        self.down_proj = PackedLinear(size, opts.hidden_size, bias=opts.mlp_bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, opts: DecoderOptions, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.self_attn = Attention(opts, layer_idx, dtype)
        self.mlp = MLP(opts, dtype)
        self.input_layernorm = RMSNorm(opts.hidden_size, opts.eps, dtype, "meta")
        self.post_attention_layernorm = RMSNorm(opts.hidden_size, opts.eps, dtype, "meta")

    def forward(self, hidden, residual, positions, rotary, regions: Regions):
        """The attention call runs eagerly between two attention-free regions, which may be compiled."""
        q, k, v, residual = regions.before_attention(self, hidden, residual, positions, rotary)
        out = backend_attention(q, k, v, self.self_attn.options)  # [T, H, D]
        return regions.after_attention(self, out, residual)

    def before_attention(self, hidden, residual, positions, rotary):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        q, k, v = self.self_attn.project(hidden, positions, rotary)
        return q, k, v, residual

    def after_attention(self, out, residual):
        hidden = self.self_attn.o_proj(out.reshape(out.shape[0], -1))
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


EAGER_REGIONS = Regions(DecoderLayer.before_attention, DecoderLayer.after_attention)


class DecoderModel(nn.Module):
    def __init__(self, opts: DecoderOptions, dtype: torch.dtype):
        super().__init__()
        # An explicit (meta) weight: Embedding's own init, normal_ on meta, imports torch._dynamo (~1 s of start-up)
        self.embed_tokens = PackedEmbedding(opts.vocab_size, opts.hidden_size,
                                            _weight=torch.empty(opts.vocab_size, opts.hidden_size, dtype=dtype))
        self.layers = nn.ModuleList(DecoderLayer(opts, i, dtype) for i in range(opts.num_layers))
        self.norm = RMSNorm(opts.hidden_size, opts.eps, dtype, "meta")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, rotary: RotaryTable,
                regions: Regions = EAGER_REGIONS) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None  # [T, hidden]
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, positions, rotary, regions)
        return self.norm(hidden, residual)[0]


class NativeCausalLM(nn.Module):
    """Called like hfbridge's Transformers wrapper: (input_ids [1, T], positions [1, T], logits_indices [N])
    -> logits [N, V] float32. Checkpoint names are Transformers' (`model.layers.0.self_attn.q_proj.weight`, ...)."""

    family = "llama"

    def __init__(self, config, dtype: torch.dtype, max_positions: int):
        super().__init__()
        self.config = config
        self.options = decoder_options(config, self.family)
        with torch.device("meta"):
            self.model = DecoderModel(self.options, dtype)
            if not self.options.tie_word_embeddings:
                self.lm_head = nn.Linear(self.options.hidden_size, self.options.vocab_size, bias=False, dtype=dtype)
        self.max_positions = max_positions
        self.rotary: RotaryTable | None = None
        self._head: HeadProjection | None = None
        self.quantized_head: QuantizedHead | None = None  # set by native_overrides.quantized for a quantized head
        self.compiled: CompiledRegions | None = None  # set by compile_regions(); None: always eager
        self.decode_graph: DecodeGraph | None = None  # set by compile_regions() on CPU, without sliding windows
        self.packs = WeightPacks(self)  # the projections' panel layouts (CPU float32), kept current with the weights

    @classmethod
    def from_config(cls, config, dtype: torch.dtype, max_positions: int, device: torch.device) -> NativeCausalLM:
        """Parameters allocated on `device` but unset (fill them with `load_weights`), the rotary table real."""
        return cls(config, dtype, max_positions).allocate(device)

    def allocate(self, device: torch.device) -> NativeCausalLM:
        """The meta model's parameters allocated on `device`, unset; the rotary table computed."""
        self.to_empty(device=device)
        dtype = self.model.norm.weight.dtype
        self.rotary = RotaryTable(self.config, self.options.head_dim, self.max_positions, dtype, device)
        return self.eval()

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.options.tie_word_embeddings else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [1, T]
        positions: torch.Tensor,  # [1, T]
        logits_indices: torch.Tensor | None = None,  # [N]
    ) -> torch.Tensor:  # [N, V] float32
        return self._current_head()(self._sampled_hidden(input_ids, positions, logits_indices)).float()

    def greedy_tokens(
        self,
        input_ids: torch.Tensor,  # [1, T]
        positions: torch.Tensor,  # [1, T]
        logits_indices: torch.Tensor,  # [N]
    ) -> torch.Tensor:  # [N] int64
        """The greedy token of each row forward would return: its first largest logit, as row_argmax takes it, where
        the LM head computes only the logits that could be it (HeadProjection.greedy)."""
        return self.sample_heads(input_ids, positions, logits_indices, 0)[1]

    def sample_heads(
        self,
        input_ids: torch.Tensor,  # [1, T]
        positions: torch.Tensor,  # [1, T]
        logits_indices: torch.Tensor,  # [N]
        num_logits: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # logits [num_logits, V] float32, greedy tokens [N - num_logits] int64
        """One forward, two heads: the full logits of the first num_logits rows, and the greedy token of the others."""
        hidden = self._sampled_hidden(input_ids, positions, logits_indices)
        head = self._current_head()
        return head(hidden[:num_logits]).float(), head.greedy(hidden[num_logits:])

    def _sampled_hidden(self, input_ids, positions, logits_indices) -> torch.Tensor:  # [N, hidden]
        self.packs.refresh()
        hidden = self.decode_graph.run(input_ids[0], positions[0]) if self.decode_graph is not None else None
        if hidden is None:  # not a decode step the compiled graph serves: layer by layer
            regions = self.compiled.for_tokens(input_ids.shape[1]) if self.compiled is not None else EAGER_REGIONS
            hidden = self.model(input_ids[0], positions[0], self.rotary, regions)  # [T, hidden]
        if logits_indices is None:
            logits_indices = input_ids.new_zeros(0)
        return hidden[logits_indices]

    def _current_head(self) -> HeadProjection | QuantizedHead:
        if self.quantized_head is not None:
            return self.quantized_head
        weight = self.head_weight
        if self._head is None or not (weight.is_meta or self._head.is_current(weight)):  # meta: the panels hold it
            self._head = HeadProjection(weight)
            self._release_head()
        return self._head

    def _head_module(self) -> nn.Module:
        return self.model.embed_tokens if self.options.tie_word_embeddings else self.lm_head

    def _release_head(self) -> None:
        """Once the head's panels hold its weight, drop the plain copy (a tied embedding then reads the panels)."""
        head, module = self._head, self._head_module()
        if head.packed is None:
            return
        if self.options.tie_word_embeddings:
            module.packed = head.packed
        release_weight(module)

    @contextlib.contextmanager
    def plain_weights(self) -> Iterator[None]:
        """Every weight as a plain parameter while the block runs (apply_model: state_dict, in-place edits), read
        back from the panels; then laid out again where it changed, and released."""
        head = self._head if self.quantized_head is None else None
        module = self._head_module() if head is not None else None
        if module is not None and module.weight.is_meta:
            module.weight = nn.Parameter(head.plain_weight(), requires_grad=False)
            head.track(module.weight)
        with self.packs.plain_weights():
            try:
                yield
            finally:
                if module is not None and head.is_current(module.weight):
                    self._release_head()  # unchanged: the panels still hold it
                elif module is not None:  # edited or replaced: lay it out again (and release it)
                    if self.options.tie_word_embeddings:
                        module.packed = None
                    self._head = None
                    self._current_head()

    def compile_regions(self, background: bool = True) -> list[CompiledRegions | DecodeGraph]:
        """torch.compile the decoder layers' attention-free regions (compiled_regions.py) and the whole decode step
        (decode_graph.py); eager until ready."""
        self.packs.refresh()  # traced with the packed projections, as every step will call them
        self.compiled = CompiledRegions(EAGER_REGIONS, self._warm_up_inputs)
        self.compiled.start(background)
        on_cpu = self.model.norm.weight.device.type == "cpu"  # the graph has been measured on CPUs only
        if on_cpu and all(window is None for window in self.options.sliding_windows):
            self.decode_graph = DecodeGraph(self.model, self.rotary)
            self.decode_graph.start(background)
        return [c for c in (self.compiled, self.decode_graph) if c is not None]

    def _warm_up_inputs(self, num_tokens: int):
        """Inputs of layer 0 (no residual yet) and layer 1 for a step of num_tokens tokens."""
        opts, weight = self.options, self.model.norm.weight
        hidden = torch.zeros(num_tokens, opts.hidden_size, dtype=weight.dtype, device=weight.device)
        positions = self.rotary.warm_up_positions(num_tokens)
        attn_out = torch.zeros(num_tokens, opts.num_heads, opts.head_dim, dtype=weight.dtype, device=weight.device)
        layers = self.model.layers
        return [(layers[0], hidden, None, positions, self.rotary, attn_out),
                (layers[min(1, len(layers) - 1)], hidden, hidden.clone(), positions, self.rotary, attn_out)]

    def load_weights(self, weights) -> set[str]:
        """weights: (checkpoint name, lazy tensor) pairs; returns the parameter names filled."""
        skip = ("lm_head.",) if self.options.tie_word_embeddings else ()
        loaded = load_stacked_weights(self, weights, skip_prefixes=skip)
        self.packs.refresh()
        self._head = None
        self._current_head()  # laid out now, not at the first request
        return loaded


class LlamaForCausalLM(NativeCausalLM):
    family = "llama"


class MistralForCausalLM(NativeCausalLM):
    family = "mistral"


class Qwen2ForCausalLM(NativeCausalLM):
    family = "qwen2"


class Qwen3ForCausalLM(NativeCausalLM):
    family = "qwen3"
