"""One frozen engine config, made of sections, validated when built (see engine_args.py), never mutated."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PretrainedConfig


POOLING_TYPES = ("CLS", "LAST", "MEAN", "ALL", "STEP")


@dataclass(frozen=True)
class PoolerConfig:
    """How a pooling model turns hidden states into outputs (vLLM's --pooler-config)."""

    pooling_type: str | None = None  # CLS | LAST | MEAN | ALL | STEP; None = the model's default
    use_activation: bool | None = None  # embed: L2-normalise; classify: sigmoid / softmax
    dimensions: int | None = None  # default Matryoshka truncation
    step_tag_id: int | None = None
    returned_token_ids: list[int] | None = None
    task: str | None = None

    def __post_init__(self) -> None:
        if self.pooling_type is not None and self.pooling_type.upper() not in POOLING_TYPES:
            raise ValueError(f"pooling_type={self.pooling_type!r} is not one of {list(POOLING_TYPES)}")


@dataclass(frozen=True)
class ModelConfig:
    model: str  # as the user named it (hub id, folder or .gguf file)
    model_path: str  # local folder holding config and weights
    tokenizer_path: str
    gguf_file: str | None
    hf_config: PretrainedConfig = field(repr=False)
    dtype: torch.dtype
    max_model_len: int
    trust_remote_code: bool = False
    revision: str | None = None
    seed: int = 0
    model_impl: str = "auto"  # auto | transformers | native
    skip_tokenizer_init: bool = False
    served_model_name: str = ""
    max_logprobs: int = 20
    chat_template: str | None = None
    reasoning_parser: str | None = None  # structured outputs constrain what follows the reasoning
    tokenizer_mode: str = "auto"  # "slow": the Python tokenizer (use_fast=False)
    # Sampling defaults from the model's generation_config.json (vLLM's generation_config="auto").
    default_sampling: dict[str, Any] = field(default_factory=dict)
    generation_eos_token_ids: frozenset[int] = frozenset()  # from generation_config.json
    runner: str = "generate"  # generate | pooling
    convert: str = "none"  # none | embed | classify: how a pooling runner reads the model
    pooler_config: PoolerConfig | None = None  # resolved for pooling runners
    enforce_eager: bool = False  # True: never torch.compile (see native_overrides/compiled_regions.py)

    @property
    def hf_text_config(self) -> PretrainedConfig:
        return self.hf_config.get_text_config()

    @property
    def architectures(self) -> list[str]:
        return list(getattr(self.hf_config, "architectures", None) or [])


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.92
    kv_cache_memory_bytes: int | None = None  # CPU: KV budget; default a few GiB bounded by free RAM


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # vLLM's --scheduling-policy: fcfs (round-robin across requests) | priority


@dataclass(frozen=True)
class LoRAConfig:
    """enable_lora: adapters in fixed slots (max_loras per batch), ranks up to max_lora_rank, an LRU of
    max_cpu_loras adapters kept loaded (vLLM's names and defaults)."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int = 1

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras={self.max_loras} must be at least 1")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank={self.max_lora_rank} must be at least 1")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")


MODALITIES = ("image",)  # what multi_modal_data may hold; vLLM's video and audio are refused by name
DEFAULT_IMAGES_PER_PROMPT = 999  # vLLM's default limit_mm_per_prompt for each modality


@dataclass(frozen=True)
class MultiModalConfig:
    """Images in prompts (vLLM's names where it has them): at most limit_per_prompt[modality] items in one
    prompt; image URLs fetched within a timeout and a size cap, from allowed_media_domains when set, file:// only
    under allowed_local_media_path; encoder outputs cached up to encoder_cache_rows embedding rows."""

    limit_per_prompt: dict[str, int] = field(default_factory=lambda: {"image": DEFAULT_IMAGES_PER_PROMPT})
    allowed_local_media_path: str | None = None
    allowed_media_domains: frozenset[str] | None = None
    # seconds for an http(s) image; HFBRIDGE_IMAGE_FETCH_TIMEOUT sets it (vLLM's VLLM_IMAGE_FETCH_TIMEOUT, 5 s)
    media_fetch_timeout: float = field(
        default_factory=lambda: float(os.environ.get("HFBRIDGE_IMAGE_FETCH_TIMEOUT", "5")))
    max_media_bytes: int = 20 << 20
    # Pixels one image, and all images of one prompt together, may decode to (about 200 MB of RGB each), checked
    # from the file headers before decoding: decompression bombs, and many small files that expand to gigabytes.
    max_image_pixels: int = 8192 * 8192
    max_prompt_pixels: int = 8192 * 8192
    encoder_cache_rows: int = 16384
    max_num_encoder_input_tokens: int = 8192  # image embedding rows a step may encode (vLLM's name)


DISTRIBUTED_EXECUTOR_BACKENDS = ("uni", "mp", "external_launcher", "ray")


@dataclass(frozen=True)
class ParallelConfig:
    """How many ranks and who starts them (vLLM's names). Rank layout: world = tp x pp, the TP groups inside each
    pipeline stage (rank = stage * tp + tp_rank); the last stage's tp-rank 0 returns the logits (output_rank)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str = "uni"  # uni | mp | external_launcher | ray

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def output_rank(self) -> int:
        """The global rank whose "execute" reply the driver reads: the last stage's tp-rank 0."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size


@dataclass(frozen=True)
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    device: torch.device
    attention_backend: str = "torch"  # resolved by name: torch | triton | flash_attn
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    lora_config: LoRAConfig | None = None  # None: enable_lora=False
    multimodal_config: MultiModalConfig | None = None  # None: a text-only model
