"""Every route of the server and every error path, through aiohttp's test client on the tiny Llama.

Oracles: generated text equals the offline `LLM` API's for the same greedy request; errors have the
OpenAI/vLLM shape {"error": {message, type, param, code}} with the right status."""
import asyncio
import threading

import pytest
import pytest_asyncio
from server_utils import MAX_MODEL_LEN, engine_factory, engine_of, make_app, wait_idle, wait_ready

from hfbridge import LLM, SamplingParams
from hfbridge.server import ServerSettings, build_app

pytestmark = pytest.mark.asyncio
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def offline(tiny_llama):
    return LLM(model=str(tiny_llama[1]), max_model_len=MAX_MODEL_LEN, dtype="float32")


def greedy_text(llm, prompt, max_tokens, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]


@pytest_asyncio.fixture
async def client(aiohttp_client, tiny_llama):
    c = await aiohttp_client(make_app(tiny_llama[1]))
    await wait_ready(c)
    return c


async def assert_error(response, status, param=None, contains=()):
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    expected_type = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                     503: "ServiceUnavailableError"}.get(status)
    if expected_type:
        assert error["type"] == expected_type
    if param is not None:
        assert error["param"] == param, error
    for text in contains:
        assert text in error["message"], error["message"]
    return error


# -- probes and lifecycle

async def test_health_ready_and_models_while_loading(aiohttp_client, tiny_llama):
    gate = threading.Event()
    build = engine_factory(tiny_llama[1])

    def slow_factory():
        gate.wait(30)
        return build()

    c = await aiohttp_client(build_app(ServerSettings(), slow_factory))
    assert (await c.get("/health")).status == 200  # bound and alive while the model loads
    await assert_error(await c.get("/ready"), 503, contains=["loading"])
    await assert_error(await c.get("/v1/models"), 503)
    await assert_error(await c.post("/v1/completions", json={"prompt": "Hi"}), 503)
    gate.set()
    await wait_ready(c)
    assert (await c.get("/readyz")).status == 200
    assert (await c.get("/ping")).status == 200


async def test_load_failure_is_reported_by_health_and_ready(aiohttp_client, caplog):
    def failing():
        raise ValueError("no such model: /nowhere")

    c = await aiohttp_client(build_app(ServerSettings(), failing))
    for _ in range(200):
        if (await c.get("/health")).status == 503:
            break
        await asyncio.sleep(0.01)
    # The unauthenticated probes say that it failed, never why (paths, config details): the log has the reason.
    for path in ("/health", "/ready"):
        error = await assert_error(await c.get(path), 503, contains=["failed to load"])
        assert "/nowhere" not in error["message"]
    assert "/nowhere" in caplog.text


async def test_serve_reports_a_port_in_use(tiny_llama, caplog):
    import socket

    from hfbridge.server import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert await serve(make_app(tiny_llama[1]), "127.0.0.1", port) == 1
    assert f"Cannot listen on 127.0.0.1 port {port}" in caplog.text


async def test_apps_in_one_process_load_one_at_a_time(aiohttp_client, tiny_llama):
    import torch

    from hfbridge.model.model_loader import _BUILD_LOCK

    # accelerate's init_empty_weights patches torch.nn.Module process-wide; overlapping loads would leave it so.
    clients = [await aiohttp_client(make_app(tiny_llama[1])) for _ in range(3)]
    for c in clients:
        await wait_ready(c)
    with _BUILD_LOCK:  # a loader thread left by an earlier test may be mid-build: look between builds
        assert torch.nn.Linear(2, 2).weight.device.type == "cpu"


async def test_version(client):
    from hfbridge.version import __version__

    assert await (await client.get("/version")).json() == {"version": __version__}


async def test_models_lists_served_names_and_accepts_only_them(aiohttp_client, tiny_llama, offline):
    folder = tiny_llama[1]
    c = await aiohttp_client(make_app(folder, ServerSettings(served_model_names=("tiny", "tiny-alias"))))
    await wait_ready(c)
    body = await (await c.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny", "tiny-alias"]
    # `root` names the model without the local path it was loaded from (the served name stands in for it).
    assert all(m["max_model_len"] == MAX_MODEL_LEN and m["root"] == "tiny" for m in body["data"])
    assert str(folder) not in await (await c.get("/v1/models")).text()
    for name, echoed in [("tiny", "tiny"), ("tiny-alias", "tiny-alias"), (None, "tiny")]:
        response = await c.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 2})
        assert response.status == 200, await response.text()
        assert (await response.json())["model"] == echoed
    error = await assert_error(await c.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404,
                               "model", ["The model `gpt-4` does not exist", "tiny, tiny-alias"])
    assert str(folder) not in error["message"] and folder.name not in error["message"]
    # As vLLM: with --served-model-name, the weights' path and folder name are not names of the model.
    for name in (str(folder), folder.name):
        await assert_error(await c.post("/v1/completions", json={"model": name, "prompt": "x"}), 404, "model")


# -- completions

async def test_completion_matches_offline_greedy(client, offline):
    response = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    body = await response.json()
    expected = greedy_text(offline, PROMPT, 12)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert choice["text"] == expected.text
    assert choice["finish_reason"] == expected.finish_reason == "length"
    prompt_len = len(offline.get_tokenizer()(PROMPT).input_ids)
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 12, "total_tokens": prompt_len + 12,
                             "prompt_tokens_details": None}


async def test_completion_token_prompts_several_prompts_and_n(client, offline):
    ids = offline.get_tokenizer()(PROMPT).input_ids
    response = await client.post("/v1/completions", json={
        "prompt": [ids, ids[:3]], "max_tokens": 4, "n": 2, "temperature": 1.0, "seed": 7})
    body = await response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]  # prompt * n + sample
    assert body["usage"]["prompt_tokens"] == len(ids) + 3
    assert body["usage"]["completion_tokens"] == 16
    single = await client.post("/v1/completions", json={"prompt": ids, "max_tokens": 4, "temperature": 0})
    assert (await single.json())["choices"][0]["text"] == greedy_text(offline, {"prompt_token_ids": ids}, 4).text


async def test_seed_makes_sampling_repeatable(client):
    request = {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 1234}
    texts = [(await (await client.post("/v1/completions", json=request)).json())["choices"][0]["text"]
             for _ in range(2)]
    assert texts[0] == texts[1]


async def test_echo_and_logprobs_shapes(client, offline):
    response = await client.post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 2})
    [choice] = (await response.json())["choices"]
    expected = greedy_text(offline, PROMPT, 4)
    assert choice["text"] == PROMPT + expected.text
    logprobs = choice["logprobs"]
    prompt_len = len(offline.get_tokenizer()(PROMPT).input_ids)
    assert len(logprobs["tokens"]) == prompt_len + 4
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(isinstance(lp, float) and lp <= 0 for lp in logprobs["token_logprobs"][1:])
    assert all(1 <= len(top) <= 3 for top in logprobs["top_logprobs"][1:])  # k, plus the chosen token
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    # The chosen generated tokens' logprobs are the engine's.
    with_lp = greedy_text(offline, PROMPT, 4, logprobs=2)
    engine_lps = [d[t].logprob for d, t in zip(with_lp.logprobs, with_lp.token_ids)]
    assert logprobs["token_logprobs"][prompt_len:] == pytest.approx(engine_lps, abs=1e-4)


async def test_stop_strings_and_stop_token_ids(client, offline):
    full = greedy_text(offline, PROMPT, 12)
    stop = full.text[3:6]
    response = await client.post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stop": [stop]})
    [choice] = (await response.json())["choices"]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert choice["text"] == full.text[: full.text.index(stop)]
    stop_id = full.token_ids[2]
    response = await client.post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stop_token_ids": [stop_id]})
    [choice] = (await response.json())["choices"]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop_id


async def test_vllm_extra_sampling_fields(client, offline):
    response = await client.post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 6, "temperature": 0.7, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2,
        "ignore_eos": True, "min_tokens": 6, "skip_special_tokens": False, "seed": 3, "presence_penalty": 0.5,
        "frequency_penalty": 0.5, "logit_bias": {"5": 2.0}, "include_stop_str_in_output": False})
    body = await response.json()
    assert response.status == 200, body
    assert body["usage"]["completion_tokens"] == 6


async def test_max_tokens_beyond_context_is_clamped(client, offline):
    prompt_len = len(offline.get_tokenizer()(PROMPT).input_ids)
    response = await client.post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 100_000, "temperature": 0, "ignore_eos": True})
    body = await response.json()
    assert response.status == 200, body
    assert body["usage"]["completion_tokens"] == MAX_MODEL_LEN - prompt_len
    assert body["choices"][0]["finish_reason"] == "length"


async def test_strict_max_tokens_rejects_instead(aiohttp_client, tiny_llama):
    c = await aiohttp_client(make_app(tiny_llama[1], ServerSettings(strict_max_tokens=True)))
    await wait_ready(c)
    response = await c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 500})
    await assert_error(response, 400, "max_tokens", ["max_tokens=500", str(MAX_MODEL_LEN)])
    assert (await c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})).status == 200


async def test_prompt_longer_than_context_names_both_numbers(client, offline):
    long_prompt = "Hello " * 300
    num_tokens = len(offline.get_tokenizer()(long_prompt).input_ids)
    response = await client.post("/v1/completions", json={"prompt": long_prompt})
    await assert_error(response, 400, "prompt", [str(MAX_MODEL_LEN), str(num_tokens)])
    chat = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long_prompt}]})
    await assert_error(chat, 400, "messages", [str(MAX_MODEL_LEN)])


# -- bad input: always a 400 with the field named

@pytest.mark.parametrize("data", [b"{bad json", b"[1, 2]", b"", b"\xff\xfe"])
async def test_malformed_bodies(client, data):
    await assert_error(await client.post("/v1/completions", data=data), 400)
    await assert_error(await client.post("/v1/chat/completions", data=data), 400)


@pytest.mark.parametrize("field,value", [
    ("temperature", "hot"), ("max_tokens", "10"), ("n", 1.5), ("prompt", 5), ("prompt", [1, "a"]),
    ("stop", 3), ("logit_bias", [1]), ("seed", 2**70), ("stream", "yes"), ("echo", 1), ("top_k", True),
    ("stop_token_ids", ["a"]), ("stream_options", "usage"), ("prompt", []), ("prompt", [[-1, 2]]),
])
async def test_wrong_types_are_400_naming_the_field(client, field, value):
    body = {"prompt": PROMPT, field: value}
    await assert_error(await client.post("/v1/completions", json=body), 400, field)


@pytest.mark.parametrize("field,value,message", [
    ("temperature", 5, "temperature must be in [0, 2], got 5.0."),
    ("top_p", 0, "top_p must be in (0, 1], got 0.0."),
    ("n", 0, "n must be at least 1, got 0."),
    ("top_k", -5, "top_k must be 0 (disable), or at least 1, got -5."),
    ("max_tokens", 0, "max_tokens must be at least 1, got 0."),
    ("presence_penalty", 3, "presence_penalty must be in [-2, 2], got 3.0."),
    ("repetition_penalty", 0, "repetition_penalty must be greater than zero"),
    ("min_p", 2, "min_p must be in [0, 1]"),
    ("logprobs", 50, "Requested sample logprobs of 50, which is greater than max allowed: 20"),
    ("stop_token_ids", [10**6], "out-of-vocab"),
    ("stop", [""], "stop cannot contain an empty string."),
])
async def test_out_of_range_values_use_vllm_wording(client, field, value, message):
    body = {"prompt": PROMPT, "max_tokens": 4, field: value}
    await assert_error(await client.post("/v1/completions", json=body), 400, field, [message])
    await wait_idle(client)


async def test_greedy_with_n_above_one_is_400(client):
    response = await client.post("/v1/completions", json={"prompt": PROMPT, "n": 2, "temperature": 0})
    await assert_error(response, 400, "n", ["n must be 1 when using greedy sampling"])


@pytest.mark.parametrize("body,param", [
    ({"prompt": PROMPT, "guided_json": {"type": "object"}, "guided_decoding_backend": "outlines"},
     "guided_decoding_backend"),
    ({"prompt": PROMPT, "suffix": "end"}, "suffix"),
    ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": PROMPT, "stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
    ({"max_tokens": 3}, "prompt"),
])
async def test_requests_the_server_cannot_honour_are_refused(client, body, param):
    await assert_error(await client.post("/v1/completions", json=body), 400, param)


async def test_unknown_route_and_wrong_method_have_the_error_shape(client):
    await assert_error(await client.get("/v1/nothing"), 404)
    response = await client.get("/v1/completions")
    assert response.status == 405
    assert (await response.json())["error"]["code"] == 405


async def test_unsupported_openai_fields_are_dropped(client):
    response = await client.post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 2, "user": "me", "store": True, "metadata": {"a": 1}, "something_new": 1})
    assert response.status == 200


async def test_body_size_limit(aiohttp_client, tiny_llama):
    c = await aiohttp_client(make_app(tiny_llama[1], ServerSettings(max_request_body_bytes=2048)))
    await wait_ready(c)
    response = await c.post("/v1/completions", json={"prompt": "x" * 4096})
    assert response.status == 413
    error = (await response.json())["error"]
    assert error["code"] == 413 and "--max-request-body-bytes" in error["message"]


# -- chat

async def test_chat_matches_offline_chat(client, offline):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"}]
    response = await client.post("/v1/chat/completions", json={
        "messages": messages, "max_completion_tokens": 10, "temperature": 0})
    body = await response.json()
    expected = offline.chat(messages, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == expected.outputs[0].text
    assert body["usage"]["prompt_tokens"] == len(expected.prompt_token_ids)


async def test_chat_content_parts_and_logprobs(client):
    response = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}],
        "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 2})
    body = await response.json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]


@pytest.mark.parametrize("body,param", [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 'x' }}"}, "chat_template"),
    ({"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": True, "continue_final_message": True},
     "continue_final_message"),
    ({}, "messages"),
])
async def test_chat_bad_input(client, body, param):
    await assert_error(await client.post("/v1/chat/completions", json=body), 400, param)


async def test_chat_without_template_says_how_to_fix_it(aiohttp_client, tiny_llama, tmp_path):
    import shutil

    folder = tmp_path / "no_template"
    shutil.copytree(tiny_llama[1], folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    c = await aiohttp_client(make_app(folder))
    await wait_ready(c)
    assert engine_of(c).get_tokenizer().chat_template is None
    response = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    await assert_error(response, 400, "chat_template", ["--chat-template", "/v1/completions"])


async def test_server_chat_template_and_template_kwargs(aiohttp_client, tiny_llama, offline):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if shout %}!!{% endif %}"
    c = await aiohttp_client(make_app(tiny_llama[1], chat_template=template))
    await wait_ready(c)
    tokenizer = offline.get_tokenizer()
    messages = [{"role": "user", "content": "Hello"}]
    for kwargs, text in [({}, "Hello"), ({"shout": True}, "Hello!!")]:
        response = await c.post("/tokenize", json={"messages": messages, "chat_template_kwargs": kwargs})
        assert (await response.json())["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
    response = await c.post("/v1/chat/completions", json={
        "messages": messages, "chat_template_kwargs": {"shout": True}, "max_tokens": 3, "temperature": 0})
    expected = greedy_text(offline, {"prompt_token_ids": tokenizer("Hello!!").input_ids}, 3)
    assert (await response.json())["choices"][0]["message"]["content"] == expected.text


async def test_trusted_request_chat_template(aiohttp_client, tiny_llama):
    c = await aiohttp_client(make_app(tiny_llama[1], ServerSettings(trust_request_chat_template=True)))
    await wait_ready(c)
    response = await c.post("/tokenize", json={"messages": [{"role": "user", "content": "ab"}],
                                               "chat_template": "{{ messages[0]['content'] * 2 }}"})
    body = await response.json()
    assert engine_of(c).get_tokenizer().decode(body["tokens"]) == "abab"


# -- tokenizer routes and metrics

async def test_tokenize_and_detokenize(client, offline):
    tokenizer = offline.get_tokenizer()
    body = await (await client.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True})).json()
    assert body["tokens"] == tokenizer(PROMPT).input_ids
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    back = await (await client.post("/detokenize", json={"tokens": body["tokens"]})).json()
    assert back == {"prompt": PROMPT}
    chat = await (await client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]})).json()
    assert tokenizer.decode(chat["tokens"]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    await assert_error(await client.post("/detokenize", json={"tokens": [10**7]}), 400, "tokens")
    await assert_error(await client.post("/detokenize", json={"tokens": "abc"}), 400, "tokens")
    await assert_error(await client.post("/tokenize", json={}), 400, "prompt")
    await assert_error(await client.post("/tokenize", json={"prompt": 3}), 400, "prompt")
    await assert_error(await client.post("/tokenize", json={"prompt": "x", "model": "other"}), 404, "model")


async def test_metrics(client):
    """/metrics read with prometheus_client's own parser: vLLM's names, types and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    response = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})
    num_prompt_tokens = (await response.json())["usage"]["prompt_tokens"]
    response = await client.get("/metrics")
    assert response.status == 200 and response.content_type == "text/plain"
    model = str(engine_of(client).model_config.served_model_name)
    families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({"model_name": model, **labels}.items())))]

    assert value("vllm:num_requests_running") == 0 and families["vllm:num_requests_running"].type == "gauge"
    assert value("vllm:num_requests_waiting") == 0
    assert value("vllm:kv_cache_usage_perc") == 0
    assert value("vllm:prompt_tokens_total") >= 6 and families["vllm:prompt_tokens"].type == "counter"
    assert value("vllm:generation_tokens_total") >= 5
    assert value("vllm:request_success_total", finished_reason="length") == 1
    assert value("vllm:request_success_total", finished_reason="stop") == 0
    for hist, count in [("time_to_first_token_seconds", 1), ("inter_token_latency_seconds", 4),
                        ("e2e_request_latency_seconds", 1), ("request_queue_time_seconds", 1),
                        ("request_prefill_time_seconds", 1), ("request_decode_time_seconds", 1),
                        ("request_prompt_tokens", 1), ("request_generation_tokens", 1)]:
        assert families[f"vllm:{hist}"].type == "histogram", hist
        assert value(f"vllm:{hist}_count") == count, hist
        assert value(f"vllm:{hist}_bucket", le="+Inf") == count, hist
    assert value("vllm:request_prompt_tokens_sum") == num_prompt_tokens
    assert value("vllm:request_generation_tokens_sum") == 5
    assert value("vllm:iteration_tokens_total_count") >= 5  # one step for the prompt, one per later token
    assert value("vllm:iteration_tokens_total_sum") >= num_prompt_tokens + 4


# -- auth

async def test_api_keys_guard_every_route_but_the_probes(aiohttp_client, tiny_llama):
    c = await aiohttp_client(make_app(tiny_llama[1], ServerSettings(api_keys=("key-one", "key-two"))))
    for path in ("/health", "/ready", "/version"):
        assert (await c.get(path)).status in (200, 503)
    await wait_ready(c)
    good = {"Authorization": "Bearer key-two"}
    for method, path, body in [("GET", "/v1/models", None), ("GET", "/metrics", None),
                               ("POST", "/tokenize", {"prompt": "x"}), ("POST", "/detokenize", {"tokens": [1]}),
                               ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}),
                               ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                                 "max_tokens": 1}),
                               ("GET", "/v1/unknown", None)]:
        error = await assert_error(await c.request(method, path, json=body), 401)
        assert "Missing API key" in error["message"]
        wrong = await c.request(method, path, json=body, headers={"Authorization": "Bearer key-three"})
        assert "Invalid API key" in (await assert_error(wrong, 401))["message"]
        assert wrong.headers["WWW-Authenticate"] == "Bearer"
        right = await c.request(method, path, json=body, headers=good)
        assert right.status == (404 if path == "/v1/unknown" else 200), await right.text()
    lower = await c.get("/v1/models", headers={"Authorization": "bearer key-one"})
    assert lower.status == 200


async def test_mid_stream_engine_error_is_an_error_event_then_done(client):
    from server_utils import parse_sse

    engine = engine_of(client)
    free_before = engine.kv_cache_manager.num_free_blocks
    real_step = engine.step
    calls = 0

    def flaky_step():
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("simulated device failure")
        return real_step()

    engine.step = flaky_step
    response = await client.post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 20, "stream": True, "ignore_eos": True})
    assert response.status == 200
    events = parse_sse(await response.text())
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == 500 and error["type"] == "InternalServerError"
    await wait_idle(client)
    assert engine.kv_cache_manager.num_free_blocks == free_before
    engine.step = real_step
    assert (await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})).status == 200
