"""Reading a model's Transformers config and generation defaults, with the user's overrides applied."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from hfbridge.model_source import ModelSource

# The generation_config.json fields vLLM turns into default SamplingParams (generation_config="auto").
_SAMPLING_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def load_hf_config(
    source: ModelSource,
    trust_remote_code: bool,
    revision: str | None,
    hf_overrides: dict[str, Any] | Callable[[PretrainedConfig], PretrainedConfig] | None,
) -> PretrainedConfig:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        config = AutoConfig.from_pretrained(source.folder, **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise ValueError(
                f"The model at {source.folder} ships custom code (config.json `auto_map`) that must run to load "
                "it; pass trust_remote_code=True (--trust-remote-code) if you trust it"
            ) from e
        raise
    if callable(hf_overrides):
        config = hf_overrides(config)
    elif hf_overrides:
        apply_overrides(config, hf_overrides)
    return config


def apply_overrides(target: Any, overrides: dict[str, Any]) -> None:
    """Deep merge: nested dicts update sub-configs and dict attributes key by key; anything else is replaced."""
    for key, value in overrides.items():
        current = getattr(target, key, None) if not isinstance(target, dict) else target.get(key)
        if isinstance(value, dict) and isinstance(current, (PretrainedConfig, dict)):
            apply_overrides(current, value)
        elif isinstance(target, dict):
            target[key] = value
        else:
            setattr(target, key, value)


def load_generation_defaults(source: ModelSource) -> dict[str, Any]:
    """SamplingParams defaults from generation_config.json (only the fields vLLM reads)."""
    if not (Path(source.folder) / "generation_config.json").is_file():
        return {}
    try:
        generation_config = GenerationConfig.from_pretrained(source.folder)
    except (OSError, ValueError):
        return {}
    defaults = {}
    for hf_name, name in _SAMPLING_DEFAULTS.items():
        value = getattr(generation_config, hf_name, None)
        if value is not None and hf_name in generation_config.to_diff_dict():
            defaults[name] = value
    return defaults


def generation_eos_token_ids(source_folder: str) -> set[int]:
    """EOS ids named in generation_config.json (an int or a list)."""
    path = Path(source_folder) / "generation_config.json"
    if not path.is_file():
        return set()
    try:
        eos = GenerationConfig.from_pretrained(source_folder).eos_token_id
    except (OSError, ValueError):
        return set()
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
