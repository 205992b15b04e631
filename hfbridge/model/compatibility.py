"""Which Transformers models hfbridge cannot serve, found before weights load.

`_supports_attention_backend` only says a model routes attention through `ALL_ATTENTION_FUNCTIONS`; some flagged
models still depend on what the "vllm" entry never gives them (an attention mask built by a mask function, a
second attention map, position offsets taken from the sequence length...). The probe finds those generically:
a tiny random copy of the architecture (same config, shapes shrunk) runs two packed sequences, a prefill then one
decode step over a paged KV cache, through the "vllm" entry, and must give the logits Transformers' own attention
gives for each sequence alone. About 0.1-0.5 s on CPU; the result is cached per class and config.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from hfbridge.attention_backends import ATTENTION_NAME, AttentionMetadata, ForwardContext, forward_context
from hfbridge.attention_backends import register_vllm_attention
from hfbridge.attention_backends.torch_backend import TorchReferenceBackend

logger = logging.getLogger(__name__)

PROBE_TOLERANCE = 1e-3  # max |logit difference| of the float32 tiny copy; real divergence is O(0.1-10)
PROBE_PROMPTS = ([5, 17, 42, 9, 77], [8, 30, 12, 60, 21, 7, 45, 3, 11])  # the second is longer than the windows
BLOCK_SIZE = 4

# Shape fields shrunk on a config (and its sub-configs) that has them; features (windows, softcaps, sinks) stay on.
SHRINK = {
    "vocab_size": 128, "hidden_size": 64, "d_model": 64, "n_embd": 64, "n_embed": 64,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "ffn_hidden_size": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "num_experts": 4, "num_local_experts": 4,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "rotary_dim": 8, "word_embed_proj_dim": 64,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "max_position_embeddings": 256,
}
# Set only when the config already sets them (a None window stays None).
SHRINK_IF_SET = {"sliding_window": 4, "attention_chunk_size": 4, "window_size": 4}
SUB_CONFIGS = ("text_config", "decoder", "llm_config")
# Named features for the refusal message, by the kwargs / module attributes that reveal them.
KNOWN_FEATURES = {
    "DiffLlamaForCausalLM": "differential attention (two attention maps per layer, subtracted)",
    "DogeForCausalLM": "a dynamic attention mask added to the scores",
    "MiniMaxForCausalLM": "lightning (linear) attention layers outside the attention interface",
    "GraniteSWAForCausalLM": "an attention mask built by its own mask function",
    "GraniteMoeSWAForCausalLM": "an attention mask built by its own mask function",
    "Lfm3ForCausalLM": "short-convolution mixer layers that keep their own state outside the attention interface",
    "HYV4ForCausalLM": "an attention mask its layers index directly (the 'vllm' entry gives none)",
}


# Static refusals for the pooling runner (its packed requests have no probe): model_type -> (test, feature).
POOLING_REFUSALS = {
    "mobilebert": (lambda c: bool(getattr(c, "trigram_input", False)),
                   "trigram input embeddings (each token's embedding reads its neighbours, which would cross "
                   "from one packed request into the next)"),
}


class UnsupportedModelError(ValueError):
    """The model cannot run on hfbridge: the message names the feature and what the user can do."""


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    max_diff: float = 0.0
    detail: str = ""


def shrink_config(config, overrides: dict | None = None):
    """A copy of config with small shapes and the same features; per-layer lists keep each distinct kind."""
    config = copy.deepcopy(config)
    _shrink_in_place(config, overrides or {})
    return config


def _shrink_in_place(config, overrides: dict) -> None:
    layers = getattr(config, "num_hidden_layers", None)
    keep = _layers_to_keep(getattr(config, "layer_types", None)) if isinstance(layers, int) else None
    for key, value in {**SHRINK, **overrides}.items():
        if key in config.__dict__ or key in overrides:
            _try_set(config, key, value)
    for key, value in SHRINK_IF_SET.items():
        if getattr(config, key, None):
            _try_set(config, key, min(value, config.__dict__.get(key) or value))
    if "qk_rope_head_dim" in config.__dict__ and "head_dim" in config.__dict__:  # MLA: rotary width is head_dim
        _try_set(config, "head_dim", config.qk_rope_head_dim)
    if keep is not None:
        _try_set(config, "num_hidden_layers", len(keep))
        for key, value in list(config.__dict__.items()):
            if isinstance(value, list) and len(value) == layers and key != "architectures":
                _try_set(config, key, [value[i] for i in keep])
    for key in SUB_CONFIGS:
        sub = getattr(config, key, None)
        if sub is not None and sub is not config and hasattr(sub, "to_dict"):
            _shrink_in_place(sub, overrides)


def _layers_to_keep(layer_types) -> list[int]:
    """Indices of two layers, covering two distinct layer kinds when there are several (sliding and full)."""
    if not isinstance(layer_types, list) or not layer_types:
        return [0, 1]
    firsts = {}
    for i, kind in enumerate(layer_types):
        firsts.setdefault(kind, i)
    keep = sorted(firsts.values())[:2]
    return keep if len(keep) == 2 else [0, min(1, len(layer_types) - 1)]


def _try_set(config, key, value) -> None:
    try:
        setattr(config, key, value)
    except (AttributeError, TypeError, ValueError):
        pass


_CACHE: dict[tuple[str, str], ProbeResult] = {}


def probe_compatibility(cls: type, config, wrap) -> ProbeResult:
    """Run the tiny copy both ways. wrap(hf_model) -> hfbridge's causal-LM wrapper (forward(ids, positions, idx))."""
    key = (f"{cls.__module__}.{cls.__qualname__}", config.to_json_string())
    if key not in _CACHE:
        _CACHE[key] = _probe(cls, config, wrap)
    return _CACHE[key]


# Tried in order: every shape shrunk, then only depth, vocabulary and experts (widths kept consistent).
_SHRINK_PLANS = (None, {key: SHRINK[key] for key in (
    "vocab_size", "num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_experts", "num_local_experts",
    "n_routed_experts", "num_experts_per_tok", "max_position_embeddings")})


def _tiny_reference(cls: type, config, prompts: list[list[int]]):
    """The tiny copy (eager attention) and its logits per prompt; raises the last plan's error when none runs."""
    error: Exception | None = None
    for plan in _SHRINK_PLANS:
        try:
            tiny = shrink_config(config) if plan is None else _shrink_only(config, plan)
            _check_size(cls, tiny)
            torch.manual_seed(0)
            model = cls._from_config(tiny, attn_implementation="eager", dtype=torch.float32).eval()
            return model, [_reference_logits(model, p + [p[-1]]) for p in prompts]
        except Exception as exc:  # noqa: BLE001 - try the next, less aggressive plan
            error = exc
    raise error


MAX_PROBE_PARAMS = 20_000_000  # ~80 MB in float32, well under a second to build: larger copies are not probed


def _check_size(cls: type, config) -> None:
    with torch.device("meta"):
        count = sum(p.numel() for p in cls._from_config(copy.deepcopy(config)).parameters())
    if count > MAX_PROBE_PARAMS:
        raise ValueError(f"the tiny copy would still have {count:,} parameters")


def _shrink_only(config, fields: dict):
    config = copy.deepcopy(config)
    targets = [config] + [getattr(config, k) for k in SUB_CONFIGS if hasattr(getattr(config, k, None), "to_dict")]
    for target in targets:
        for key, value in fields.items():
            if key in target.__dict__:
                _try_set(target, key, value)
    return config


def _probe(cls: type, config, wrap) -> ProbeResult:
    prompts = [list(p) for p in PROBE_PROMPTS]
    try:
        model, reference = _tiny_reference(cls, config, prompts)
    except Exception as exc:  # noqa: BLE001 - the tiny copy is a best effort; the static gate still ran
        logger.warning("compatibility probe skipped for %s: its tiny copy did not run (%s)", cls.__name__, exc)
        return ProbeResult(True, detail=f"probe skipped: {exc}")
    register_vllm_attention()
    for module in model.modules():  # as build_on_meta does it: no mask function, attention through the entry
        config_of = getattr(module, "config", None)
        if config_of is not None and hasattr(config_of, "_attn_implementation"):
            config_of._attn_implementation = ATTENTION_NAME
    try:
        ours = _paged_logits(wrap(model), prompts, [p[-1] for p in prompts])
    except UnsupportedModelError as exc:
        return ProbeResult(False, float("inf"), str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure of the packed path is an incompatibility
        return ProbeResult(False, float("inf"), f"the packed forward failed: {type(exc).__name__}: {exc}")
    diffs = [(o - r).abs().max().item() for o, r in zip(ours, reference)]
    worst = max(diffs)
    if worst != worst or worst > PROBE_TOLERANCE:
        return ProbeResult(False, worst, f"logits differ from Transformers' own attention by {worst:.3g}")
    return ProbeResult(True, worst)


def _reference_logits(model, ids: list[int]) -> torch.Tensor:
    """Transformers alone, one sequence, no cache: logits at the prompt's last token and the decode token [2, V]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0].float()
    return logits[-2:]


def check_compatible(cls: type, config, runner: str, needs_lm_head: bool) -> ProbeResult:
    """Raise UnsupportedModelError when a causal LM's tiny copy diverges; pooling models and base models with
    hfbridge's own head are not probed (their attention has no cache, or the head is ours)."""
    text_config = config.get_text_config()
    refusal_rule = POOLING_REFUSALS.get(getattr(text_config, "model_type", None))
    if runner == "pooling" and refusal_rule is not None and refusal_rule[0](text_config):
        raise UnsupportedModelError(
            f"{cls.__name__} cannot run on hfbridge's pooling runner: {refusal_rule[1]}. Not supported with "
            "model_impl='transformers': run it with Transformers or Sentence-Transformers directly."
        )
    if runner != "generate" or needs_lm_head:
        return ProbeResult(True, detail="not probed")
    from hfbridge.model.transformers_model import TransformersForCausalLM

    result = probe_compatibility(cls, config, TransformersForCausalLM)
    if not result.ok:
        raise refusal(cls, result)
    return result


class _PagedProbeBackend(TorchReferenceBackend):
    """The reference backend over caches it allocates on each layer's first call (shapes come from the call)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.caches: dict[int, torch.Tensor] = {}

    def forward(self, query, key, value, kv_cache, metadata, layer):
        if layer.layer_idx is None:
            raise UnsupportedModelError(
                "its attention modules have no integer `layer_idx` (an encoder class used as a decoder), so "
                "hfbridge cannot keep their KV cache"
            )
        cache = self.caches.get(layer.layer_idx)
        if cache is None:
            shape = (2, self.num_blocks, BLOCK_SIZE, key.shape[1], key.shape[2])
            cache = self.caches[layer.layer_idx] = torch.zeros(shape, dtype=key.dtype, device=key.device)
        return super().forward(query, key, value, cache, metadata, layer)


def _paged_logits(wrapper, prompts: list[list[int]], next_tokens: list[int]) -> list[torch.Tensor]:
    """All prompts packed in one prefill step, then one decode step each, over a paged cache: [2, V] per prompt."""
    tables, first = [], 0
    for p in prompts:
        n = -(-(len(p) + 1) // BLOCK_SIZE)
        tables.append(list(range(first, first + n)))
        first += n
    backend = _PagedProbeBackend(first)

    def slot(b: int, pos: int) -> int:
        return tables[b][pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE

    prefill = AttentionMetadata.build(
        slot_mapping=[slot(b, i) for b, p in enumerate(prompts) for i in range(len(p))],
        query_lens=[len(p) for p in prompts], seq_lens=[len(p) for p in prompts], block_tables=tables,
    )
    decode = AttentionMetadata.build(
        slot_mapping=[slot(b, len(p)) for b, p in enumerate(prompts)], query_lens=[1] * len(prompts),
        seq_lens=[len(p) + 1 for p in prompts], block_tables=tables,
    )
    ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    steps = [
        (prefill, [t for p in prompts for t in p], [i for p in prompts for i in range(len(p))], ends),
        (decode, next_tokens, [len(p) for p in prompts], torch.arange(len(prompts))),
    ]
    rows = []
    with torch.no_grad():
        for metadata, ids, positions, keep in steps:
            with forward_context(ForwardContext(metadata, {}, backend)):
                logits = wrapper(torch.tensor([ids]), torch.tensor([positions]), keep)
            rows.append(logits.float())
            if not backend.caches:
                raise UnsupportedModelError(
                    "its attention modules make no call to ALL_ATTENTION_FUNCTIONS[config._attn_implementation] "
                    "(they call sdpa/eager or a recurrent mixer directly), so hfbridge cannot run them over its KV cache"
                )
    return [torch.stack([rows[0][b], rows[1][b]]) for b in range(len(prompts))]


def refusal(cls: type, result: ProbeResult) -> UnsupportedModelError:
    feature = KNOWN_FEATURES.get(cls.__name__) or (
        "its attention depends on something the 'vllm' attention entry does not provide (an attention mask built "
        "by a mask function, extra attention inputs, or position offsets from the sequence length)"
    )
    return UnsupportedModelError(
        f"{cls.__name__} cannot run on hfbridge's Transformers backend: {feature}. A tiny random copy of the "
        f"architecture run through hfbridge's paged attention does not reproduce Transformers ({result.detail}), so "
        "hfbridge would generate different tokens. Not supported with model_impl='transformers': run it with "
        "Transformers directly, or with model_impl='native' if hfbridge registers a native implementation for it."
    )
