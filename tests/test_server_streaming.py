"""SSE streams (OpenAI's chunk shapes, usage, [DONE]) and clients that leave: their KV blocks come back.

Oracles: the concatenated stream equals the non-streamed response; the KV manager's free-block count
returns to its value before the request."""
import asyncio

import pytest
import pytest_asyncio
from server_utils import engine_of, make_app, parse_sse, wait_idle, wait_ready

from hfbridge.server import STATE, ServerSettings

pytestmark = pytest.mark.asyncio
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest_asyncio.fixture
async def client(aiohttp_client, tiny_llama):
    c = await aiohttp_client(make_app(tiny_llama[1]))
    await wait_ready(c)
    return c


async def stream(client, path, body):
    response = await client.post(path, json={**body, "stream": True})
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = parse_sse(await response.text())
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


async def test_completion_stream_equals_the_whole_response(client):
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    whole = await (await client.post("/v1/completions", json=body)).json()
    chunks = await stream(client, "/v1/completions", body)
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all("usage" not in c for c in chunks)  # no stream_options: no usage anywhere
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_usage_chunk_only_when_asked(client):
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    chunks = await stream(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    *content, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 5
    assert all("usage" not in c for c in content)
    for options in ({}, {"include_usage": False}, {"include_usage": None}):  # vLLM PR #36379: {} means none
        chunks = await stream(client, "/v1/completions", {**body, "stream_options": options})
        assert all("usage" not in c and c["choices"] for c in chunks)
    chunks = await stream(client, "/v1/completions", {**body, "stream_options": {"continuous_usage_stats": True}})
    completion_counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert completion_counts == sorted(completion_counts) and completion_counts[-1] == 5


async def test_forced_usage(aiohttp_client, tiny_llama):
    c = await aiohttp_client(make_app(tiny_llama[1], ServerSettings(enable_force_include_usage=True)))
    await wait_ready(c)
    chunks = await stream(c, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


async def test_chat_stream_role_first_then_content(client):
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    whole = await (await client.post("/v1/chat/completions", json=body)).json()
    chunks = await stream(client, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    first, *content, usage = chunks
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in content)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
    assert text == whole["choices"][0]["message"]["content"]
    assert content[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert usage["usage"] == whole["usage"]


async def test_stream_with_n_and_several_prompts(client):
    chunks = await stream(client, "/v1/completions", {
        "prompt": [PROMPT, "Once upon a time"], "max_tokens": 4, "n": 2, "temperature": 1.0, "seed": 1,
        "ignore_eos": True})
    finished = sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"])
    assert finished == [0, 1, 2, 3]
    chat = await stream(client, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3, "n": 3,
                                                         "temperature": 1.0, "ignore_eos": True})
    assert sorted(c["choices"][0]["index"] for c in chat if "role" in c["choices"][0]["delta"]) == [0, 1, 2]


async def test_stream_logprobs_and_echo(client):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 1, "echo": True}
    whole = (await (await client.post("/v1/completions", json=body)).json())["choices"][0]
    chunks = await stream(client, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert tokens == whole["logprobs"]["tokens"]
    assert offsets == whole["logprobs"]["text_offset"]  # text_offset runs on across chunks
    chat = await stream(client, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3, "logprobs": True,
                                                         "top_logprobs": 1})
    entries = [e for c in chat[1:] for e in c["choices"][0]["logprobs"]["content"]]
    assert len(entries) == 3


async def read_first_chunk(response):
    async for line in response.content:
        if line.startswith(b"data: "):
            return line


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": PROMPT}),
    ("/v1/chat/completions", {"messages": MESSAGES}),
])
async def test_client_leaving_mid_stream_frees_its_blocks(client, path, body):
    engine = engine_of(client)
    free_before = engine.kv_cache_manager.num_free_blocks
    response = await client.post(path, json={**body, "stream": True, "max_tokens": 100, "ignore_eos": True})
    assert await read_first_chunk(response)
    assert engine.get_num_unfinished_requests() == 1
    response.close()  # drop the connection mid-stream
    await wait_idle(client)
    assert engine.kv_cache_manager.num_free_blocks == free_before
    assert engine.stats.num_generation_tokens < 100
    metrics = client.app[STATE].metrics
    assert [metrics.finished(reason) for reason in ("abort", "stop", "length", "error")] == [1, 0, 0, 0]


async def test_cancelled_non_streaming_request_frees_its_blocks(client):
    engine = engine_of(client)
    free_before = engine.kv_cache_manager.num_free_blocks
    task = asyncio.create_task(client.post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 100, "ignore_eos": True}))
    for _ in range(500):
        if engine.stats.num_generation_tokens >= 2:
            break
        await asyncio.sleep(0.005)
    task.cancel()  # the client gives up: its connection closes and the handler is cancelled
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(client)
    assert engine.kv_cache_manager.num_free_blocks == free_before
    assert engine.stats.num_generation_tokens < 100
