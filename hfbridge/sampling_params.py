"""vLLM's import path for the sampling types: `from hfbridge.sampling_params import SamplingParams,
StructuredOutputsParams` works as `from vllm.sampling_params import ...` does."""
from hfbridge.sample.sampling_params import RequestOutputKind, SamplingParams
from hfbridge.sample.structured_outputs_params import StructuredOutputsParams

__all__ = ["RequestOutputKind", "SamplingParams", "StructuredOutputsParams"]
