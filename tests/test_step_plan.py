"""The deltas a multi-process engine sends its ranks (step_plan.py) rebuild exactly the step the scheduler made:
through chunked prefill, decode, preemption (the rank forgets, then relearns the request) and finished requests."""
import random

import torch

from hfbridge.config import SchedulerConfig
from hfbridge.core.kv_cache_manager import KVCacheManager
from hfbridge.core.request import Request, RequestStatus
from hfbridge.core.scheduler import Scheduler
from hfbridge.core.scheduler_output import ModelRunnerOutput
from hfbridge.sample.sampling_params import SamplingParams
from hfbridge.worker.step_inputs import prepare_inputs
from hfbridge.worker.step_plan import RankRequests, StepPlanner, reply_for


def test_ranks_rebuild_every_step_through_preemption_and_finishing():
    rng = random.Random(0)
    # 12 blocks of 4 tokens for up to 6 requests of 6-17 prompt tokens and 12 new ones: preemptions are certain
    scheduler = Scheduler(SchedulerConfig(24, 6, 64, True), KVCacheManager(12, 4, True))
    for i in range(6):
        params = SamplingParams(max_tokens=12, prompt_logprobs=1 if i == 2 else None)
        scheduler.add_request(Request(str(i), [rng.randrange(5, 90) for _ in range(rng.randrange(6, 18))], params))
    planner, rank = StepPlanner(), RankRequests()
    steps = preempted = 0
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        preempted += len(output.preempted_request_ids)
        plan = planner.plan(output, [])
        rebuilt = rank.apply(plan)
        assert [(s.request.request_id, s.request.all_token_ids[: s.end], s.block_ids, s.start, s.num_new_tokens,
                 s.produces_output) for s in rebuilt] == \
               [(s.request.request_id, s.request.all_token_ids[: s.end], s.block_ids, s.start, s.num_new_tokens,
                 s.produces_output) for s in output.scheduled]
        ours, theirs = (prepare_inputs(x, 4, torch.device("cpu")) for x in (rebuilt, output.scheduled))
        assert torch.equal(ours.input_ids, theirs.input_ids) and torch.equal(ours.logits_indices, theirs.logits_indices)
        assert ours.prompt_logprob_rows == theirs.prompt_logprob_rows
        # a request already on the rank costs only its new tokens
        for delta, item in zip(plan.deltas, output.scheduled):
            if delta.new is None:
                assert len(delta.new_token_ids) <= item.num_new_tokens
        sampled = {s.request.request_id: rng.randrange(5, 90) for s in output.scheduled if s.produces_output}
        for request in scheduler.update_from_output(output, ModelRunnerOutput(sampled_token_ids=sampled)):
            if request.num_output_tokens >= 12:
                scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_LENGTH_CAPPED)
        steps += 1
    assert preempted > 0, "the workload must preempt for this test to mean anything"
    assert len(rank) > 0  # the last step's requests finished on the driver after the ranks ran it
    assert rank.apply(planner.plan(scheduler.schedule(), [])) == [] and len(rank) == 0  # the next step forgets them


def test_the_reply_keeps_full_rows_and_reduces_argmax_rows_to_their_token():
    logits = torch.randn(5, 11)  # 2 prompt-logprob rows, then 3 sampled rows
    reply = reply_for(logits, 3, [0, 2])
    assert reply.argmax_tokens == [int(logits[2].argmax()), int(logits[4].argmax())]
    assert torch.equal(reply.logits, logits[[0, 1, 3]])
