"""Hand-written modules for performance-critical architectures.

`NATIVE_MODELS` maps a Transformers architecture name to (module inside this package, class name); modules are
imported only when chosen. `unsupported_reason` says why a config of a registered architecture still needs
Transformers (None: the native class reproduces it).
"""
from __future__ import annotations

import importlib

NATIVE_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "Qwen3ForCausalLM"),
}

# model_type -> architecture, for configs that record no architectures (a GGUF file's)
NATIVE_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "qwen3": "Qwen3ForCausalLM"}


def find_native_model(architectures: list[str], model_type: str | None = None) -> type | None:
    if not architectures and model_type in NATIVE_MODEL_TYPES:
        architectures = [NATIVE_MODEL_TYPES[model_type]]
    for arch in architectures:
        if arch in NATIVE_MODELS:
            module_name, class_name = NATIVE_MODELS[arch]
            module = importlib.import_module(f"hfbridge.native_overrides.{module_name}")
            return getattr(module, class_name)
    return None


def unsupported_reason(hf_config) -> str | None:
    from hfbridge.native_overrides.features import unsupported_reason as reason

    return reason(hf_config.get_text_config())
