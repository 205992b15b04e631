"""LLMEngine: requests in, RequestOutputs out, one `step()` at a time (the server drives it too)."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from hfbridge.config import EngineConfig
from hfbridge.engine_args import EngineArgs
from hfbridge.executor import Executor, InProcessExecutor
from hfbridge.input_processor import process_prompt
from hfbridge.kv_cache_manager import KVCacheManager
from hfbridge.output_processor import OutputProcessor
from hfbridge.outputs import RequestOutput
from hfbridge.request import Request, RequestStatus
from hfbridge.sampling_params import SamplingParams
from hfbridge.scheduler import Scheduler
from hfbridge.tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_finished: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None):
        self.config = config
        self.model_config = config.model_config
        self.tokenizer = load_tokenizer(self.model_config)
        self.executor = executor or InProcessExecutor(config)
        self.kv_cache_manager = KVCacheManager(
            self.executor.num_blocks, config.cache_config.block_size, config.cache_config.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler_config, self.kv_cache_manager)
        self.output_processor = OutputProcessor(self.tokenizer, config.scheduler_config.max_model_len)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.model_config)
        self.vocab_size = int(self.model_config.hf_text_config.vocab_size)
        self.stats = EngineStats()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLMEngine:
        return cls(engine_args.create_engine_config())

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.model_config.default_sampling)

    def add_request(
        self,
        request_id: str,
        prompt: Any,
        params: SamplingParams,
        arrival_time: float | None = None,
        add_special_tokens: bool = True,
    ) -> None:
        if self.output_processor.has_request(request_id) or request_id in self.output_processor.parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params.verify_for_vocab(self.vocab_size, self.model_config.max_logprobs)
        processed = process_prompt(
            prompt, self.tokenizer, self.vocab_size, self.config.scheduler_config.max_model_len,
            params.truncate_prompt_tokens, add_special_tokens,
        )
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        for index in range(params.n):
            child_params = params.clone()
            child_params.eos_token_ids = self.eos_token_ids
            if params.n > 1:
                child_params.n = 1
                if params.seed is not None:
                    child_params.seed = params.seed + index
            child_id = request_id if params.n == 1 else f"{index}_{request_id}"
            generator = None
            if child_params.seed is not None:
                generator = torch.Generator(self.config.device).manual_seed(child_params.seed)
            request = Request(child_id, processed.prompt_token_ids, child_params, arrival_time, generator)
            self.output_processor.add_request(request, request_id, index, params.n, processed.prompt)
            self.scheduler.add_request(request)
        self.stats.num_prompt_tokens += len(processed.prompt_token_ids)

    def abort_request(self, request_ids: str | Iterable[str]) -> list[RequestOutput]:
        """Abort requests (by the id they were added with); their KV blocks are freed at once."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        child_ids = [c for request_id in ids for c in (self.output_processor.child_ids(request_id) or [request_id])]
        self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)
        return self.output_processor.abort(child_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.num_running + self.scheduler.num_waiting

    def step(self) -> list[RequestOutput]:
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return []
        runner_output = self.executor.execute(scheduler_output)
        advanced = self.scheduler.update_from_output(scheduler_output, runner_output)
        outputs, finished = self.output_processor.process(advanced, runner_output)
        for request_id, status in finished.items():
            self.scheduler.finish_requests([request_id], status)
        self.stats.num_generation_tokens += len(advanced)
        self.stats.num_finished += len(finished)
        return outputs

    def apply_model(self, func) -> list[Any]:
        return self.executor.apply_model(func)

    def shutdown(self) -> None:
        self.executor.shutdown()
