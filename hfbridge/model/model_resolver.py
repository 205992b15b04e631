"""Which class builds a model: a native override, a Transformers class, or the model's own remote code."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import transformers
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from hfbridge.config import ModelConfig
from hfbridge.native_overrides import NATIVE_MODELS, find_native_model, unsupported_reason

logger = logging.getLogger(__name__)

COMPATIBILITY_REQUIREMENTS = (
    "A model works with hfbridge's Transformers backend when (1) its modules pass `**kwargs` down to the "
    "attention function, (2) attention is called through "
    "`ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`, and (3) its PreTrainedModel sets "
    "`_supports_attention_backend = True`."
)


@dataclass(frozen=True)
class ModelClass:
    impl: str  # "transformers" | "native"
    cls: type
    # True when only a base model is available (remote code with `auto_map.AutoModel`): hfbridge adds the LM head.
    needs_lm_head: bool = False


def resolve_model_class(model_config: ModelConfig, tensor_parallel_size: int = 1) -> ModelClass:
    """auto: a registered native class when it implements the config, else Transformers; native: that or an
    error saying why; transformers: always Transformers."""
    architectures = model_config.architectures
    if model_config.runner == "generate" and getattr(model_config.hf_config, "is_encoder_decoder", False):
        raise ValueError(
            f"{', '.join(architectures) or model_config.model} is an encoder-decoder model (its decoder attends to "
            "an encoder's outputs, e.g. Whisper, BART, T5): hfbridge generates with decoder-only models, whose "
            "every attention reads the request's own tokens. Run it with Transformers' generate()."
        )
    if model_config.model_impl in ("auto", "native") and model_config.runner == "generate":
        native = find_native_model(architectures, getattr(model_config.hf_config, "model_type", None))
        reason = _native_refusal(model_config, tensor_parallel_size) if native is not None else None
        if native is not None and reason is None:
            return ModelClass("native", native)
        if reason is not None and model_config.model_impl == "native":
            raise ValueError(f"model_impl='native' cannot run {native.__name__}: {reason}. "
                             "Use model_impl='transformers' (or 'auto') to run it through Transformers.")
        if reason is not None:
            logger.info("Running %s through Transformers, not natively: %s", native.__name__, reason)
    if model_config.model_impl == "native":
        raise ValueError(
            f"model_impl='native' but no native implementation is registered for {architectures}; "
            f"registered: {sorted(NATIVE_MODELS) or 'none'}. Use model_impl='transformers' or 'auto'."
        )
    kind = "causal" if model_config.runner == "generate" else model_config.convert
    model_class = _transformers_class(model_config, kind)
    check_backend_compatible(model_class.cls)
    return model_class


def _native_refusal(model_config: ModelConfig, tensor_parallel_size: int) -> str | None:
    if tensor_parallel_size > 1:  # the native layers are not split across devices yet (tp x pp ranks)
        return f"{tensor_parallel_size} parallel ranks (tensor x pipeline) are not implemented by the native models yet"
    return unsupported_reason(model_config.hf_config)


def check_backend_compatible(cls: type) -> None:
    if not getattr(cls, "is_backend_compatible", lambda: False)():
        raise ValueError(
            f"{cls.__name__} does not set `_supports_attention_backend = True`, so it cannot run on hfbridge's "
            f"Transformers backend. {COMPATIBILITY_REQUIREMENTS}"
        )


def _auto_mapping(kind: str):
    from transformers.models.auto import modeling_auto

    return {
        "causal": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING,
        "embed": modeling_auto.MODEL_MAPPING,
        "classify": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    }[kind]


# kind -> the auto_map keys of remote code to try, in order (True: only a base model, hfbridge adds the LM head)
_REMOTE_KEYS = {
    "causal": (("AutoModelForCausalLM", False), ("AutoModel", True)),
    "embed": (("AutoModel", False),),
    "classify": (("AutoModelForSequenceClassification", False),),
}


def _transformers_class(model_config: ModelConfig, kind: str) -> ModelClass:
    """kind: causal (a causal LM), embed (a base model to pool), classify (a sequence classifier)."""
    config = model_config.hf_config
    auto_map = getattr(config, "auto_map", None) or {}
    model_keys = [k for k in auto_map if k.startswith("AutoModel")]
    if model_keys:
        if not model_config.trust_remote_code:
            raise ValueError(
                f"{model_config.model} defines its model in custom code (config.json auto_map: "
                f"{', '.join(model_keys)}); pass trust_remote_code=True (--trust-remote-code) to run it"
            )
        for key, needs_head in _REMOTE_KEYS[kind]:
            if key in auto_map:
                cls = get_class_from_dynamic_module(auto_map[key], model_config.model_path, revision=model_config.revision)
                return ModelClass("transformers", cls, needs_lm_head=needs_head)
    if kind == "causal":
        for arch in model_config.architectures:
            cls = getattr(transformers, arch, None)
            if isinstance(cls, type):
                return ModelClass("transformers", cls)
    if kind == "classify":
        for arch in model_config.architectures:
            cls = getattr(transformers, arch, None)
            if isinstance(cls, type) and arch.endswith("ForSequenceClassification"):
                return ModelClass("transformers", cls)
    # No (known) architecture recorded, or a base model wanted: the auto mapping for the config's type.
    try:
        return ModelClass("transformers", _auto_mapping(kind)[type(config)])
    except KeyError:
        raise ValueError(
            f"Cannot find a Transformers {kind} class for architectures {model_config.architectures} "
            f"(model_type {getattr(config, 'model_type', None)!r}); this Transformers version "
            f"({transformers.__version__}) may be too old, or the model needs trust_remote_code=True"
        ) from None
