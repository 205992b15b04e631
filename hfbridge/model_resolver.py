"""Which class builds a model: a native override, a Transformers class, or the model's own remote code."""
from __future__ import annotations

from dataclasses import dataclass

import transformers
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from hfbridge.config import ModelConfig
from hfbridge.native_overrides import NATIVE_MODELS, find_native_model

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


def resolve_model_class(model_config: ModelConfig, auto_map_keys: tuple[str, ...] = ("AutoModelForCausalLM",)) -> ModelClass:
    architectures = model_config.architectures
    if model_config.model_impl in ("auto", "native"):
        native = find_native_model(architectures)
        if native is not None:
            return ModelClass("native", native)
        if model_config.model_impl == "native":
            raise ValueError(
                f"model_impl='native' but no native implementation is registered for {architectures}; "
                f"registered: {sorted(NATIVE_MODELS) or 'none'}. Use model_impl='transformers' or 'auto'."
            )
    model_class = _transformers_class(model_config, auto_map_keys)
    check_backend_compatible(model_class.cls)
    return model_class


def check_backend_compatible(cls: type) -> None:
    if not getattr(cls, "is_backend_compatible", lambda: False)():
        raise ValueError(
            f"{cls.__name__} does not set `_supports_attention_backend = True`, so it cannot run on hfbridge's "
            f"Transformers backend. {COMPATIBILITY_REQUIREMENTS}"
        )


def _transformers_class(model_config: ModelConfig, auto_map_keys: tuple[str, ...]) -> ModelClass:
    config = model_config.hf_config
    auto_map = getattr(config, "auto_map", None) or {}
    model_keys = [k for k in auto_map if k.startswith("AutoModel")]
    if model_keys:
        if not model_config.trust_remote_code:
            raise ValueError(
                f"{model_config.model} defines its model in custom code (config.json auto_map: "
                f"{', '.join(model_keys)}); pass trust_remote_code=True (--trust-remote-code) to run it"
            )
        for key, needs_head in [(k, False) for k in auto_map_keys] + [("AutoModel", True)]:
            if key in auto_map:
                cls = get_class_from_dynamic_module(
                    auto_map[key], model_config.model_path, revision=model_config.revision
                )
                return ModelClass("transformers", cls, needs_lm_head=needs_head)
    for arch in model_config.architectures:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type):
            return ModelClass("transformers", cls)
    # No (known) architecture recorded: fall back on the auto mapping for the config's model type.
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return ModelClass("transformers", MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])
    except KeyError:
        raise ValueError(
            f"Cannot find a Transformers class for architectures {model_config.architectures} "
            f"(model_type {getattr(config, 'model_type', None)!r}); this Transformers version "
            f"({transformers.__version__}) may be too old, or the model needs trust_remote_code=True"
        ) from None
