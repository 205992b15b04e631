"""Hostile input and load against the server (issue 15): a bad-input corpus that must give 4xx in OpenAI's error
shape and never a 5xx; streams cut before and after their first chunk that must be aborted and accounted for;
a full queue answered with 503 + Retry-After; tokenizing a huge prompt without blocking /health; CORS.

Oracles: OpenAI's error shape and status classes (the official client maps 4xx/5xx to its exception types),
vLLM's documented limits and Starlette's CORS semantics (what vLLM mounts), and the engine's own block pool
(every KV block free once nothing runs).
"""
import asyncio
import json
import math
import time
from collections import Counter

import pytest
import pytest_asyncio
from server_utils import MAX_MODEL_LEN, engine_of, make_app, parse_sse, wait_idle, wait_ready

from hfbridge.server import STATE, ServerSettings
from hfbridge.server.pooling_protocol import MAX_INPUTS, parse_rerank_request
from hfbridge.server.protocol import SAMPLING_FIELDS
from hfbridge.server.security import CorsSettings
from hfbridge.server.sse import EventStream

pytestmark = pytest.mark.asyncio
HISTOGRAM: Counter = Counter()  # the corpus' status codes, printed for the issue's closing note


@pytest_asyncio.fixture
async def client(aiohttp_client, tiny_llama):
    c = await aiohttp_client(make_app(tiny_llama[1], ServerSettings(max_request_body_bytes=1 << 20)))
    await wait_ready(c)
    return c


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _sampling_cases():
    """Wrong types and out-of-range values for every sampling field the server accepts."""
    ints = {"n", "best_of", "top_k", "min_tokens", "prompt_logprobs", "truncate_prompt_tokens", "seed"}
    cases = []
    for name in SAMPLING_FIELDS:
        cases.append((name, json.dumps({"prompt": "hi", name: {"a": 1}})))  # an object where a value belongs
        if name in ints:
            cases += [(name, f'{{"prompt": "hi", "{name}": {2**63}}}'), (name, f'{{"prompt": "hi", "{name}": {-2**64}}}'),
                      (name, f'{{"prompt": "hi", "{name}": 1.5}}'), (name, f'{{"prompt": "hi", "{name}": "3"}}')]
        elif SAMPLING_FIELDS[name].__name__ == "_number":
            cases += [(name, f'{{"prompt": "hi", "{name}": {v}}}') for v in ("NaN", "Infinity", "-Infinity", "1e400")]
            cases.append((name, f'{{"prompt": "hi", "{name}": "0.5"}}'))
    cases += [("stop_token_ids", '{"prompt": "hi", "stop_token_ids": [99999999999999999999]}'),
              ("logit_bias", '{"prompt": "hi", "logit_bias": {"5": NaN}}'),
              ("max_tokens", f'{{"prompt": "hi", "max_tokens": {2**64}}}'),
              ("max_tokens", '{"prompt": "hi", "max_tokens": -1}'),
              ("max_tokens", '{"prompt": "hi", "max_tokens": Infinity}')]
    # Values in range for JSON but out of vLLM's ranges (checked by SamplingParams).
    for name, value in [("temperature", -1), ("top_p", 2), ("top_p", 0), ("top_k", -5), ("min_p", 2), ("n", 0),
                        ("presence_penalty", 3), ("frequency_penalty", -3), ("repetition_penalty", 0),
                        ("min_tokens", -1), ("prompt_logprobs", 1000), ("truncate_prompt_tokens", -5)]:
        cases.append((name, json.dumps({"prompt": "hi", name: value})))
    return cases


def corpus():
    """(label, method, path, raw body or None): every one must answer 4xx in OpenAI's error shape."""
    comp, chat = "/v1/completions", "/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    cases = [
        ("empty body", "POST", comp, b""), ("whitespace body", "POST", chat, b"  \n"),
        ("malformed", "POST", comp, b'{"prompt": '), ("malformed chat", "POST", chat, b"{'messages': 1}"),
        ("array body", "POST", comp, b'[{"prompt": "hi"}]'), ("string body", "POST", chat, b'"hi"'),
        ("null body", "POST", comp, b"null"), ("number body", "POST", "/tokenize", b"12"),
        ("nested top level", "POST", comp, _nested(100_000).encode()),
        ("nested prompt", "POST", comp, b'{"prompt": ' + _nested(100_000).encode() + b"}"),
        ("nested messages", "POST", chat, b'{"messages": ' + _nested(100_000).encode() + b"}"),
        ("nested stop", "POST", comp, b'{"prompt": "hi", "stop": ' + _nested(100_000).encode() + b"}"),
        ("nested 900", "POST", comp, b'{"prompt": "hi", "logit_bias": ' + _nested(900).encode() + b"}"),
        ("nested tokenize", "POST", "/tokenize", b'{"prompt": ' + _nested(100_000).encode() + b"}"),
        ("20 MB body", "POST", comp, b'{"prompt": "' + b"a" * (20 << 20) + b'"}'),
        ("non-UTF-8", "POST", comp, b'{"prompt": "\xff\xfe\xc3"}'),
        ("latin-1", "POST", chat, '{"messages": [{"role": "user", "content": "caf\xe9"}]}'.encode("latin-1")),
        ("surrogate prompt", "POST", comp, b'{"prompt": "a\\ud800b"}'),
        ("low surrogate", "POST", comp, b'{"prompt": ["ok", "\\udc00"]}'),
        ("surrogate chat", "POST", chat, b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
        ("surrogate tokenize", "POST", "/tokenize", b'{"prompt": "a\\udfffb"}'),
        ("surrogate key", "POST", comp, b'{"prompt": "hi", "\\ud800": 1}'),
        ("prompt over context", "POST", comp, json.dumps({"prompt": list(range(1, MAX_MODEL_LEN + 5))}).encode()),
        ("text over context", "POST", comp, json.dumps({"prompt": "hello " * 400}).encode()),
        ("chat over context", "POST", chat, json.dumps({"messages": [{"role": "user", "content": "hi " * 400}]}).encode()),
        ("token id past vocab", "POST", comp, b'{"prompt": [1, 2, 99999999]}'),
        ("token id past int64", "POST", comp, f'{{"prompt": [1, {2**64}]}}'.encode()),
        ("negative token id", "POST", comp, b'{"prompt": [1, -1]}'),
        ("empty token ids", "POST", comp, b'{"prompt": [[]]}'),
        ("detokenize past vocab", "POST", "/detokenize", b'{"tokens": [99999999]}'),
        ("detokenize past int64", "POST", "/detokenize", f'{{"tokens": [{2**70}]}}'.encode()),
        ("unknown model", "POST", comp, b'{"model": "gpt-4", "prompt": "hi"}'),
        ("unknown model chat", "POST", chat, json.dumps({"model": "x", "messages": user}).encode()),
        ("model not a string", "POST", comp, b'{"model": ["a"], "prompt": "hi"}'),
        ("no prompt", "POST", comp, b'{"max_tokens": 3}'), ("no messages", "POST", chat, b'{"model": null}'),
        ("messages not a list", "POST", chat, b'{"messages": "hi"}'),
        ("role not a string", "POST", chat, b'{"messages": [{"role": 5, "content": "hi"}]}'),
        ("image part", "POST", chat, json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}).encode()),
        ("stream_options without stream", "POST", chat, json.dumps({"messages": user, "stream_options": {
            "include_usage": True}}).encode()),
        ("stream not a bool", "POST", comp, b'{"prompt": "hi", "stream": "yes"}'),
        ("n x prompts", "POST", comp, json.dumps({"prompt": ["a"] * 600, "n": 2, "max_tokens": 1}).encode()),
        ("too many prompts", "POST", comp, json.dumps({"prompt": ["a"] * 1025, "max_tokens": 1}).encode()),
        ("request chat template", "POST", chat, json.dumps({"messages": user, "chat_template": "{{ 1 }}"}).encode()),
        ("json_schema response format without a schema", "POST", chat, json.dumps({
            "messages": user, "response_format": {"type": "json_schema"}}).encode()),
        ("logprobs too many", "POST", comp, b'{"prompt": "hi", "logprobs": 1000}'),
        ("top_logprobs without logprobs", "POST", chat, json.dumps({"messages": user, "top_logprobs": 2}).encode()),
        ("wrong method completions", "GET", comp, None), ("wrong method models", "DELETE", "/v1/models", None),
        ("wrong method health", "POST", "/health", b"{}"), ("unknown route", "GET", "/v1/engines", None),
        ("unknown route post", "POST", "/v1/completion", b'{"prompt": "hi"}'),
    ]
    cases += [(f"sampling {name}", "POST", comp, body.encode()) for name, body in _sampling_cases()]
    return cases


async def _check_shape(response, label):
    body = await response.json(content_type=None)
    assert set(body) == {"error"}, (label, body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == response.status, (label, error)
    assert isinstance(error["message"], str) and len(error["message"]) < 2000, (label, len(error["message"]))


async def test_bad_input_corpus_gets_4xx_never_5xx(client):
    cases = corpus()
    assert len(cases) >= 140
    statuses = {}
    for label, method, path, body in cases:
        response = await client.request(method, path, data=body)
        statuses[label] = response.status
        HISTOGRAM[response.status] += 1
        assert 400 <= response.status < 500, (label, response.status, (await response.text())[:300])
        await _check_shape(response, label)
    print(f"\ncorpus: {len(cases)} cases, status codes {dict(sorted(HISTOGRAM.items()))}")
    # The statuses a client can act on: too large, not found, wrong method.
    assert statuses["20 MB body"] == 413 and statuses["unknown model"] == 404
    assert statuses["wrong method completions"] == 405 and statuses["unknown route"] == 404
    # Still serving normally afterwards, with nothing left running.
    response = await client.post("/v1/completions", json={"prompt": "The capital of", "max_tokens": 3})
    assert response.status == 200 and len((await response.json())["choices"][0]["text"]) > 0
    assert (await client.get("/health")).status == 200
    await wait_idle(client)
    assert client.app[STATE].in_flight == 0


async def test_lone_surrogate_messages_name_the_problem(client):
    response = await client.post("/tokenize", data=b'{"prompt": "a\\ud800b"}')
    assert response.status == 400 and "surrogate" in (await response.json())["error"]["message"]
    # A valid pair (an emoji escaped as two surrogates) is text, and is accepted.
    response = await client.post("/tokenize", data=b'{"prompt": "a\\ud83d\\ude00b"}')
    assert response.status == 200, await response.text()


async def test_prompt_logprobs_are_returned_without_echo(client):
    response = await client.post("/v1/completions", json={"prompt": [5, 6, 7, 8], "max_tokens": 1,
                                                           "prompt_logprobs": 2})
    [choice] = (await response.json())["choices"]
    entries = choice["prompt_logprobs"]
    # vLLM's shape: None for the first position, then {token id: {logprob, rank, decoded_token}} holding the
    # prompt's own token and the top 2.
    assert len(entries) == 4 and entries[0] is None
    for position, entry in zip((6, 7, 8), entries[1:]):
        assert str(position) in entry and 2 <= len(entry) <= 3
        assert all(v["logprob"] <= 0 and v["rank"] >= 1 for v in entry.values())


@pytest.mark.filterwarnings("ignore::pytest.PytestWarning")
def test_rerank_past_the_limit_is_refused_not_cut():
    from hfbridge.server.errors import APIError

    with pytest.raises(APIError, match=f"At most {MAX_INPUTS} documents"):
        parse_rerank_request({"query": "q", "documents": ["d"] * (MAX_INPUTS + 1)})
    assert len(parse_rerank_request({"query": "q", "documents": ["d"] * MAX_INPUTS}).documents) == MAX_INPUTS


# -- load, disconnects and accounting

def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


async def _metrics(client) -> str:
    return await (await client.get("/metrics")).text()


async def test_streams_cut_before_and_after_the_first_chunk_are_aborted_and_counted(aiohttp_client, tiny_llama,
                                                                                   monkeypatch):
    c = await aiohttp_client(make_app(tiny_llama[1], block_size=8, max_num_seqs=64))
    await wait_ready(c)
    gauge = "hfbridge:kv_cache_used_blocks"
    before = _metric(await _metrics(c), gauge)
    user = [{"role": "user", "content": "Tell me a story"}]

    async def full_stream() -> float:
        start = time.perf_counter()
        ttft, lines = None, []
        response = await c.post("/v1/chat/completions", json={"messages": user, "stream": True, "max_tokens": 6,
                                                                "ignore_eos": True})
        async for line in response.content:
            if ttft is None and b'"content"' in line and b'"role"' not in line:
                ttft = time.perf_counter() - start  # the first chunk holding a generated token
            lines.append(line)
        events = parse_sse(b"".join(lines).decode())
        assert response.status == 200 and events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        return ttft

    ttfts = await asyncio.gather(*(full_stream() for _ in range(64)))
    assert all(t is not None for t in ttfts)
    # No max_tokens: "the rest of the context" (over 100 tokens), so none ends before it is cut.
    long_body = {"messages": user, "stream": True, "ignore_eos": True}

    async def cut_after_first_chunk() -> None:
        response = await c.post("/v1/chat/completions", json=long_body)
        first = await response.content.readline()
        assert first.startswith(b"data: ") and b'"role"' in first
        response.close()

    await asyncio.gather(*(cut_after_first_chunk() for _ in range(20)))

    # Cut before the first chunk: the handlers are held just before their first write (the requests already in
    # the engine) while their clients leave; they must abort, not generate to the end of the context.
    gate, held = asyncio.Event(), []
    real_open = EventStream.open

    async def held_open(self):
        held.append(self)
        await gate.wait()
        await real_open(self)

    monkeypatch.setattr(EventStream, "open", held_open)
    clients = [asyncio.create_task(c.post("/v1/chat/completions", json=long_body)) for _ in range(20)]
    while len(held) < 20:
        await asyncio.sleep(0.01)
    for task in clients:
        task.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    await asyncio.sleep(0.2)  # the server sees the connections close
    gate.set()

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = await _metrics(c)
        if _metric(text, "vllm:request_success_total", finished_reason="abort") >= 40:
            break
        await asyncio.sleep(0.05)
    await wait_idle(c)
    text = await _metrics(c)
    counts = {r: _metric(text, "vllm:request_success_total", finished_reason=r) for r in ("length", "abort", "stop")}
    # Every request accounted for: 64 ran to max_tokens, the 40 cut ones were aborted (not run to the end).
    assert counts == {"length": 64, "abort": 40, "stop": 0}, counts
    assert _metric(text, "vllm:num_requests_running") == 0 and _metric(text, "vllm:num_requests_waiting") == 0
    after = _metric(text, gauge)
    assert before == after == 0
    assert c.app[STATE].in_flight == 0
    ttfts.sort()
    p50, p99 = ttfts[len(ttfts) // 2], ttfts[math.ceil(0.99 * len(ttfts)) - 1]
    print(f"\nload: 64/64 streamed chats ok, TTFT p50 {p50 * 1000:.0f} ms p99 {p99 * 1000:.0f} ms; "
          f"40 cut streams aborted; used blocks before {before:.0f} after {after:.0f}")


async def test_a_full_queue_answers_503_with_retry_after_then_serves(aiohttp_client, tiny_llama):
    c = await aiohttp_client(make_app(tiny_llama[1], ServerSettings(max_waiting_requests=1), max_num_seqs=2))
    await wait_ready(c)
    long_body = {"prompt": "Once upon a time", "stream": True, "ignore_eos": True, "max_tokens": 100}
    holders = [await c.post("/v1/completions", json=long_body) for _ in range(3)]  # 2 running + 1 waiting
    assert [h.status for h in holders] == [200, 200, 200]
    burst = await asyncio.gather(*(c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                                   for _ in range(5)))
    for response in burst:
        assert response.status == 503 and response.headers["Retry-After"] == "1"
        await _check_shape(response, "queue full")
    # n counts: one request whose 2 samples do not fit is refused as well.
    for holder in holders:
        holder.close()
    await wait_idle(c)
    for _ in range(200):  # the holders' seats are given back when their handlers notice the hang-up
        if c.app[STATE].in_flight == 0:
            break
        await asyncio.sleep(0.05)
    response = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 3})
    assert response.status == 200 and len((await response.json())["choices"]) == 3
    assert c.app[STATE].in_flight == 0


async def test_health_answers_while_a_huge_prompt_is_tokenized(aiohttp_client, tiny_llama):
    c = await aiohttp_client(make_app(tiny_llama[1], ServerSettings(max_request_body_bytes=64 << 20)))
    await wait_ready(c)
    words = " ".join(f"w{i % 9973}x" for i in range(200_000))  # several MB of text, seconds to tokenize
    huge = asyncio.create_task(c.post("/v1/completions", json={"prompt": words, "max_tokens": 1}))
    latencies, overlapped = [], 0
    while not huge.done():
        start = time.perf_counter()
        assert (await c.get("/health")).status == 200
        latencies.append(time.perf_counter() - start)
        overlapped += not huge.done()
        await asyncio.sleep(0.05)
    response = await huge
    # Over the context: a 400 once tokenized, which proves the whole prompt went through the tokenizer.
    assert response.status == 400 and "maximum context length" in (await response.json())["error"]["message"]
    assert overlapped >= 3, "the prompt was tokenized too fast for the probes to overlap it"
    assert max(latencies) < 1.0, latencies


async def test_cors_follows_vllm_defaults_and_flags(aiohttp_client, tiny_llama):
    c = await aiohttp_client(make_app(tiny_llama[1], ServerSettings(api_keys=("k",))))
    await wait_ready(c, headers={"Authorization": "Bearer k"})
    # Default (vLLM): every origin; the preflight is answered without credentials, before auth.
    pre = await c.options("/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status == 200 and pre.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert "authorization" in pre.headers["Access-Control-Allow-Headers"]
    response = await c.get("/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
    assert response.status == 200 and response.headers["Access-Control-Allow-Origin"] == "*"
    # Streamed responses carry it too (their headers are sent before any middleware sees them).
    stream = await c.post("/v1/completions", headers={"Origin": "https://app.example", "Authorization": "Bearer k"},
                          json={"prompt": "hi", "max_tokens": 2, "stream": True})
    assert stream.headers["Access-Control-Allow-Origin"] == "*" and (await stream.text()).endswith("[DONE]\n\n")

    settings = ServerSettings(cors=CorsSettings(("https://ok.example",), ("POST",), ("content-type",), True))
    c2 = await aiohttp_client(make_app(tiny_llama[1], settings))
    await wait_ready(c2)
    ok = await c2.options("/v1/completions", headers={"Origin": "https://ok.example",
                                                      "Access-Control-Request-Method": "POST"})
    assert ok.status == 200 and ok.headers["Access-Control-Allow-Origin"] == "https://ok.example"
    assert ok.headers["Access-Control-Allow-Credentials"] == "true"
    for headers in ({"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
                    {"Origin": "https://ok.example", "Access-Control-Request-Method": "DELETE"},
                    {"Origin": "https://ok.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "x-secret"}):
        refused = await c2.options("/v1/completions", headers=headers)
        assert refused.status == 400 and "Disallowed CORS" in (await refused.json())["error"]["message"]
        if headers["Origin"] == "https://evil.example":
            assert "Access-Control-Allow-Origin" not in refused.headers
    other = await c2.get("/health", headers={"Origin": "https://evil.example"})
    assert other.status == 200 and "Access-Control-Allow-Origin" not in other.headers


async def test_engine_errors_are_counted_in_metrics(client, monkeypatch):
    engine = engine_of(client)

    def failing_step():
        raise RuntimeError("injected step failure")

    monkeypatch.setattr(engine, "step", failing_step)
    response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    assert response.status == 500
    monkeypatch.undo()
    text = await _metrics(client)
    assert _metric(text, "vllm:request_success_total", finished_reason="error") == 1
    assert _metric(text, "hfbridge:kv_cache_used_blocks") == 0
    assert client.app[STATE].in_flight == 0
    ok = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    assert ok.status == 200


async def test_default_body_limit_follows_the_context(aiohttp_client, tiny_llama):
    from hfbridge.server.state import MIN_AUTO_BODY_BYTES

    c = await aiohttp_client(make_app(tiny_llama[1]))  # no --max-request-body-bytes: from max_model_len
    await wait_ready(c)
    assert c.app[STATE].body_limit == max(MIN_AUTO_BODY_BYTES, 32 * MAX_MODEL_LEN)
    too_big = b'{"prompt": "' + b"a" * MIN_AUTO_BODY_BYTES + b'"}'
    response = await c.post("/v1/completions", data=too_big)
    assert response.status == 413 and "--max-request-body-bytes" in (await response.json())["error"]["message"]
    response = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert response.status == 200


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


async def test_a_large_n_request_starves_nobody_and_its_abort_frees_everything(aiohttp_client, tiny_llama):
    """vLLM-style fairness: another client's small request completes while a request with n=1000 runs; cutting the
    large one aborts all its samples at once (linear abort), frees every KV block and gives its memory back."""
    c = await aiohttp_client(make_app(tiny_llama[1]))
    await wait_ready(c)
    engine = engine_of(c)
    rss_before = _rss_bytes()
    large = await c.post("/v1/completions", json={"prompt": "Once upon a time", "n": 1000, "max_tokens": 40,
                                                  "ignore_eos": True, "stream": True, "temperature": 1.0})
    assert large.status == 200
    await large.content.readline()  # the large request is running
    start = time.monotonic()
    small = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "ignore_eos": True})
    waited = time.monotonic() - start
    assert small.status == 200 and (await small.json())["choices"][0]["finish_reason"] == "length"
    assert waited < 20, f"a 4-token request waited {waited:.1f} s behind n=1000"
    assert engine.get_num_unfinished_requests() > 0  # the large request was still running meanwhile
    large.close()
    await wait_idle(c, timeout=20)
    assert engine.kv_cache_manager.num_free_blocks == engine.executor.num_blocks
    assert _rss_bytes() - rss_before < 256 << 20
