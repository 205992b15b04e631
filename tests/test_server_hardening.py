"""Hardening, round 2 (issue 38), beside the fault suite: tables shared by a request's samples, bad words tokenized off
the engine thread, prompt logprobs computed once for n samples, bounded request chat templates, 4xx for what used to
be 500s, connection timeouts, Expect: 100-continue and parser errors, requests that can never fit, echo of a
truncated prompt, served names only, and one log line per failed request.

Oracles: OpenAI's error shape and vLLM's limits and messages; Python's own http.client parses the raw responses and
gzip/zlib build the bodies; the tokenizer (Transformers) decodes what the model saw; Transformers' forward gives the
prompt logprobs."""
import asyncio
import gzip
import http.client
import json
import logging
import socket
import threading
import time
import zlib
from contextlib import asynccontextmanager

import pytest
import pytest_asyncio
import torch
from aiohttp import ClientSession, web
from server_utils import engine_of, make_app, wait_idle, wait_ready

from hfbridge.server import STATE, ServerSettings
from hfbridge.server.app import make_runner

pytestmark = pytest.mark.asyncio
EOS = 2
USER = [{"role": "user", "content": "Tell me a story"}]


async def assert_error(response, status, param=None, contains=()):
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status
    if param is not None:
        assert body["error"]["param"] == param, body
    for text in contains:
        assert text in body["error"]["message"], body["error"]["message"]
    return body["error"]


@pytest_asyncio.fixture
async def client(aiohttp_client, tiny_llama):
    c = await aiohttp_client(make_app(tiny_llama[1]))
    await wait_ready(c)
    return c


# -- 1, 2, 9: token tables, bad words, contradictory parameters ------------------------------------------------

async def test_the_issue_request_is_refused_naming_the_limit(client):
    vocab = engine_of(client).vocab_size
    body = {"prompt": "hi", "n": 1024, "max_tokens": 1, "temperature": 1.0,
            "logit_bias": {str(i): 1.0 for i in range(vocab)} | {str(i + vocab): 0.0 for i in range(700)},
            "allowed_token_ids": list(range(vocab)) * 3}
    await assert_error(await client.post("/v1/completions", json=body), 400, "logit_bias",
                       ["Too many logit bias tokens: 1084. The max size is 1024."])
    del body["logit_bias"]
    await assert_error(await client.post("/v1/completions", json=body), 400, "allowed_token_ids",
                       [f"Too many allowed token IDs: {3 * vocab}. The max size is 1024."])


async def test_bad_words_are_tokenized_on_the_tokenizer_thread_and_capped(client, monkeypatch):
    engine = engine_of(client)
    threads = []
    from hfbridge.sample import bad_words

    real = bad_words.tokenize_bad_words
    monkeypatch.setattr("hfbridge.server.generation.tokenize_bad_words",
                        lambda *a: threads.append(threading.current_thread().name) or real(*a))
    def on_the_engine_thread(params):
        raise AssertionError("bad words tokenized on the engine thread")

    monkeypatch.setattr(engine, "_bad_words_token_ids", on_the_engine_thread)
    response = await client.post("/v1/completions", json={"prompt": ["hi", "ho"], "max_tokens": 3,
                                                           "bad_words": ["Paris", "robot"]})
    assert response.status == 200, await response.text()
    assert len(threads) == 1 and threads[0].startswith("hfbridge-tokenizer")  # once for both prompts
    start = time.monotonic()
    words = [f"w{i}" for i in range(100_000)]
    await assert_error(await client.post("/v1/completions", json={"prompt": "hi", "bad_words": words}), 400,
                       "bad_words", ["Too many bad words: 100000. The max number is 128."])
    assert time.monotonic() - start < 10


async def test_allowed_ids_that_min_tokens_masks_are_refused_before_running(client):
    engine = engine_of(client)
    steps = []
    real_step = engine.step
    engine.step = lambda: steps.append(1) or real_step()
    try:
        response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "min_tokens": 2,
                                                               "allowed_token_ids": [EOS]})
        await assert_error(response, 400, "allowed_token_ids", ["leaves no token to sample"])
        assert not steps  # refused when added, not after a step masked every token
    finally:
        engine.step = real_step


# -- 3: prompt logprobs once for n samples --------------------------------------------------------------------

async def test_prompt_logprobs_are_computed_once_for_n_samples(client, tiny_llama, monkeypatch):
    from hfbridge.worker import model_runner

    computed = []
    real = model_runner.sample_step

    def spy(sampler, logits, step, rows):
        computed.extend(step.prompt_logprob_rows)
        return real(sampler, logits, step, rows)

    monkeypatch.setattr(model_runner, "sample_step", spy)
    prompt = [5, 6, 7, 8, 9, 10]
    body = {"prompt": prompt, "max_tokens": 2, "echo": True, "logprobs": 1, "temperature": 1.0, "seed": 1}
    single = await (await client.post("/v1/completions", json=body)).json()
    computed.clear()
    many = await (await client.post("/v1/completions", json={**body, "n": 4})).json()
    assert len(set(computed)) == 1  # one engine request (sample 0) computed them, not four
    with torch.no_grad():
        ref = torch.log_softmax(tiny_llama[0](torch.tensor([prompt])).logits[0].float(), -1)
    expected = [None] + [ref[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    for choice in single["choices"] + many["choices"]:
        got = choice["logprobs"]["token_logprobs"][: len(prompt)]
        assert got[0] is None and got[1:] == pytest.approx(expected[1:], abs=1e-4)


# -- 4, 5: request chat templates, and 500s that are 400s ---------------------------------------------------

@pytest_asyncio.fixture
async def trusting(aiohttp_client, tiny_llama):
    settings = ServerSettings(trust_request_chat_template=True, request_chat_template_timeout=3)
    c = await aiohttp_client(make_app(tiny_llama[1], settings))
    await wait_ready(c)
    return c


async def test_request_templates_are_bounded_in_time_and_size(trusting):
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
    start = time.monotonic()
    stuck = asyncio.create_task(trusting.post("/v1/chat/completions",
                                              json={"messages": USER, "chat_template": slow, "max_tokens": 2}))
    await asyncio.sleep(0.5)
    # Meanwhile the tokenizer thread serves everyone else: a chat with the model's own template completes.
    other = await trusting.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
    assert other.status == 200 and not stuck.done()
    await assert_error(await stuck, 400, "chat_template", ["took longer than 3 s to render"])
    assert time.monotonic() - start < 60
    huge = "{{ 'a' * 20000000 }}"
    await assert_error(await trusting.post("/tokenize", json={"messages": USER, "chat_template": huge}), 400,
                       "chat_template", ["characters, more than the"])
    # The sandbox serves again after a kill: a template that fits renders as Transformers renders it.
    response = await trusting.post("/tokenize", json={"messages": [{"role": "user", "content": "ab"}],
                                                      "chat_template": "{{ messages[0]['content'] * 2 }}"})
    assert engine_of(trusting).get_tokenizer().decode((await response.json())["tokens"]) == "abab"


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/tokenize"])
async def test_template_and_payload_errors_are_400s(trusting, route):
    cases = [
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs", "tokenize"),
        ({"chat_template_kwargs": {"return_dict": True, "return_assistant_tokens_mask": True}},
         "chat_template_kwargs", "return_assistant_tokens_mask, return_dict"),
        ({"chat_template_kwargs": {"sanitize_control_tokens": True}}, "chat_template_kwargs",
         "sanitize_control_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
          "continue_final_message": True, "add_generation_prompt": False}, "continue_final_message", "null"),
        ({"chat_template": "{% for i in range(200000) %}{% endfor %}"}, None, "range"),
    ]
    for extra, param, text in cases:
        await assert_error(await trusting.post(route, json={"messages": USER, "max_tokens": 2, **extra}), 400,
                           param, [text])


@pytest.mark.parametrize("encoding, encode", [("gzip", gzip.compress), ("deflate", zlib.compress)])
async def test_compressed_bodies_are_read_and_broken_ones_are_400s(client, encoding, encode):
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    ok = await client.post("/v1/completions", data=encode(body), headers={"Content-Encoding": encoding})
    assert ok.status == 200, await ok.text()
    broken = await client.post("/v1/completions", data=b"\x1f\x8b not " + body,
                               headers={"Content-Encoding": encoding})
    await assert_error(broken, 400)


# -- 8, 10, 11: capacity, echo of a truncated prompt, served names ------------------------------------------

async def test_a_request_over_the_whole_capacity_is_a_400_not_a_retryable_503(aiohttp_client, tiny_llama):
    c = await aiohttp_client(make_app(tiny_llama[1], ServerSettings(max_waiting_requests=6), max_num_seqs=2))
    await wait_ready(c)
    body = {"prompt": "hi", "max_tokens": 2, "temperature": 1.0}
    response = await c.post("/v1/completions", json={**body, "n": 9})
    await assert_error(response, 400, "n", ["9 sequences", "the 8 the server holds"])
    assert "Retry-After" not in response.headers
    assert (await c.post("/v1/completions", json={**body, "n": 8})).status == 200


async def test_echo_shows_the_truncated_prompt_the_model_saw(client):
    tokenizer = engine_of(client).get_tokenizer()
    prompt = "Once upon a time there was a little robot"
    body = {"prompt": prompt, "max_tokens": 2, "echo": True, "logprobs": 0, "truncate_prompt_tokens": 3,
            "temperature": 0}
    result = await (await client.post("/v1/completions", json=body)).json()
    kept = tokenizer(prompt).input_ids[-3:]
    [choice] = result["choices"]
    assert choice["text"].startswith(tokenizer.decode(kept)) and not choice["text"].startswith(prompt[:10])
    assert len(choice["logprobs"]["tokens"]) == 3 + 2 and result["usage"]["prompt_tokens"] == 3


async def test_without_served_names_the_model_as_given_is_the_only_name(aiohttp_client, tiny_llama):
    folder = tiny_llama[1]  # (with --served-model-name: test_server_api.py)
    c = await aiohttp_client(make_app(folder))
    await wait_ready(c)
    ok = await c.post("/v1/completions", json={"model": str(folder), "prompt": "hi", "max_tokens": 1})
    assert ok.status == 200
    await assert_error(await c.post("/v1/completions", json={"model": folder.name, "prompt": "hi"}), 404, "model")


# -- 12: one ERROR line per failed request, the traceback at DEBUG ------------------------------------------

async def test_a_500_logs_one_error_line_and_its_traceback_at_debug(client, monkeypatch, caplog):
    engine = engine_of(client)

    def failing_step():
        raise RuntimeError("injected step failure")

    monkeypatch.setattr(engine, "step", failing_step)
    with caplog.at_level(logging.DEBUG, logger="hfbridge"):
        response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3},
                                     headers={"X-Request-Id": "req-38"})
    error = await assert_error(response, 500)
    assert "cmpl-req-38" in error["message"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and all(r.exc_info is None for r in errors), [r.getMessage() for r in errors]
    assert sum("cmpl-req-38" in r.getMessage() for r in errors) == 1
    traced = [r for r in caplog.records
              if r.levelno == logging.DEBUG and r.exc_info and "cmpl-req-38" in r.getMessage()]
    assert len(traced) == 1 and "injected step failure" in str(traced[0].exc_info[1])


# -- 6, 7: connections, served by the runner `hfbridge serve` uses --------------------------------------------

@asynccontextmanager
async def serving(folder, **settings):
    """(port, app) of the app behind serve()'s runner on a loopback port, once the model is ready."""
    app = make_app(folder, ServerSettings(max_request_body_bytes=1 << 20, **settings))
    runner = make_runner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with ClientSession() as session:
            for _ in range(600):
                async with session.get(f"http://127.0.0.1:{port}/ready") as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.05)
        yield port, app
    finally:
        await runner.cleanup()


def _exchange(port: int, chunks: list[bytes], pause: float = 0.0) -> http.client.HTTPResponse:
    """Send raw bytes (pausing between chunks) and parse the reply with Python's own HTTP client parser."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    for i, chunk in enumerate(chunks):
        if i:
            time.sleep(pause)
        sock.sendall(chunk)
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.body = response.read()
    sock.close()
    return response


def _assert_json_error(response: http.client.HTTPResponse, status: int) -> dict:
    assert response.status == status, (response.status, response.body[:300])
    assert response.getheader("Content-Type", "").startswith("application/json")
    error = json.loads(response.body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


def _closed_within(port: int, send: bytes, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closes a connection that sent `send` and then nothing, and what it wrote."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=limit)
    start = time.monotonic()
    if send:
        sock.sendall(send)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except socket.timeout:
        raise AssertionError(f"the connection was still open after {limit} s") from None
    finally:
        sock.close()
    return time.monotonic() - start, received


async def test_idle_and_half_sent_connections_are_closed(tiny_llama):
    async with serving(tiny_llama[1], timeout_keep_alive=1, header_read_timeout=30) as (port, _):
        elapsed, received = await asyncio.to_thread(_closed_within, port, b"", 15)
        assert received == b"" and elapsed < 10  # a silent socket: closed after the keep-alive
        # A request that completes in time works, and its connection is kept for the next one.
        async with ClientSession() as session:
            for _ in range(2):
                async with session.post(f"http://127.0.0.1:{port}/tokenize", json={"prompt": "hi"}) as response:
                    assert response.status == 200
    async with serving(tiny_llama[1], timeout_keep_alive=60, header_read_timeout=1) as (port, _):
        elapsed, received = await asyncio.to_thread(
            _closed_within, port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: app", 15)
        assert received.startswith(b"HTTP/1.1 408") and b'"code": 408' in received and elapsed < 10


async def test_expect_continue_and_parser_errors_answer_in_the_error_shape(tiny_llama):
    async with serving(tiny_llama[1]) as (port, app):
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Expect: 100-continue\r\n")
        big = await asyncio.to_thread(_exchange, port, [head + b"Content-Length: 52428800\r\n\r\n"])
        assert "--max-request-body-bytes" in _assert_json_error(big, 413)["message"]  # at once, not 100 Continue
        body = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
        small = await asyncio.to_thread(_exchange, port, [head + f"Content-Length: {len(body)}\r\n\r\n".encode(),
                                                          body], 0.2)
        assert small.status == 200, small.body  # http.client skips the interim 100 Continue
        chunked = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"zz\r\n{}\r\n0\r\n\r\n")
        _assert_json_error(await asyncio.to_thread(_exchange, port, [chunked]), 400)
        control = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n"
        _assert_json_error(await asyncio.to_thread(_exchange, port, [control]), 400)
        assert app[STATE].in_flight == 0
