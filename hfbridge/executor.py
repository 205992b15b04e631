"""Executors own the model and its KV cache; the engine talks only to them."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch

from hfbridge.attention_backends import get_attention_backend
from hfbridge.config import EngineConfig
from hfbridge.kv_cache_sizing import allocate_kv_caches, determine_num_blocks, probe_attention_layers
from hfbridge.model_loader import load_causal_lm
from hfbridge.model_runner import ModelRunner
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
        model = load_causal_lm(config.model_config, device)
        layers = probe_attention_layers(model, device)
        block_size = config.cache_config.block_size
        self.num_blocks = determine_num_blocks(layers, config.cache_config, config.scheduler_config, device)
        kv_caches = allocate_kv_caches(layers, self.num_blocks, block_size, device)
        logger.info(
            "KV cache: %d blocks x %d tokens over %d layers (%d tokens)",
            self.num_blocks, block_size, len(kv_caches), self.num_blocks * block_size,
        )
        backend = get_attention_backend(config.attention_backend, device)
        generator = torch.Generator(device).manual_seed(config.model_config.seed)
        self.runner = ModelRunner(model, kv_caches, backend, block_size, device, Sampler(generator))

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(scheduler_output)

    def apply_model(self, func: Callable[[torch.nn.Module], Any]) -> list[Any]:
        return [func(self.runner.model)]

    def shutdown(self) -> None:
        self.runner.kv_caches.clear()
