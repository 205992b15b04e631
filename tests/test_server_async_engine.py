"""AsyncLLMEngine: concurrent requests from an event loop equal the synchronous engine's results, aborts
free blocks, bad input surfaces at add time, shutdown ends pending requests, and an idle engine sleeps."""
import asyncio
import time

import pytest
import pytest_asyncio
from server_utils import engine_factory

from hfbridge import SamplingParams
from hfbridge.engine.async_engine import AsyncLLMEngine, EngineDeadError
from hfbridge.errors import ValidationError
from hfbridge.sample.sampling_params import RequestOutputKind

pytestmark = pytest.mark.asyncio
PROMPTS = ["The capital of France is", "Once upon a time", "A quick brown fox", "Serving language models"]


def delta_params(**kwargs):
    params = SamplingParams(temperature=0, **kwargs)
    params.output_kind = RequestOutputKind.DELTA
    return params


@pytest_asyncio.fixture
async def engine(tiny_llama):
    async_engine = AsyncLLMEngine(engine_factory(tiny_llama[1])())
    async_engine.start()
    yield async_engine
    await async_engine.shutdown()


async def collect(engine, request_id, prompt, params):
    token_ids = []
    async for output in engine.generate(request_id, prompt, params):
        token_ids += output.outputs[0].token_ids
    return token_ids


async def test_concurrent_requests_equal_the_synchronous_engine(engine, tiny_llama):
    results = await asyncio.gather(*(collect(engine, f"r{i}", p, delta_params(max_tokens=10))
                                     for i, p in enumerate(PROMPTS)))
    sync_engine = engine_factory(tiny_llama[1])()
    for i, prompt in enumerate(PROMPTS):
        params = SamplingParams(temperature=0, max_tokens=10)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        sync_engine.add_request(str(i), prompt, params)
    expected = {}
    while sync_engine.has_unfinished_requests():
        for out in sync_engine.step():
            expected[out.request_id] = out.outputs[0].token_ids
    assert results == [expected[str(i)] for i in range(len(PROMPTS))]


async def test_bad_input_raises_at_add_time(engine):
    with pytest.raises(ValidationError, match="Requested sample logprobs of 99"):
        await engine.add_request("bad", "hello", delta_params(max_tokens=2, logprobs=99))
    with pytest.raises(ValidationError, match="cannot be empty"):
        await engine.add_request("empty", "", delta_params(max_tokens=2))
    assert await collect(engine, "good", "hello", delta_params(max_tokens=2))


async def test_abort_and_early_exit_free_blocks(engine):
    kv = engine.engine.kv_cache_manager
    free_before = kv.num_free_blocks
    stream = await engine.add_request("a", PROMPTS[0], delta_params(max_tokens=100, ignore_eos=True))
    async for _ in stream:
        break
    engine.abort("a")
    async for _ in engine.generate("b", PROMPTS[1], delta_params(max_tokens=100, ignore_eos=True)):
        break  # leaving the generator aborts the request
    for _ in range(500):
        if not engine.engine.has_unfinished_requests():
            break
        await asyncio.sleep(0.01)
    assert kv.num_free_blocks == free_before
    engine.abort("never-added")  # harmless


async def test_shutdown_ends_pending_requests(tiny_llama):
    engine = AsyncLLMEngine(engine_factory(tiny_llama[1])())
    engine.start()
    stream = await engine.add_request("long", PROMPTS[0], delta_params(max_tokens=100, ignore_eos=True))
    await engine.shutdown()
    with pytest.raises(EngineDeadError):
        async for _ in stream:
            pass
    with pytest.raises(EngineDeadError):
        await engine.add_request("late", PROMPTS[0], delta_params(max_tokens=2))


async def test_idle_engine_thread_does_not_spin(engine):
    await collect(engine, "warm", "hello", delta_params(max_tokens=2))
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    await asyncio.sleep(0.5)
    cpu = time.process_time() - cpu_before
    assert cpu < 0.1 * (time.perf_counter() - wall_before), f"{cpu:.3f} s of CPU while idle"


async def test_add_requests_is_one_command_and_all_or_nothing(engine):
    """A request's prompts reach the engine together: its first step already holds all of them (one step for
    64 short prompts, not 64), and a refused prompt takes back the ones added before it."""
    seen = []
    real_step = engine.engine.step

    def step():
        seen.append(engine.engine.get_num_unfinished_requests())
        return real_step()

    engine.engine.step = step
    streams = await engine.add_requests([(f"b{i}", {"prompt_token_ids": [5, 6, 7, i + 1]}, delta_params(max_tokens=1),
                                          True, 0) for i in range(64)])
    for stream in streams:
        async for _ in stream:
            pass
    assert seen[0] == 64, seen[:5]
    with pytest.raises(ValidationError):
        await engine.add_requests([("ok", "hello", delta_params(max_tokens=1), True, 0),
                                   ("bad", "", delta_params(max_tokens=1), True, 0)])
    for _ in range(100):
        if not engine.engine.has_unfinished_requests():
            break
        await asyncio.sleep(0.01)
    assert not engine.engine.has_unfinished_requests()
    assert engine.engine.kv_cache_manager.usage() == 0


async def test_a_shut_down_engine_refuses_work_with_a_clear_error(tiny_llama):
    """After AsyncLLMEngine.shutdown the engine's KV cache is freed: a later add or step says so, instead of failing
    inside the model."""
    engine = engine_factory(tiny_llama[1])()
    async_engine = AsyncLLMEngine(engine)
    async_engine.start()
    await async_engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.add_request("late", PROMPTS[0], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="shut down"):
        engine.step()
    engine.shutdown()  # twice is harmless
