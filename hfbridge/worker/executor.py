"""Executors own the model and its KV cache; the engine talks only to them."""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from hfbridge.attention_backends import get_attention_backend
from hfbridge.compilation import BackgroundCompile
from hfbridge.worker.step_plan import RankRequests
from hfbridge.config import EngineConfig
from hfbridge.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from hfbridge.lora.manager import LoRAManager
from hfbridge.lora.request import LoRARequest
from hfbridge.multimodal.embeddings import ImageEmbedder
from hfbridge.model.model_loader import load_model
from hfbridge.parallel.state import (destroy_distributed, get_pp_group, get_tp_group, init_from_torchrun_env,
                                     world_min_int)
from hfbridge.pooling.pooler import build_pooler
from hfbridge.sample.sampler import Sampler
from hfbridge.worker.kv_cache_sizing import allocate_kv_caches, determine_num_blocks
from hfbridge.worker.layer_probe import LayerSpec, probe_attention_layers
from hfbridge.worker.model_runner import ModelRunner, PoolingModelRunner
from hfbridge.worker.page_prefault import BackgroundPrefault
from hfbridge.worker.profile_run import run_profile_step

logger = logging.getLogger(__name__)


class Executor(Protocol):
    num_blocks: int

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    def apply_model(self, func: Callable[[torch.nn.Module], Any]) -> list[Any]: ...

    def shutdown(self) -> None: ...


class InProcessExecutor:
    """Runs the model in this process, on one device: load, probe its attention layers, size and allocate the
    KV cache, then build the runner for the config's runner kind."""

    kv_prefault: BackgroundPrefault | None = None  # a CPU KV cache's pages being faulted in
    compiling: tuple[BackgroundCompile, ...] = ()  # the torch.compile warm-ups started, running or ended
    # A rank of a multi-process engine: its copies of the running requests (step_plan.py)
    rank_requests: RankRequests

    def __init__(self, config: EngineConfig):
        if config.parallel_config.distributed_executor_backend == "external_launcher":
            # Every torchrun rank runs this whole engine: same schedule, same gathered logits, same samples.
            if config.device.type == "cuda":  # one device per rank of this node
                config = dataclasses.replace(config, device=torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
                torch.cuda.set_device(config.device)
            parallel = config.parallel_config
            init_from_torchrun_env(parallel.tensor_parallel_size, config.device, parallel.pipeline_parallel_size)
            # Scripts rarely destroy the process group; torch asks for it before exit (NCCL warns otherwise). It does
            # not stop gloo's worker threads: their abort in interpreter teardown is prevented where the
            # collectives run (parallel/state.py, _blocking).
            atexit.register(destroy_distributed)
        self.config = config
        self.rank_requests = RankRequests()
        model = load_model(config.model_config, config.device)
        layers = probe_attention_layers(model, config.device)
        if config.model_config.runner == "pooling":
            self.runner = self._pooling_runner(model, layers)
        else:
            self.runner = self._generation_runner(model, layers)

    def _generation_runner(self, model: nn.Module, layers: dict[int, LayerSpec]) -> ModelRunner:
        config, device = self.config, self.config.device
        block_size = config.cache_config.block_size
        sampler = Sampler(torch.Generator(device).manual_seed(config.model_config.seed))
        profile = None
        if device.type == "cuda":  # CPU budgets come from kv_cache_memory_bytes / free RAM, not a profile
            profile = functools.partial(run_profile_step, model, config.scheduler_config, sampler, device)
        # Ranks size their caches (of their own stage's layers) from their own free memory; all must agree on one
        # block count, since one scheduler hands out the blocks of every stage.
        self.num_blocks = world_min_int(
            determine_num_blocks(layers, config.cache_config, config.scheduler_config, device, profile)
        )
        kv_caches = allocate_kv_caches(layers, self.num_blocks, block_size, device)
        if device.type == "cpu":  # resident before the steps write it, without holding up start-up
            self.kv_prefault = BackgroundPrefault(list(kv_caches.values()))
        logger.info(
            "Stage %d, TP rank %d/%d KV cache: %d blocks x %d tokens over %d layers (%d tokens)",
            get_pp_group().stage, get_tp_group().rank, get_tp_group().size, self.num_blocks, block_size,
            len(kv_caches), self.num_blocks * block_size,
        )
        sampler.generator.manual_seed(config.model_config.seed)  # the profile step drew from it
        backend = get_attention_backend(config.attention_backend, device)
        shapes = _decode_head_shapes(config.model_config.hf_text_config, layers)
        sampler.build_kernels(device)
        if hasattr(backend, "build_kernels"):
            backend.build_kernels(shapes, device)
        lora = None
        if config.lora_config is not None:
            lora = LoRAManager(model, config.lora_config, config.model_config.dtype, device)
            if hasattr(model, "compile_regions") and not config.model_config.enforce_eager:
                logger.info("LoRA enabled: the native decoder runs eagerly (no background torch.compile)")
        if not config.model_config.enforce_eager:
            # Started last, once the model is loaded, probed and has its cache: compile threads hold the GIL for
            # seconds at a time, and every step until ready would wait on them.
            if hasattr(model, "compile_regions") and lora is None:  # the native decoders; LoRA layers run eager
                model.compile_regions(background=True)
            if hasattr(backend, "enable_compiled_decode"):
                if shapes:
                    backend.enable_compiled_decode(shapes, device)
        images = None
        if config.multimodal_config is not None:
            images = ImageEmbedder(model, config.multimodal_config.encoder_cache_rows)
        runner = ModelRunner(model, kv_caches, backend, block_size, device, sampler, lora, images)
        self.compiling = self._background_compiles(runner)
        return runner

    def _pooling_runner(self, model: nn.Module, layers: dict[int, LayerSpec]) -> PoolingModelRunner:
        # Pooling needs no KV cache: every prompt runs whole in one step. Blocks are only counted, so the
        # scheduler's accounting works unchanged.
        config, device = self.config, self.config.device
        block_size, scheduler_config = config.cache_config.block_size, config.scheduler_config
        self.num_blocks = scheduler_config.max_num_seqs * -(-scheduler_config.max_model_len // block_size)
        pooler = build_pooler(model, config.model_config.pooler_config, any(s.is_causal for s in layers.values()))
        backend = get_attention_backend(config.attention_backend, device)
        return PoolingModelRunner(model, backend, block_size, device, pooler)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        for compiling in self.compiling:  # a background compile waits while requests run
            compiling.hold_for_step()
        return self.runner.execute(scheduler_output)

    def apply_model(self, func: Callable[[torch.nn.Module], Any]) -> list[Any]:
        model = self.runner.model
        plain = getattr(model, "plain_weights", None)  # a native model keeps only its panels between calls
        with plain() if plain is not None else contextlib.nullcontext():
            return [func(model)]

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load and check an adapter (LoRAAdapterError, a ValueError, when it cannot be served); False if loaded."""
        return self._lora_manager().add_adapter(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self._lora_manager().remove_adapter(lora_int_id)

    def _lora_manager(self) -> LoRAManager:
        lora = getattr(self.runner, "lora", None)
        if lora is None:
            raise ValueError("LoRA is not enabled: start the engine with enable_lora=True (--enable-lora)")
        return lora

    def background_compiles(self) -> tuple[BackgroundCompile, ...]:
        """The torch.compile warm-ups this executor started (enforce_eager=False), running or ended."""
        return self.compiling

    @staticmethod
    def _background_compiles(runner: ModelRunner) -> tuple[BackgroundCompile, ...]:
        model, backend = runner.model, runner.backend
        found = (getattr(model, "compiled", None), getattr(model, "decode_graph", None),
                 getattr(backend, "compiled_decode", None))
        return tuple(c for c in found if c is not None)

    def shutdown(self) -> None:
        for compiling in self.background_compiles():
            compiling.stop()
        if self.kv_prefault is not None:
            self.kv_prefault.stop()
        self.runner.kv_caches.clear()


def _decode_head_shapes(text_config, layers: dict[int, LayerSpec]) -> list[tuple[int, int, int, torch.dtype]]:
    """Distinct (query heads, KV heads, head dim, dtype) of the cached layers, for the compiled decode's warm-up;
    empty when the config does not say how many query heads share a KV head."""
    heads = getattr(text_config, "num_attention_heads", None)
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or heads % kv_heads:
        return []
    group = heads // kv_heads
    return sorted({(s.num_kv_heads * group, s.num_kv_heads, s.head_dim, s.dtype) for s in layers.values()},
                  key=str)
