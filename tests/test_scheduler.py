"""Scheduling decisions without a model: token budget, chunked prefill, preemption, abort, no leaks."""
from hfbridge.config import SchedulerConfig
from hfbridge.core.kv_cache_manager import KVCacheManager
from hfbridge.core.request import Request, RequestStatus
from hfbridge.sample.sampling_params import SamplingParams
from hfbridge.core.scheduler import Scheduler
from hfbridge.core.scheduler_output import ModelRunnerOutput

BS = 4


def make_scheduler(num_blocks=32, budget=64, max_seqs=8, chunked=True, caching=True) -> Scheduler:
    kv = KVCacheManager(num_blocks, BS, caching)
    return Scheduler(SchedulerConfig(budget, max_seqs, 512, chunked), kv)


def run_step(scheduler: Scheduler, next_token: int = 7):
    """Execute a step with a fake model that samples `next_token` for every request that reached its end."""
    out = scheduler.schedule()
    sampled = {s.request.request_id: next_token for s in out.scheduled if s.produces_output}
    scheduler.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled))
    return out


def add(scheduler: Scheduler, request_id: str, num_tokens: int, offset: int = 0) -> Request:
    request = Request(request_id, list(range(offset, offset + num_tokens)), SamplingParams())
    scheduler.add_request(request)
    return request


def test_prefill_then_decode_one_token_per_step():
    s = make_scheduler()
    r = add(s, "a", 10)
    out = run_step(s)
    assert [(x.num_new_tokens, x.start) for x in out.scheduled] == [(10, 0)]
    assert r.num_computed_tokens == 10 and r.output_token_ids == [7]
    out = run_step(s)
    assert [(x.num_new_tokens, x.start) for x in out.scheduled] == [(1, 10)]


def test_budget_chunks_long_prefill_and_counts_decodes_first():
    s = make_scheduler(budget=8)
    a = add(s, "a", 5)
    run_step(s)  # a prefilled (5 tokens)
    b = add(s, "b", 20, offset=100)
    out = run_step(s)
    # a's decode (1 token) goes first, b gets the remaining 7 tokens of the budget
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 7)]
    assert not out.scheduled[1].produces_output and b.output_token_ids == []
    out = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 7)]
    out = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 6)]
    assert out.scheduled[1].produces_output and b.output_token_ids == [7]
    assert out.num_scheduled_tokens == 7 and a.num_output_tokens == 4


def test_no_chunking_waits_for_a_budget_that_fits():
    s = make_scheduler(budget=16, chunked=False)
    add(s, "a", 10)
    add(s, "b", 10, offset=50)
    out = run_step(s)
    assert [x.request.request_id for x in out.scheduled] == ["a"]


def test_max_num_seqs_caps_running_requests():
    s = make_scheduler(max_seqs=2)
    for i in range(4):
        add(s, str(i), 3, offset=10 * i)
    out = run_step(s)
    assert [x.request.request_id for x in out.scheduled] == ["0", "1"]
    assert s.num_waiting == 2


def test_preempts_newest_running_when_blocks_run_out_and_recomputes_it():
    s = make_scheduler(num_blocks=4, budget=64)
    a = add(s, "a", 4)  # 1 block, needs a 2nd at its first decode
    b = add(s, "b", 11, offset=100)  # 3 blocks
    run_step(s)
    assert s.kv_cache_manager.num_free_blocks == 0 and a.output_token_ids == [7] and b.output_token_ids == [7]
    out = run_step(s)  # a needs a block for token 5: b (newest) is preempted
    assert out.preempted_request_ids == ["b"] and b.status is RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert [x.request.request_id for x in out.scheduled] == ["a"]
    s.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    out = run_step(s)  # b comes back: its prompt and generated token are recomputed, minus cached full blocks
    assert [(x.request.request_id, x.start, x.num_new_tokens) for x in out.scheduled] == [("b", 8, 4)]
    assert b.output_token_ids == [7, 7]


def test_preempted_request_recomputes_everything_without_prefix_caching():
    s = make_scheduler(num_blocks=4, budget=64, caching=False)
    a = add(s, "a", 4)
    b = add(s, "b", 11, offset=100)
    run_step(s)
    run_step(s)
    s.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    out = run_step(s)
    assert [(x.request.request_id, x.start, x.num_new_tokens) for x in out.scheduled] == [("b", 0, 12)]
    assert b.num_preemptions == 1 and a.num_preemptions == 0


def test_preempting_itself_when_alone_does_not_loop():
    s = make_scheduler(num_blocks=2, budget=64)
    a = add(s, "a", 8)
    run_step(s)
    out = run_step(s)  # a needs a 3rd block; nobody else to evict: a is preempted
    assert out.preempted_request_ids == ["a"] and out.scheduled == []
    assert a.status is RequestStatus.PREEMPTED and s.kv_cache_manager.num_free_blocks == 2


def test_abort_and_finish_free_every_block():
    s = make_scheduler(num_blocks=16, caching=False)
    reqs = [add(s, str(i), 6, offset=10 * i) for i in range(3)]
    run_step(s)
    add(s, "waiting", 3)
    s.finish_requests(["0"], RequestStatus.FINISHED_ABORTED)
    s.finish_requests(["waiting"], RequestStatus.FINISHED_ABORTED)
    assert reqs[0].status is RequestStatus.FINISHED_ABORTED
    s.finish_requests(["1", "2"], RequestStatus.FINISHED_STOPPED)
    assert s.kv_cache_manager.num_free_blocks == 16 and not s.has_unfinished_requests()


def test_prefix_hit_is_counted_as_computed():
    s = make_scheduler()
    add(s, "a", 13)
    run_step(s)
    b = add(s, "b", 13)  # same tokens: 3 full blocks hit, last token never a hit
    out = run_step(s)
    item = next(x for x in out.scheduled if x.request is b)
    assert (item.start, item.num_new_tokens) == (12, 1) and b.num_cached_tokens == 12


def test_prefix_lookup_is_counted_once_per_admitted_request():
    s = make_scheduler(num_blocks=5)
    add(s, "a", 16)  # 4 blocks
    run_step(s)
    b = add(s, "b", 9, offset=100)  # needs 3 blocks, 1 free: waits while a runs
    for _ in range(3):
        run_step(s)
    assert b.status is RequestStatus.WAITING and s.kv_cache_manager.stats.queried_tokens == 16
    s.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    run_step(s)
    assert b.status is RequestStatus.RUNNING and s.kv_cache_manager.stats.queried_tokens == 16 + 9



def make_priority_scheduler(num_blocks=32, budget=64, max_seqs=8) -> Scheduler:
    return Scheduler(SchedulerConfig(budget, max_seqs, 512, True, "priority"), KVCacheManager(num_blocks, BS, True))


def add_with(scheduler: Scheduler, request_id: str, num_tokens: int, priority: int, arrival: float) -> Request:
    request = Request(request_id, list(range(num_tokens)), SamplingParams(), arrival_time=arrival, priority=priority)
    scheduler.add_request(request)
    return request


def test_priority_policy_admits_the_lowest_priority_value_first_then_by_arrival():
    """vLLM's order: (priority, arrival time); one sequence slot, so admission order is the whole story."""
    s = make_priority_scheduler(max_seqs=1)
    add_with(s, "late-urgent", 4, priority=-1, arrival=3.0)
    add_with(s, "first-normal", 4, priority=0, arrival=1.0)
    add_with(s, "low", 4, priority=5, arrival=0.0)
    add_with(s, "second-normal", 4, priority=0, arrival=2.0)
    order = []
    while s.has_unfinished_requests():
        out = run_step(s)
        for item in out.scheduled:
            if item.start == 0:
                order.append(item.request.request_id)
        s.finish_requests([r.request_id for r in list(s.running)], RequestStatus.FINISHED_STOPPED)
    assert order == ["late-urgent", "first-normal", "second-normal", "low"]


def test_priority_policy_preempts_the_least_urgent_even_if_scheduled_first():
    """Blocks run out while decoding: the running request with the highest (priority, arrival) goes back to the
    queue, even when it was scheduled earlier in the same step (its tokens and blocks are taken back)."""
    s = make_priority_scheduler(num_blocks=3, budget=64)
    low = add_with(s, "low", 1, priority=9, arrival=0.0)
    run_step(s)  # low runs first: first in the running list
    high = add_with(s, "high", 8, priority=0, arrival=1.0)
    run_step(s)  # high's prompt fills two blocks; low holds the third
    out = run_step(s)  # high's ninth token needs a block: low, scheduled before it in this step, is taken back
    assert out.preempted_request_ids == ["low"]
    assert [(item.request.request_id, item.start) for item in out.scheduled] == [("high", 8)]
    assert out.num_scheduled_tokens == 1
    assert low.status is RequestStatus.PREEMPTED and low.num_computed_tokens == 0
    assert s.kv_cache_manager.get_block_ids("low") == [] and high.status is RequestStatus.RUNNING


def test_cache_salt_separates_prefix_cache_entries():
    """A salted request hits only blocks written under the same salt (vLLM: the salt seeds the first block's hash)."""
    s = make_scheduler()
    prompt = list(range(13))  # three full blocks, one partial

    def admit(request_id: str, salt):
        request = Request(request_id, prompt, SamplingParams(), cache_salt=salt)
        s.add_request(request)
        run_step(s)
        s.finish_requests([request_id], RequestStatus.FINISHED_STOPPED)
        return request.num_cached_tokens

    assert admit("tenant-a", "a") == 0
    assert admit("tenant-b", "b") == 0  # same tokens, another salt: no hit
    assert admit("unsalted", None) == 0
    assert admit("tenant-a-again", "a") == 12  # three full blocks of the same salt
    assert admit("unsalted-again", None) == 12


def test_max_loras_holds_requests_of_other_adapters_until_a_slot_frees():
    """vLLM's rule: with max_loras adapters running, a request under another adapter waits (keeping its place);
    base-model requests and requests of running adapters pass it."""
    from hfbridge.lora.request import LoRARequest

    s = Scheduler(SchedulerConfig(64, 8, 512, True), KVCacheManager(32, BS), max_loras=1)
    sql, chat = LoRARequest("sql", 1, "/a/sql"), LoRARequest("chat", 2, "/a/chat")
    requests = {}
    for request_id, lora in (("a", sql), ("b", chat), ("c", None), ("d", sql)):
        requests[request_id] = Request(request_id, [1, 2, 3], SamplingParams(max_tokens=2), lora_request=lora)
        s.add_request(requests[request_id])
    out = run_step(s)
    assert [x.request.request_id for x in out.scheduled] == ["c", "a", "d"]  # rows grouped by adapter
    assert [r.request_id for r in s.waiting] == ["b"]
    s.finish_requests(["a", "d"], RequestStatus.FINISHED_STOPPED)
    out = run_step(s)
    assert [x.request.request_id for x in out.scheduled] == ["c", "b"]
