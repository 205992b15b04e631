"""hfbridge: serve any Hugging Face Transformers model with a paged-KV-cache engine.

The public names load on first use (PEP 562 module __getattr__): `import hfbridge` and `hfbridge --help` stay
free of torch and Transformers, which take seconds to import; `from hfbridge import LLM` imports them then.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hfbridge.version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "LLM": "hfbridge.entrypoints.llm",
    "EngineArgs": "hfbridge.engine.engine_args",
    "LLMEngine": "hfbridge.engine.llm_engine",
    "LoRARequest": "hfbridge.lora.request",
    "PoolerConfig": "hfbridge.config",
    "CompletionOutput": "hfbridge.outputs",
    "Logprob": "hfbridge.outputs",
    "RequestOutput": "hfbridge.outputs",
    **dict.fromkeys(
        ["ClassificationOutput", "ClassificationRequestOutput", "EmbeddingOutput", "EmbeddingRequestOutput",
         "PoolingOutput", "PoolingRequestOutput", "ScoringOutput", "ScoringRequestOutput"],
        "hfbridge.pooling.pooling_outputs"),
    "PoolingParams": "hfbridge.pooling.pooling_params",
    "RequestOutputKind": "hfbridge.sample.sampling_params",
    "SamplingParams": "hfbridge.sample.sampling_params",
    "StructuredOutputsParams": "hfbridge.sample.structured_outputs_params",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ below imports on demand
    from hfbridge.config import PoolerConfig
    from hfbridge.engine.engine_args import EngineArgs
    from hfbridge.engine.llm_engine import LLMEngine
    from hfbridge.entrypoints.llm import LLM
    from hfbridge.lora.request import LoRARequest
    from hfbridge.outputs import CompletionOutput, Logprob, RequestOutput
    from hfbridge.pooling.pooling_outputs import (
        ClassificationOutput,
        ClassificationRequestOutput,
        EmbeddingOutput,
        EmbeddingRequestOutput,
        PoolingOutput,
        PoolingRequestOutput,
        ScoringOutput,
        ScoringRequestOutput,
    )
    from hfbridge.pooling.pooling_params import PoolingParams
    from hfbridge.sample.sampling_params import RequestOutputKind, SamplingParams
    from hfbridge.sample.structured_outputs_params import StructuredOutputsParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hfbridge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cached: the next lookup does not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
