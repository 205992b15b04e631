"""hfbridge: serve any Hugging Face Transformers model with a paged-KV-cache engine."""
from hfbridge.engine.engine_args import EngineArgs
from hfbridge.entrypoints.llm import LLM
from hfbridge.engine.llm_engine import LLMEngine
from hfbridge.config import PoolerConfig
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
from hfbridge.version import __version__

__all__ = [
    "LLM",
    "ClassificationOutput",
    "ClassificationRequestOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "PoolerConfig",
    "PoolingOutput",
    "PoolingParams",
    "PoolingRequestOutput",
    "ScoringOutput",
    "ScoringRequestOutput",
    "CompletionOutput",
    "EngineArgs",
    "LLMEngine",
    "Logprob",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "__version__",
]
