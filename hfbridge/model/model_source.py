"""Where a model's files come from: a local folder, a local .gguf file, the Hugging Face Hub or ModelScope."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Everything a model needs except weights; weights are chosen below (safetensors first, .bin only as fallback).
_METADATA_PATTERNS = ["*.json", "*.py", "*.txt", "*.model", "*.tiktoken", "*.jinja", "tokenizer*", "1_Pooling/*"]


@dataclass(frozen=True)
class ModelSource:
    folder: str  # local folder with config.json (or the folder of the .gguf file)
    gguf_file: str | None = None  # file name inside `folder`


def resolve_model_source(
    model: str,
    *,
    revision: str | None = None,
    hf_token: str | bool | None = None,
    gguf_file: str | None = None,
    download_dir: str | None = None,
) -> ModelSource:
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model={model!r} is a file but not a .gguf file; pass a model folder or a Hub id")
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        return ModelSource(str(path), gguf_file)
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        raise ValueError(f"model={model!r} looks like a local path but does not exist")
    if os.environ.get("HFBRIDGE_USE_MODELSCOPE", "").lower() in ("1", "true", "yes"):
        return ModelSource(_download_modelscope(model, revision, download_dir), gguf_file)
    return ModelSource(_download_hf_hub(model, revision, hf_token, gguf_file, download_dir), gguf_file)


def _download_hf_hub(repo_id: str, revision: str | None, token: str | bool | None, gguf_file: str | None,
                     download_dir: str | None = None) -> str:
    """Honours HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE through huggingface_hub itself; download_dir (vLLM's
    --download-dir) replaces the cache folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fetch(patterns: list[str]) -> str:
        return snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns,
                                 cache_dir=download_dir)

    try:
        if gguf_file is not None:
            return fetch([*_METADATA_PATTERNS, gguf_file])
        folder = fetch([*_METADATA_PATTERNS, "*.safetensors", "*.safetensors.index.json"])
        if not any(Path(folder).glob("*.safetensors")):
            folder = fetch([*_METADATA_PATTERNS, "*.bin", "*.bin.index.json"])
        return folder
    except LocalEntryNotFoundError as e:
        raise ValueError(
            f"model={repo_id!r} is not a local folder and is not in the Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}), and the Hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}). Download it first or pass a local folder."
        ) from e


def _download_modelscope(model_id: str, revision: str | None, download_dir: str | None = None) -> str:
    try:
        from modelscope import snapshot_download
    except ImportError as e:
        raise ImportError(
            "HFBRIDGE_USE_MODELSCOPE=1 needs the modelscope package: pip install modelscope "
            "(or unset HFBRIDGE_USE_MODELSCOPE to use the Hugging Face Hub)"
        ) from e
    return snapshot_download(model_id, revision=revision or "master", cache_dir=download_dir)
