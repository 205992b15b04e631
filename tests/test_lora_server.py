"""LoRA adapters on the server (issue 33): --lora-modules serves each adapter by its name with the tokens of PEFT's
own model; /v1/models lists them under the base; an unknown adapter is a 404 like an unknown model; the runtime
load/unload routes exist only when allowed, check adapters as start-up does, and a bad one is a 400."""
from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
from greedy import hf_greedy
from lora_adapters import peft_model, standard_adapters
from server_utils import make_app, wait_ready
from tiny_models import build_tokenizer

from hfbridge.server import STATE, ServerSettings
from hfbridge.server.lora import LoRAModule

pytestmark = pytest.mark.asyncio
PROMPT = "The capital of France is"
MAX_NEW = 8
LORA_ENGINE = dict(enable_lora=True, max_loras=2, max_lora_rank=8)


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    return standard_adapters(tiny_llama[0], tmp_path_factory.mktemp("server_adapters"))


@pytest.fixture(scope="module")
def expected(tiny_llama, adapters):
    """Per served name, the text of PEFT's own model's greedy tokens."""
    base = tiny_llama[0]
    tok = build_tokenizer()
    prompt = tok(PROMPT).input_ids
    texts = {"base": tok.decode(hf_greedy(base, prompt, MAX_NEW, ignore_eos=True)[0], skip_special_tokens=True)}
    for name, path in adapters.items():
        tokens = hf_greedy(peft_model(base, path), prompt, MAX_NEW, ignore_eos=True)[0]
        texts[name] = tok.decode(tokens, skip_special_tokens=True)
    assert len(set(texts.values())) == len(texts), "each adapter changes the text"
    return texts


@pytest_asyncio.fixture
async def client(aiohttp_client, tiny_llama, adapters):
    modules = (LoRAModule.parse(f"all={adapters['all']}"),
               LoRAModule.parse(f'{{"name": "qv", "path": "{adapters["qv"]}", "base_model_name": "base"}}'))
    settings = ServerSettings(served_model_names=("base",), lora_modules=modules, allow_runtime_lora_updating=True)
    c = await aiohttp_client(make_app(tiny_llama[1], settings, **LORA_ENGINE))
    await wait_ready(c)
    return c


async def complete(client, model):
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}
    return await client.post("/v1/completions", json=body)


async def assert_text(client, model, text):
    response = await complete(client, model)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["model"] == model and body["choices"][0]["text"] == text


async def test_adapters_served_by_name_with_peft_tokens(client, expected):
    models = (await (await client.get("/v1/models")).json())["data"]
    assert [(m["id"], m["parent"]) for m in models] == [("base", None), ("all", "base"), ("qv", "base")]
    for name in ("all", "base", "qv"):
        await assert_text(client, name, expected[name])
    response = await complete(client, "nope")
    assert response.status == 404 and "does not exist" in (await response.json())["error"]["message"]
    body = {"model": "all", "prompt": PROMPT, "max_tokens": 1, "lora_request": {"lora_name": "all"}}
    response = await client.post("/v1/completions", json=body)
    assert response.status == 400 and "by its name in `model`" in (await response.json())["error"]["message"]
    metrics = await (await client.get("/metrics")).text()
    assert 'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}' in metrics


async def test_runtime_load_and_unload(client, expected, adapters, tmp_path):
    load = {"lora_name": "regex", "lora_path": str(adapters["regex"])}
    response = await client.post("/v1/load_lora_adapter", json=load)
    assert response.status == 200, await response.text()
    await assert_text(client, "regex", expected["regex"])
    assert (await client.post("/v1/load_lora_adapter", json=load)).status == 400  # the name is taken
    bad = await client.post("/v1/load_lora_adapter", json={"lora_name": "gone", "lora_path": str(tmp_path / "x")})
    assert bad.status == 400 and "LoRA adapter 'gone'" in (await bad.json())["error"]["message"]
    assert (await complete(client, "gone")).status == 404
    response = await client.post("/v1/unload_lora_adapter", json={"lora_name": "regex"})
    assert response.status == 200, await response.text()
    assert (await complete(client, "regex")).status == 404
    assert (await client.post("/v1/unload_lora_adapter", json={"lora_name": "regex"})).status == 404
    await assert_text(client, "all", expected["all"])  # serving on


async def test_runtime_routes_exist_only_when_allowed_and_bad_modules_fail_the_start(aiohttp_client, tiny_llama,
                                                                                     tmp_path):
    settings = ServerSettings(lora_modules=(LoRAModule("missing", str(tmp_path / "missing")),))
    c = await aiohttp_client(make_app(tiny_llama[1], settings, **LORA_ENGINE))
    assert (await c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "b"})).status == 404
    state = c.app[STATE]
    for _ in range(600):  # the load runs in a thread: wait for its failure
        if state.load_error is not None:
            break
        await asyncio.sleep(0.05)
    assert "LoRA adapter 'missing'" in str(state.load_error) and "no such folder" in str(state.load_error)
    assert (await c.get("/health")).status == 503
