"""The driver's half of a step for executors whose ranks live in other processes (mp, ray).

The driver sends each step as per-request deltas (step_plan.py); the ranks run the sharded forward; the output rank
returns the logits rows the sampler needs and the argmax of the others; the driver samples here, where one process
would, so seeded generators (made by the engine for config.device) and grammar matchers live in one place."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from hfbridge.config import EngineConfig
from hfbridge.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from hfbridge.sample.sampler import Sampler, argmax_only
from hfbridge.worker.model_runner import sample_step, sampling_rows
from hfbridge.worker.step_inputs import prepare_inputs, samples
from hfbridge.worker.step_plan import StepLogits, StepPlan, StepPlanner


class DriverSampler:
    def __init__(self, config: EngineConfig):
        self.device = config.device
        self.block_size = config.cache_config.block_size
        self.is_generation = config.model_config.runner == "generate"
        self.sampler = Sampler(torch.Generator(config.device).manual_seed(config.model_config.seed))
        self.planner = StepPlanner()

    def message(self, scheduler_output: SchedulerOutput) -> StepPlan | SchedulerOutput:
        """What the ranks get for this step: the generation deltas, or (pooling: each request runs once, whole)
        the scheduler output without what only the driver uses."""
        if not self.is_generation:
            return dataclasses.replace(scheduler_output, grammar_bitmask=None)
        sampled = [item for item in scheduler_output.scheduled if samples(item)]  # StepInputs.sample_requests
        rows = sampling_rows(sampled, scheduler_output.grammar_bitmask)
        return self.planner.plan(scheduler_output, [i for i, row in enumerate(rows) if argmax_only(row)])

    def finish(self, scheduler_output: SchedulerOutput, plan: Any, reply: Any) -> ModelRunnerOutput:
        """The output rank's reply -> the step's output: sampled tokens (generate), or the pooled outputs unchanged."""
        if not self.is_generation:
            return reply
        assert isinstance(reply, StepLogits) and isinstance(plan, StepPlan)
        step = prepare_inputs(scheduler_output.scheduled, self.block_size, self.device)
        rows = sampling_rows(step.sample_requests, scheduler_output.grammar_bitmask)
        fast = set(plan.argmax_rows)
        slow = [i for i in range(len(rows)) if i not in fast]
        sub_step = dataclasses.replace(step, sample_requests=[step.sample_requests[i] for i in slow])
        output = sample_step(self.sampler, reply.logits.to(self.device), sub_step, [rows[i] for i in slow])
        for i, token in zip(plan.argmax_rows, reply.argmax_tokens):
            output.sampled_token_ids[step.sample_requests[i].request.request_id] = token
        return output

