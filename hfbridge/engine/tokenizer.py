"""Loading the tokenizer that belongs to a model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from hfbridge.config import ModelConfig
from hfbridge.model.gguf_metadata import gguf_metadata_folder


def load_tokenizer(model_config: ModelConfig) -> Any | None:
    if model_config.skip_tokenizer_init:
        return None
    kwargs: dict[str, Any] = {"trust_remote_code": model_config.trust_remote_code, "revision": model_config.revision,
                              "use_fast": model_config.tokenizer_mode != "slow"}
    folder = model_config.tokenizer_path
    if model_config.gguf_file and model_config.tokenizer_path == model_config.model_path:
        folder = str(gguf_metadata_folder(Path(model_config.model_path) / model_config.gguf_file))
    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(
            f"Could not load a tokenizer from {model_config.tokenizer_path}: {e}. Pass tokenizer=<folder or hub id>, "
            "or skip_tokenizer_init=True to work with token ids only"
        ) from e


def eos_token_ids(tokenizer: Any, model_config: ModelConfig) -> frozenset[int]:
    """EOS ids from the tokenizer, the model config and generation_config.json."""
    ids: set[int] = set(model_config.generation_eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(model_config.hf_text_config, "eos_token_id", None)
    if tokenizer is None and config_eos is not None:
        ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    return frozenset(ids)
