"""Executors own the model and its KV cache; the engine talks only to them."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch

from hfbridge.attention_backends import get_attention_backend
from hfbridge.config import EngineConfig
from hfbridge.kv_cache_sizing import allocate_kv_caches, determine_num_blocks, probe_attention_layers
from hfbridge.model_loader import load_model
from hfbridge.model_runner import ModelRunner
from hfbridge.pooler import build_pooler
from hfbridge.sampler import Sampler
from hfbridge.scheduler_output import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)


class Executor(Protocol):
    num_blocks: int

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    def apply_model(self, func: Callable[[torch.nn.Module], Any]) -> list[Any]: ...

    def shutdown(self) -> None: ...


class InProcessExecutor:
    """Runs the model in this process, on one device."""

    def __init__(self, config: EngineConfig):
        device = config.device
        model_config, scheduler_config = config.model_config, config.scheduler_config
        block_size = config.cache_config.block_size
        model = load_model(model_config, device)
        layers = probe_attention_layers(model, device)
        pooler = None
        if model_config.runner == "pooling":
            # Pooling needs no KV cache: every prompt runs whole in one step. Blocks are only counted, so the
            # scheduler's accounting works unchanged.
            self.num_blocks = scheduler_config.max_num_seqs * -(-scheduler_config.max_model_len // block_size)
            kv_caches: dict[int, torch.Tensor] = {}
            pooler = build_pooler(model, model_config.pooler_config, any(s.is_causal for s in layers.values()))
        else:
            self.num_blocks = determine_num_blocks(layers, config.cache_config, scheduler_config, device)
            kv_caches = allocate_kv_caches(layers, self.num_blocks, block_size, device)
            logger.info(
                "KV cache: %d blocks x %d tokens over %d layers (%d tokens)",
                self.num_blocks, block_size, len(kv_caches), self.num_blocks * block_size,
            )
        backend = get_attention_backend(config.attention_backend, device)
        generator = torch.Generator(device).manual_seed(model_config.seed)
        self.runner = ModelRunner(model, kv_caches, backend, block_size, device, Sampler(generator), pooler)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(scheduler_output)

    def apply_model(self, func: Callable[[torch.nn.Module], Any]) -> list[Any]:
        return [func(self.runner.model)]

    def shutdown(self) -> None:
        self.runner.kv_caches.clear()
