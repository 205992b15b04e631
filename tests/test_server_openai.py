"""The official `openai` client against a real `hfbridge serve` process on 127.0.0.1 (one per module)."""
import urllib.request

import openai
import pytest
from server_utils import start_server, stop_server

API_KEY = "sk-test-key"
MODEL = "tiny-llama"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    process, url = start_server(
        [str(tiny_llama[1]), "--served-model-name", MODEL, "--api-key", API_KEY, "--max-model-len", "128",
         "--dtype", "float32"], log)
    yield url
    stop_server(process)
    assert process.returncode == 0, open(log).read()  # SIGTERM is a clean shutdown


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_models_list(client, tiny_llama):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == 128


def test_completion_and_greedy_determinism(client):
    first = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    second = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    assert first.choices[0].text == second.choices[0].text and first.choices[0].text
    assert first.usage.completion_tokens == 10
    assert first.choices[0].finish_reason == "length"


def test_completion_stream_with_usage(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_streamed_and_not(client):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=8, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=8,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_logprobs_in_openai_shapes(client):
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    assert len(completion.choices[0].logprobs.tokens) == 3


def test_bad_values_are_bad_request_errors(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=7)
    assert "temperature" in str(error.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, top_p=0)
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="Hello " * 300)
    assert "128" in str(error.value)


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)


def test_wrong_key_is_an_authentication_error(server):
    wrong = openai.OpenAI(base_url=server + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with urllib.request.urlopen(server + "/health") as response:  # probes stay open
        assert response.status == 200


def test_image_part_to_a_text_only_model_is_400(client):
    url = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJ"
           "RU5ErkJggg==")  # a 1x1 PNG
    content = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]
    with pytest.raises(openai.BadRequestError, match="takes no images"):
        client.chat.completions.create(model=MODEL, max_completion_tokens=4, messages=[{"role": "user", "content": content}])
