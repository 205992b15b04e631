"""User-facing engine arguments (vLLM's names) and their resolution into the frozen EngineConfig."""
from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from hfbridge.attention_backends.registry import resolve_backend_name
from hfbridge.config import (
    DEFAULT_IMAGES_PER_PROMPT,
    DISTRIBUTED_EXECUTOR_BACKENDS,
    MODALITIES,
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    MultiModalConfig,
    ParallelConfig,
    PoolerConfig,
    SchedulerConfig,
)
from hfbridge.cpu_features import native_bfloat16
from hfbridge.model.model_source import resolve_model_source
from hfbridge.multimodal.processor import is_multimodal
from hfbridge.structured_output.reasoning import check_reasoning_parser
from hfbridge.pooling.task_resolution import read_sentence_transformers_config, resolve_runner

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
_MAX_LEN_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
    "n_ctx",
)
# vLLM arguments that cannot change what is computed here: accepted with a one-line warning.
IGNORED_ARGS = frozenset(
    {
        "swap_space",
        "cpu_offload_gb",
        "compilation_config",
        "disable_log_stats",
        "disable_custom_all_reduce",
        "max_seq_len_to_capture",
        "enable_log_requests",
        "disable_log_requests",
    }
)
# vLLM arguments that would change the output: accepted with the values that change nothing here (vLLM's
# defaults), refused with the reason otherwise; never dropped with a warning. name -> (values accepted, reason).
REFUSED_ARGS: dict[str, tuple[tuple[Any, ...], str]] = {
    "kv_cache_dtype": (("auto",), "the KV cache keeps the model's dtype (auto)"),
    "load_format": (("auto", "safetensors", "pt"), "weights load from the checkpoint's own files"),
    "code_revision": ((None,), "remote code is read at `revision`"),
    "structured_outputs_config": ((None, {}, {"backend": "auto"}, {"backend": "xgrammar"}),
                                  "structured outputs are decoded with xgrammar"),
    "logits_processors": ((None, []), "custom logits processors are not supported"),
    "mm_processor_kwargs": ((None, {}), "processor options are not supported yet: images are prepared with the "
                                        "processor's own settings"),
    "data_parallel_size": ((1,), "data parallelism is not supported; run one engine per replica"),
}
SCHEDULING_POLICIES = ("fcfs", "priority")


TOKENIZER_MODES = ("auto", "hf", "slow")  # vLLM's "mistral" and "custom" need tokenizers hfbridge does not have


@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    revision: str | None = None
    tokenizer_revision: str | None = None
    tokenizer_mode: str = "auto"  # auto / hf: the fast tokenizer where there is one; slow: the Python one
    download_dir: str | None = None  # the cache folder for Hub downloads (instead of HF_HUB_CACHE)
    hf_token: str | bool | None = None
    trust_remote_code: bool = False
    gguf_file: str | None = None
    quantization: str | None = None  # "gguf", implied by a GGUF file: the only method served
    dtype: str | torch.dtype = "auto"
    seed: int | None = 0
    max_model_len: int | str | None = None
    model_impl: str = "auto"
    hf_overrides: dict[str, Any] | Callable[[Any], Any] | None = None
    skip_tokenizer_init: bool = False
    served_model_name: str | list[str] | None = None
    max_logprobs: int = 20
    chat_template: str | None = None
    reasoning_parser: str | None = None  # structured outputs start after the reasoning (deepseek_r1, qwen3)
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] | None = None
    device: str = "auto"
    # runner: generate or pool (vLLM's runner / convert, and the legacy task)
    runner: str = "auto"
    convert: str = "auto"
    task: str | None = None
    pooler_config: PoolerConfig | dict[str, Any] | None = None
    override_pooler_config: PoolerConfig | dict[str, Any] | None = None
    # cache
    block_size: int = 16
    enable_prefix_caching: bool | None = None
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.92
    kv_cache_memory_bytes: int | None = None
    # scheduler
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    enable_chunked_prefill: bool | None = None
    scheduling_policy: str = "fcfs"  # fcfs | priority (lower `priority` values run first, as in vLLM)
    # attention
    attention_backend: str | None = None
    # compilation: False (vLLM's default) lets native decoders torch.compile in the background; the environment
    # variable HFBRIDGE_ENFORCE_EAGER=1 changes the default (the test suite sets it: compiling every tiny model
    # would cost minutes; tests that compile say so)
    enforce_eager: bool = field(default_factory=lambda: os.environ.get("HFBRIDGE_ENFORCE_EAGER", "0") == "1")
    # parallel over torch.distributed: world = tp x pp ranks
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # uni | mp | external_launcher | ray; None: uni if 1 rank, else mp
    # LoRA adapters (vLLM's names and defaults): max_loras adapters in one batch, ranks up to max_lora_rank, an LRU
    # of max_cpu_loras loaded adapters (None: max_loras)
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # images (vision-language models; vLLM's names): items per prompt by modality (None: 999 images), file://
    # image URLs only under allowed_local_media_path, http(s) image URLs only from allowed_media_domains when set
    limit_mm_per_prompt: dict[str, int] | None = None
    allowed_local_media_path: str | None = None
    allowed_media_domains: list[str] | None = None
    ignored: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        """Unknown names raise TypeError, as vLLM's EngineArgs does; vLLM-only names warn once."""
        known = {f.name for f in fields(cls)}
        for name, (accepted, reason) in REFUSED_ARGS.items():
            if name in kwargs:
                value = kwargs.pop(name)
                if value not in accepted:
                    raise ValueError(f"{name}={value!r} is not supported: {reason}")
        ignored = {k: kwargs.pop(k) for k in list(kwargs) if k in IGNORED_ARGS}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unexpected engine argument(s): {', '.join(unknown)}")
        for name in ignored:
            logger.warning("Engine argument %r has no effect in hfbridge and is ignored", name)
        return cls(**kwargs, ignored=ignored)

    def create_engine_config(self) -> EngineConfig:
        parallel_config = self._parallel_config()
        device = _resolve_device(self.device)
        attention_backend = resolve_backend_name(self.attention_backend, device)  # fail before loading anything
        check_reasoning_parser(self.reasoning_parser)
        model_config = self._model_config(device)
        pooling = model_config.runner == "pooling"
        if pooling and parallel_config.pipeline_parallel_size > 1:
            raise ValueError(
                f"pipeline_parallel_size={parallel_config.pipeline_parallel_size} serves generation models; "
                "pooling models run with pipeline_parallel_size=1 (tensor_parallel_size can still split them)"
            )
        cache_config = self._cache_config(pooling)
        scheduler_config = self._scheduler_config(model_config.max_model_len, device, pooling)
        lora_config = self._lora_config(pooling, parallel_config, is_multimodal(model_config.hf_config))
        multimodal_config = self._multimodal_config(model_config, parallel_config, scheduler_config)
        return EngineConfig(model_config, cache_config, scheduler_config, device, attention_backend, parallel_config,
                            lora_config, multimodal_config)

    def _multimodal_config(self, model_config: ModelConfig, parallel: ParallelConfig,
                           scheduler: SchedulerConfig) -> MultiModalConfig | None:
        limits = dict(self.limit_mm_per_prompt or {})
        for modality, limit in limits.items():
            if modality not in MODALITIES and limit:
                raise ValueError(f"limit_mm_per_prompt={limits!r}: {modality} inputs are not supported; hfbridge "
                                 f"serves {list(MODALITIES)}")
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise ValueError(f"limit_mm_per_prompt[{modality!r}]={limit!r} must be a non-negative integer")
        path = self.allowed_local_media_path
        if path is not None and not os.path.isdir(path):
            raise ValueError(f"allowed_local_media_path={path!r} is not a folder")
        if not is_multimodal(model_config.hf_config) or model_config.runner != "generate":
            return None
        if parallel.world_size > 1:
            logger.warning("Prompts with images are refused: %s is served under tensor/pipeline parallelism, where "
                           "images are not supported yet", model_config.model)
            return None
        domains = self.allowed_media_domains
        return MultiModalConfig(
            limit_per_prompt={"image": DEFAULT_IMAGES_PER_PROMPT, **limits},
            allowed_local_media_path=os.path.realpath(path) if path is not None else None,
            allowed_media_domains=frozenset(d.lower() for d in domains) if domains is not None else None,
            max_num_encoder_input_tokens=max(scheduler.max_num_batched_tokens, 1),
        )

    def _lora_config(self, pooling: bool, parallel: ParallelConfig, multimodal: bool) -> LoRAConfig | None:
        if not self.enable_lora:
            return None
        refusals = [
            (pooling, "pooling models"),
            (multimodal, "vision-language models (an adapter's targets would reach into the vision tower)"),
            (parallel.pipeline_parallel_size > 1, f"pipeline_parallel_size={parallel.pipeline_parallel_size}"),
            (parallel.distributed_executor_backend in ("ray", "external_launcher"),
             f"distributed_executor_backend={parallel.distributed_executor_backend!r} (use 'mp' for tensor "
             "parallelism)"),
        ]
        for refused, what in refusals:
            if refused:
                raise ValueError(f"enable_lora=True is not supported with {what}: LoRA adapters are served by "
                                 "generation models in one process or under tensor parallelism with 'mp'")
        max_cpu_loras = self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras
        return LoRAConfig(int(self.max_loras), int(self.max_lora_rank), int(max_cpu_loras))

    def _parallel_config(self) -> ParallelConfig:
        tp, pp, backend = int(self.tensor_parallel_size), int(self.pipeline_parallel_size), self.distributed_executor_backend
        if tp < 1:
            raise ValueError(f"tensor_parallel_size={tp} must be at least 1")
        if pp < 1:
            raise ValueError(f"pipeline_parallel_size={pp} must be at least 1")
        if backend is None:
            backend = "uni" if tp * pp == 1 else "mp"
        if backend not in DISTRIBUTED_EXECUTOR_BACKENDS:
            raise ValueError(
                f"distributed_executor_backend={backend!r} is not one of {list(DISTRIBUTED_EXECUTOR_BACKENDS)}"
            )
        if backend == "ray" and importlib.util.find_spec("ray") is None:  # found, not imported: the executor does
            raise ValueError(
                "distributed_executor_backend='ray' needs Ray: pip install 'hfbridge[ray]'; or use 'mp' "
                "(one machine) or 'external_launcher' (torchrun)"
            )
        if backend == "uni" and tp * pp > 1:
            raise ValueError(
                f"distributed_executor_backend='uni' runs one process; tensor_parallel_size={tp} x "
                f"pipeline_parallel_size={pp} needs 'mp'"
            )
        return ParallelConfig(tp, pp, backend)

    def _model_config(self, device: torch.device) -> ModelConfig:
        from hfbridge.model.hf_config import (
            generation_defaults,
            generation_eos_token_ids,
            load_hf_config,
            read_generation_config,
        )

        from hfbridge.model.default_model import DEFAULT_MODEL_NAME, default_model_path

        if self.model is None or (self.model == DEFAULT_MODEL_NAME and not os.path.exists(self.model)):
            model = default_model_path()  # the bundled model, also by the name it is served under
        else:
            model = str(self.model)
        if self.model_impl not in ("auto", "transformers", "native"):
            raise ValueError(
                f"model_impl={self.model_impl!r} is not supported; use 'auto', 'transformers' or 'native'"
            )
        if self.tokenizer_mode not in TOKENIZER_MODES:
            raise ValueError(f"tokenizer_mode={self.tokenizer_mode!r} is not supported; use one of {TOKENIZER_MODES}")
        source = resolve_model_source(model, revision=self.revision, hf_token=self.hf_token, gguf_file=self.gguf_file,
                                      download_dir=self.download_dir)
        if self.quantization not in (None, "gguf") or (self.quantization == "gguf" and source.gguf_file is None):
            raise ValueError(
                f"quantization={self.quantization!r} is not supported: hfbridge serves GGUF files quantized "
                "(quantization='gguf', implied by a .gguf model); other quantized checkpoints are not served yet"
            )
        hf_config = load_hf_config(source, self.trust_remote_code, self.revision, self.hf_overrides)
        if self.override_pooler_config is not None:
            logger.warning("override_pooler_config is deprecated; use pooler_config")
        st_config = read_sentence_transformers_config(source.folder)
        runner = resolve_runner(
            list(getattr(hf_config, "architectures", None) or []), st_config, hf_config, self.runner, self.convert,
            self.task, self.pooler_config if self.pooler_config is not None else self.override_pooler_config,
        )
        max_model_len = self.max_model_len
        if runner.runner == "pooling" and max_model_len is None and st_config and st_config.get("max_seq_length"):
            max_model_len = min(st_config["max_seq_length"], derived_max_model_len(hf_config) or 1 << 30)
        tokenizer_path = source.folder
        if self.tokenizer is not None:
            tokenizer_path = resolve_model_source(
                self.tokenizer, revision=self.tokenizer_revision, hf_token=self.hf_token, download_dir=self.download_dir
            ).folder
        served = self.served_model_name
        if isinstance(served, list):
            served = served[0] if served else None
        generation_config = read_generation_config(source.folder)
        defaults = {} if self.generation_config == "vllm" else generation_defaults(generation_config)
        defaults.update(self.override_generation_config or {})
        return ModelConfig(
            model=model,
            model_path=source.folder,
            tokenizer_path=tokenizer_path,
            gguf_file=source.gguf_file,
            hf_config=hf_config,
            dtype=_resolve_dtype(self.dtype, hf_config, device),
            max_model_len=_resolve_max_model_len(max_model_len, hf_config),
            trust_remote_code=self.trust_remote_code,
            revision=self.revision,
            seed=0 if self.seed is None else int(self.seed),
            model_impl=self.model_impl,
            skip_tokenizer_init=self.skip_tokenizer_init,
            served_model_name=served or model,
            max_logprobs=self.max_logprobs,
            chat_template=self.chat_template,
            reasoning_parser=self.reasoning_parser,
            tokenizer_mode=self.tokenizer_mode,
            default_sampling=defaults,
            generation_eos_token_ids=generation_eos_token_ids(generation_config),
            runner=runner.runner,
            convert=runner.convert,
            pooler_config=runner.pooler_config,
            enforce_eager=bool(self.enforce_eager),
        )

    def _cache_config(self, pooling: bool) -> CacheConfig:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} must be a power of two")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override={self.num_gpu_blocks_override} must be at least 1")
        return CacheConfig(
            block_size=self.block_size,
            # Pooling models keep no KV cache, so there is no prefix to reuse.
            enable_prefix_caching=not pooling and self.enable_prefix_caching is not False,
            num_gpu_blocks_override=self.num_gpu_blocks_override,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes or _kv_cache_space_from_env(),
        )

    def _scheduler_config(self, max_model_len: int, device: torch.device, pooling: bool) -> SchedulerConfig:
        on_gpu = device.type == "cuda"
        max_num_seqs = self.max_num_seqs or (256 if on_gpu else 128)
        max_tokens = self.max_num_batched_tokens or (8192 if on_gpu else 2048)
        chunked = True if self.enable_chunked_prefill is None else self.enable_chunked_prefill
        if pooling:
            # A pooled prompt must be seen whole in one step (no KV cache holds earlier chunks).
            if self.enable_chunked_prefill:
                logger.warning("Chunked prefill does not apply to pooling models and is turned off")
            chunked = False
            if self.max_num_batched_tokens is None:
                max_tokens = max(max_tokens, max_model_len)
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs} must be at least 1")
        if max_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={max_tokens} must be at least 1")
        if not chunked and max_tokens < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({max_tokens}) < max_model_len ({max_model_len}) with chunked prefill "
                "disabled: a long prompt could never be scheduled; raise max_num_batched_tokens or enable it"
            )
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling_policy={self.scheduling_policy!r} is not one of {', '.join(SCHEDULING_POLICIES)}"
            )
        return SchedulerConfig(max_tokens, max_num_seqs, max_model_len, chunked, self.scheduling_policy)


def _kv_cache_space_from_env() -> int | None:
    """vLLM-CPU's VLLM_CPU_KVCACHE_SPACE (whole GiB) as kv_cache_memory_bytes; the engine argument wins."""
    value = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
    if value == "":
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"VLLM_CPU_KVCACHE_SPACE={value!r} must be a whole number of GiB, at least 1 "
                         "(or use kv_cache_memory_bytes / --kv-cache-memory-bytes for another size)")
    return int(value) << 30


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str | torch.dtype, hf_config: Any, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        config_dtype = getattr(hf_config.get_text_config(), "dtype", None) or getattr(hf_config, "dtype", None)
        if isinstance(config_dtype, str):
            config_dtype = _DTYPES.get(config_dtype)
        sixteen_bit = config_dtype in (torch.float16, torch.bfloat16)
        if device.type == "cpu":
            # vLLM-CPU's rule: a 16-bit checkpoint runs in bfloat16 where the CPU has bfloat16 dot products;
            # everything else in float32, which a CPU without them runs fastest (and float16 has no kernels here).
            return torch.bfloat16 if sixteen_bit and native_bfloat16() else torch.float32
        if sixteen_bit:
            return config_dtype
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {['auto', *_DTYPES]}")
    return _DTYPES[dtype]


def derived_max_model_len(hf_config: Any) -> int | None:
    text_config = hf_config.get_text_config()
    for key in _MAX_LEN_KEYS:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _resolve_max_model_len(requested: int | str | None, hf_config: Any) -> int:
    derived = derived_max_model_len(hf_config)
    if requested in (None, -1, "auto"):
        if derived is None:
            logger.warning("The model config names no context length; using max_model_len=2048")
            return 2048
        return derived
    requested = int(requested)
    if requested < 1:
        raise ValueError(f"max_model_len={requested} must be at least 1")
    if derived is not None and requested > derived and not os.environ.get("HFBRIDGE_ALLOW_LONG_MAX_MODEL_LEN"):
        raise ValueError(
            f"max_model_len={requested} is larger than the model's context length {derived} "
            f"(from its config); use at most {derived}, or set HFBRIDGE_ALLOW_LONG_MAX_MODEL_LEN=1 if you know better"
        )
    return requested
