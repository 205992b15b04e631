"""Hand-written modules for performance-critical architectures.

`NATIVE_MODELS` maps a Transformers architecture name to (module, class name); modules are imported only when
chosen. The modules are named in full, so tests/test_import_layers.py reads these lazy imports like any other. `unsupported_reason` says why a config of a registered architecture still needs
Transformers (None: the native class reproduces it).
"""
from __future__ import annotations

import importlib

NATIVE_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("hfbridge.native_overrides.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("hfbridge.native_overrides.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("hfbridge.native_overrides.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("hfbridge.native_overrides.llama", "Qwen3ForCausalLM"),
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
            module = importlib.import_module(module_name)
            return getattr(module, class_name)
    return None


def unsupported_reason(hf_config) -> str | None:
    from hfbridge.native_overrides.features import unsupported_reason as reason

    return reason(hf_config.get_text_config())
