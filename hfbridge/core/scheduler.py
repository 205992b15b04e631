"""Scheduling under a token budget; one loop over num_computed_tokens covers prefill, chunked prefill, decode
and prefix-cache hits. When blocks run out a running request is preempted and recomputed later: the newest
(policy fcfs) or the one with the highest (priority, arrival time) (policy priority, vLLM's rule)."""
from __future__ import annotations

import time

from hfbridge.config import SchedulerConfig
from hfbridge.core.kv_cache_manager import KVCacheManager
from hfbridge.core.request import Request, RequestStatus
from hfbridge.core.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from hfbridge.core.waiting_queue import WAITING_QUEUES


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager, max_loras: int = 0,
                 max_encoder_rows: int = 0):
        self.config = config
        self.max_loras = max_loras  # enable_lora: distinct adapters the running batch may hold (0: LoRA off)
        # a vision-language model: the image embedding rows one step may encode (vLLM's
        # max_num_encoder_input_tokens), so one request with many images cannot stall everyone's decode
        self.max_encoder_rows = max_encoder_rows
        self._encoder_budget = max_encoder_rows  # what is left of it in the step being scheduled
        self.kv_cache_manager = kv_cache_manager
        self.requests: dict[str, Request] = {}
        self.waiting = WAITING_QUEUES[config.policy]()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        self.kv_cache_manager.begin_step()
        budget = self.config.max_num_batched_tokens
        self._encoder_budget = self.max_encoder_rows
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        # 1. Running requests keep going first, in arrival order.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            num_new = self._fit_encoder(request, request.num_computed_tokens, num_new)
            if num_new <= 0:
                i += 1
                continue
            blocks = self.kv_cache_manager.allocate_slots(request, num_new)
            while blocks is None:
                victim_index = self._victim_index()
                victim = self.running.pop(victim_index)
                if victim_index < i:  # scheduled earlier in this step: take its tokens back
                    item = next(s for s in scheduled if s.request is victim)
                    scheduled.remove(item)
                    budget += item.num_new_tokens
                    self.kv_cache_manager.uncache_step_blocks(victim)
                    i -= 1
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
                blocks = self.kv_cache_manager.allocate_slots(request, num_new)
            if blocks is None:
                break
            scheduled.append(_scheduled(request, num_new, request.num_computed_tokens, blocks))
            budget -= num_new
            i += 1

        # 2. Waiting requests, in order, while budget, sequence slots and blocks last (none after a preemption).
        # vLLM's LoRA rule: with max_loras adapters running, a request under another adapter is passed over (it
        # keeps its place) until one of them finishes.
        running_loras = {r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}
        passed_over: list[Request] = []
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            lora = request.lora_request
            if lora is not None and lora.lora_int_id not in running_loras and len(running_loras) >= self.max_loras:
                passed_over.append(self.waiting.pop())
                continue
            hits, num_hit_tokens = self.kv_cache_manager.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit_tokens
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            num_new = self._fit_encoder(request, num_hit_tokens, num_new)
            if num_new <= 0:
                break
            blocks = self.kv_cache_manager.allocate_slots(request, num_new, hits)
            if blocks is None:
                break
            self.waiting.pop()
            self.kv_cache_manager.record_lookup(request, num_hit_tokens)
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(_scheduled(request, num_new, num_hit_tokens, blocks))
            budget -= num_new
            if lora is not None:
                running_loras.add(lora.lora_int_id)
        for request in reversed(passed_over):  # back where they were, first in turn
            self.waiting.appendleft(request)

        if self.max_loras:  # each adapter's rows contiguous in the step: one range per adapter for the LoRA layers
            scheduled.sort(key=lambda s: 0 if s.request.lora_request is None else s.request.lora_request.lora_int_id)
        num_tokens = self.config.max_num_batched_tokens - budget
        return SchedulerOutput(scheduled, num_tokens, preempted)

    def _fit_encoder(self, request: Request, start: int, num_new: int) -> int:
        """The chunk's length within the step's encoder budget: a chunk that reaches a request's first image
        placeholder runs the encoder over all its images (their rows count against the budget); past the budget,
        the chunk stops before the images (0: the request waits for the next step). The step's first encoder work
        always runs, so a request with more rows than the budget still makes progress. A chunk never ends inside an
        image whose tokens attend to each other both ways (Gemma 3): it stops before that image instead."""
        images = request.mm_inputs
        if images is None:
            return num_new
        cut = images.block_cut(start, start + num_new)
        if cut is not None:  # an image whose tokens attend both ways runs in one chunk: stop before it
            num_new = cut[0] - start if cut[0] > start else 0
        if not start <= images.first_position < start + num_new:
            return num_new
        rows = len(images.positions)
        if rows <= self._encoder_budget or self._encoder_budget == self.max_encoder_rows:
            self._encoder_budget -= min(rows, self._encoder_budget)
            return num_new
        return images.first_position - start

    def _victim_index(self) -> int:
        if self.config.policy == "priority":
            return max(range(len(self.running)), key=lambda k: (self.running[k].priority, self.running[k].arrival_time))
        return len(self.running) - 1

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update_from_output(self, output: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[Request]:
        """Advance computed counts and append sampled tokens; returns the requests that got a new token."""
        advanced = []
        for item in output.scheduled:
            request = item.request
            if request.status is not RequestStatus.RUNNING:  # aborted while the step ran
                continue
            request.num_computed_tokens = item.end
            token = runner_output.sampled_token_ids.get(request.request_id)
            if token is not None:
                request.append_output_token(token)
                advanced.append(request)
        return advanced

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """Finish (or abort) requests: their blocks are freed at once. Linear in the number of requests (an
        abort of a request with thousands of samples finishes them all in one call)."""
        finished = [r for request_id in request_ids if (r := self.requests.pop(request_id, None)) is not None]
        if not finished:
            return
        running = {id(r) for r in finished if r.status is RequestStatus.RUNNING}
        if running:
            self.running = [r for r in self.running if id(r) not in running]
        self.waiting.remove_many([r for r in finished if r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)])
        for request in finished:
            request.status = status
            self.kv_cache_manager.free(request)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)


def _scheduled(request: Request, num_new: int, start: int, blocks) -> ScheduledRequest:
    return ScheduledRequest(
        request, num_new, start, [b.block_id for b in blocks], produces_output=start + num_new == request.num_tokens
    )
