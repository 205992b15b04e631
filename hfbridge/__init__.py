"""hfbridge: serve any Hugging Face Transformers model with a paged-KV-cache engine."""
from hfbridge.engine_args import EngineArgs
from hfbridge.llm import LLM
from hfbridge.llm_engine import LLMEngine
from hfbridge.outputs import CompletionOutput, Logprob, RequestOutput
from hfbridge.sampling_params import RequestOutputKind, SamplingParams
from hfbridge.version import __version__

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineArgs",
    "LLMEngine",
    "Logprob",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "__version__",
]
