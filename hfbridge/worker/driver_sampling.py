"""The driver's half of a step for executors whose ranks live in other processes (mp, ray).

The ranks run the sharded forward; rank 0 returns the gathered logits [N, V]; the driver samples them here, where
one process would, so seeded generators (made by the engine for config.device) live in one place."""
from __future__ import annotations

from typing import Any

import torch

from hfbridge.config import EngineConfig
from hfbridge.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from hfbridge.sample.sampler import Sampler
from hfbridge.worker.model_runner import sample_step, sampling_rows
from hfbridge.worker.step_inputs import prepare_inputs


class DriverSampler:
    def __init__(self, config: EngineConfig):
        self.device = config.device
        self.block_size = config.cache_config.block_size
        self.is_generation = config.model_config.runner == "generate"
        self.sampler = Sampler(torch.Generator(config.device).manual_seed(config.model_config.seed))

    def finish(self, scheduler_output: SchedulerOutput, reply: Any) -> ModelRunnerOutput:
        """Rank 0's reply -> the step's output: sampled tokens (generate), or the pooled outputs unchanged."""
        if not self.is_generation:
            return reply
        step = prepare_inputs(scheduler_output.scheduled, self.block_size, self.device)
        return sample_step(self.sampler, reply.to(self.device), step,
                           sampling_rows(step, scheduler_output.grammar_bitmask))
