"""Hand-written modules for performance-critical architectures.

`NATIVE_MODELS` maps a Transformers architecture name to (module inside this package, class name); modules are
imported only when chosen. It is empty for now: every model runs through Transformers.
"""
from __future__ import annotations

import importlib

NATIVE_MODELS: dict[str, tuple[str, str]] = {}


def find_native_model(architectures: list[str]) -> type | None:
    for arch in architectures:
        if arch in NATIVE_MODELS:
            module_name, class_name = NATIVE_MODELS[arch]
            module = importlib.import_module(f"hfbridge.native_overrides.{module_name}")
            return getattr(module, class_name)
    return None
