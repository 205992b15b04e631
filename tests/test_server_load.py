"""A bounded concurrent load over loopback: 32 mixed requests, 8 at a time, against a KV cache small enough to
force preemption. Oracle: every greedy result equals the same request sent alone; no errors; every KV
block is free again afterwards."""
import asyncio
import time

import aiohttp
import pytest
from server_utils import engine_of, make_app, parse_sse, wait_idle, wait_ready

pytestmark = pytest.mark.asyncio
WORDS = "the capital of france is paris once upon a time there was a little robot who loved to read".split()
NUM_REQUESTS = 32
CONCURRENCY = 8


def make_requests():
    requests = []
    for i in range(NUM_REQUESTS):
        text = " ".join(WORDS[i % 7: i % 7 + 3 + i % 5])
        max_tokens = 8 + (i * 7) % 25
        kind = ("completion", "chat")[i % 2]
        body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": i % 3 == 0, "stream": i % 4 < 2}
        if kind == "completion":
            body["prompt"] = text
        else:
            body["messages"] = [{"role": "user", "content": text}]
        requests.append((kind, body))
    return requests


async def send(session, base_url, kind, body):
    path = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
    async with session.post(base_url + path, json=body) as response:
        assert response.status == 200, await response.text()
        if not body["stream"]:
            data = await response.json()
            choice = data["choices"][0]
            return choice.get("text", choice.get("message", {}).get("content")), data["usage"]["completion_tokens"]
        events = parse_sse(await response.text())
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        parts = [e["choices"][0].get("text", e["choices"][0].get("delta", {}).get("content", ""))
                 for e in events[:-1] if e.get("choices")]
        return "".join(p or "" for p in parts), None


async def test_bounded_concurrent_load_equals_requests_sent_alone(aiohttp_client, tiny_llama):
    # 12 blocks of 16 tokens: fewer than 8 requests of up to ~60 tokens need, so some get preempted.
    client = await aiohttp_client(make_app(tiny_llama[1], num_gpu_blocks_override=12, block_size=16))
    await wait_ready(client)
    engine = engine_of(client)
    free_before = engine.kv_cache_manager.num_free_blocks
    base_url = str(client.make_url(""))
    assert base_url.startswith("http://127.0.0.1:")
    requests = make_requests()
    async with aiohttp.ClientSession() as session:
        alone = [await send(session, base_url, kind, body) for kind, body in requests]
        await wait_idle(client)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def bounded(kind, body):
            async with gate:
                return await send(session, base_url, kind, body)

        start = time.perf_counter()
        together = await asyncio.gather(*(bounded(kind, body) for kind, body in requests))
        elapsed = time.perf_counter() - start
    assert [text for text, _ in together] == [text for text, _ in alone]
    await wait_idle(client)
    assert engine.kv_cache_manager.num_free_blocks == free_before
    assert engine.scheduler.num_preemptions > 0, "the load was meant to force preemption"
    tokens = sum(n for _, n in alone if n is not None)
    print(f"\n{NUM_REQUESTS} requests, {CONCURRENCY} at a time: {elapsed:.2f} s, "
          f"{NUM_REQUESTS / elapsed:.1f} req/s (non-streamed completion tokens alone: {tokens})")
