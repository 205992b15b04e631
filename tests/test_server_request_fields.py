"""Request fields a vLLM client sends that change the output: applied (priority, cache_salt, documents,
reasoning_effort) or refused with the reason (400), never dropped. Oracles: Transformers' apply_chat_template and
generate(), the official openai client."""
import openai
import pytest
import pytest_asyncio
from greedy import hf_greedy
from server_utils import engine_of, make_app, wait_idle, wait_ready
from test_server_api import assert_error
from tiny_models import build_tokenizer

LONG = "Once upon a time there was a little robot who loved to read books. A quick brown fox jumps over"
DOCS_TEMPLATE = (
    "{% for d in documents or [] %}[doc {{ d.title }}] {{ d.text }}\n{% endfor %}"
    "{% if reasoning_effort is defined %}effort={{ reasoning_effort }}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
)


@pytest_asyncio.fixture
async def client(aiohttp_client, tiny_llama):
    c = await aiohttp_client(make_app(tiny_llama[1], block_size=4, chat_template=DOCS_TEMPLATE))
    await wait_ready(c)
    return c


async def model_of(client) -> str:
    return (await (await client.get("/v1/models")).json())["data"][0]["id"]


def api_of(client) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0, timeout=60)


REFUSED = [
    ({"functions": [{"name": "f", "parameters": {}}], "function_call": "auto"}, "functions", "send `tools`"),
    ({"function_call": "none"}, "function_call", "tool_choice"),
    ({"modalities": ["text", "audio"]}, "modalities", "text"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "audio output"),
    ({"web_search_options": {}}, "web_search_options", "web search"),
    ({"return_token_ids": True}, "return_token_ids", "token ids"),
    ({"vllm_xargs": {"k": 1}}, "vllm_xargs", "logits-processor"),
    ({"best_of": 3, "n": 1}, "best_of", "best_of=3 > n=1 is not supported"),
    ({"priority": 2}, "priority", "Priority scheduling is not enabled"),
    ({"cache_salt": "a" * 129}, "cache_salt", "at most 128"),
    ({"cache_salt": "tenant/1"}, "cache_salt", "must not contain"),
    ({"cache_salt": ""}, "cache_salt", "non-empty"),
    ({"documents": ["not an object"]}, "documents", "list of objects"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort", "'low', 'medium', 'high'"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("extra,param,message", REFUSED)
async def test_fields_that_would_change_the_output_are_applied_or_refused(client, extra, param, message):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}
    await assert_error(await client.post("/v1/chat/completions", json=body), 400, param, [message])
    await wait_idle(client)


@pytest.mark.asyncio
async def test_fields_that_cannot_change_the_output_are_accepted(client):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "store": False, "metadata": {"k": "v"},
            "service_tier": "auto", "modalities": ["text"], "user": "u1", "function_call": None,
            "return_token_ids": False, "priority": 0}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status == 200, await response.text()


@pytest.mark.asyncio
async def test_documents_and_reasoning_effort_reach_the_chat_template(client):
    """The prompt the server built has exactly the tokens of Transformers' own apply_chat_template(documents=...,
    reasoning_effort=...) rendering."""
    tokenizer = build_tokenizer()
    messages = [{"role": "user", "content": "What does the robot read?"}]
    documents = [{"title": "robots", "text": "The robot reads books."}, {"title": "fox", "text": "Foxes jump."}]
    expected = tokenizer.apply_chat_template(messages, chat_template=DOCS_TEMPLATE, documents=documents,
                                             reasoning_effort="low", tokenize=False, add_generation_prompt=True)
    plain = tokenizer.apply_chat_template(messages, chat_template=DOCS_TEMPLATE, tokenize=False,
                                          add_generation_prompt=True)
    assert "[doc robots]" in expected and "effort=low" in expected and expected != plain
    api = api_of(client)
    reply = await api.chat.completions.create(model=await model_of(client), messages=messages, max_tokens=1, temperature=0,
                                              extra_body={"documents": documents, "reasoning_effort": "low"})
    assert reply.usage.prompt_tokens == len(tokenizer(expected, add_special_tokens=False).input_ids)
    reply = await api.chat.completions.create(model=await model_of(client), messages=messages, max_tokens=1, temperature=0)
    assert reply.usage.prompt_tokens == len(tokenizer(plain, add_special_tokens=False).input_ids)


@pytest.mark.asyncio
async def test_cache_salt_isolates_tenants_on_the_server(client, tiny_llama):
    """Tenant b's request with tenant a's prompt hits nothing of it; tenant a again hits its own blocks. The text
    is Transformers' greedy continuation every time."""
    tokenizer = build_tokenizer()
    prompt = tokenizer(LONG).input_ids[:21]
    expected = tokenizer.decode(hf_greedy(tiny_llama[0], prompt, 3, ignore_eos=True)[0])
    stats = engine_of(client).scheduler.kv_cache_manager.stats
    api = api_of(client)

    async def hit_tokens(salt: str) -> int:
        before = stats.hit_tokens
        reply = await api.completions.create(model=await model_of(client), prompt=prompt, max_tokens=3, temperature=0,
                                             extra_body={"cache_salt": salt, "ignore_eos": True})
        assert reply.choices[0].text == expected
        return stats.hit_tokens - before

    assert await hit_tokens("tenant-a") == 0
    assert await hit_tokens("tenant-b") == 0
    assert await hit_tokens("tenant-a") == 20


@pytest.mark.asyncio
async def test_priority_is_served_with_the_priority_policy(aiohttp_client, tiny_llama):
    c = await aiohttp_client(make_app(tiny_llama[1], scheduling_policy="priority"))
    await wait_ready(c)
    for route, body in (("/v1/completions", {"prompt": "Hi"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
        response = await c.post(route, json={**body, "max_tokens": 2, "priority": -3})
        assert response.status == 200, await response.text()
    await assert_error(await c.post("/v1/completions", json={"prompt": "Hi", "priority": 2**64}), 400, "priority",
                       ["64-bit"])
