"""Reading a model's Transformers config and generation defaults, with the user's overrides applied."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from hfbridge.model.gguf_metadata import gguf_metadata_folder
from hfbridge.model.model_source import ModelSource

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
    try:
        if source.gguf_file:  # the file's config, kept as config.json after the first read
            config = AutoConfig.from_pretrained(gguf_metadata_folder(Path(source.folder) / source.gguf_file))
        else:
            config = AutoConfig.from_pretrained(source.folder, **kwargs)
    except (ValueError, *GGUF_READ_ERRORS) as e:
        if source.gguf_file:  # the reader's own errors name neither the file nor the problem
            raise ValueError(unreadable_gguf(Path(source.folder) / source.gguf_file, e)) from e
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


# What the GGUF readers raise on a truncated or corrupt file: hfbridge's header walk (EOFError, OSError, KeyError),
# Transformers' through the gguf package (numpy reshapes past the end: IndexError)
GGUF_READ_ERRORS = (OSError, IndexError, KeyError, EOFError)


def unreadable_gguf(path: Path, error: BaseException) -> str:
    """The message for a GGUF file Transformers' reader (the `gguf` package) cannot read."""
    if "architecture" in str(error) and "not supported" in str(error):
        return f"{path}: {error} (Transformers' GGUF reader lists the architectures it converts)"
    return (f"{path} is not a readable GGUF file ({type(error).__name__}: {error}); it may be truncated or "
            "corrupt: download it again")


def apply_overrides(target: Any, overrides: dict[str, Any]) -> None:
    """Deep merge: nested dicts update sub-configs and dict attributes key by key; anything else is replaced."""
    for key, value in overrides.items():
        current = getattr(target, key, None) if not isinstance(target, dict) else target.get(key)
        if isinstance(value, dict) and isinstance(current, PretrainedConfig):
            apply_overrides(current, value)
        elif isinstance(value, dict) and isinstance(current, dict):
            # A copy: dict attributes such as base_model_tp_plan are often class-level, shared by every config.
            merged = dict(current)
            apply_overrides(merged, value)
            if isinstance(target, dict):
                target[key] = merged
            else:
                setattr(target, key, merged)
        elif isinstance(target, dict):
            target[key] = value
        else:
            setattr(target, key, value)


def read_generation_config(folder: str) -> GenerationConfig | None:
    """The model's generation_config.json, or None when it has none (or an unreadable one)."""
    if not (Path(folder) / "generation_config.json").is_file():
        return None
    try:
        return GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError):
        return None


def generation_defaults(generation_config: GenerationConfig | None) -> dict[str, Any]:
    """SamplingParams defaults from generation_config.json (only the fields vLLM reads, and only those set)."""
    if generation_config is None:
        return {}
    explicit = generation_config.to_diff_dict()
    return {
        name: getattr(generation_config, hf_name)
        for hf_name, name in _SAMPLING_DEFAULTS.items()
        if hf_name in explicit and getattr(generation_config, hf_name, None) is not None
    }


def generation_eos_token_ids(generation_config: GenerationConfig | None) -> frozenset[int]:
    """EOS ids named in generation_config.json (an int or a list)."""
    eos = None if generation_config is None else generation_config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
