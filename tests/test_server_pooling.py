"""The pooling routes against Transformers: /v1/embeddings with the official openai client (base64 by
default) on the real MiniLM, score / rerank / classify / pooling through the aiohttp test client."""
import base64

import numpy as np
import openai
import pytest
import pytest_asyncio
import torch
import torch.nn.functional as F
from server_utils import make_app, start_server, stop_server, wait_ready
from test_pooling import (
    PAIRS,
    SENTENCES,
    minilm_path,
    minilm_reference,
    reference_outputs,
    tiny_classifier,
    wordpiece_tokenizer,
)

DOCUMENTS = [
    "France's wine and cheese are famous all over the world.",
    "Paris is the capital and largest city of France.",
    "Berlin is the capital of Germany.",
    "Mitochondria are the powerhouse of the cell.",
]
QUERY = "What is the capital of France?"


@pytest.fixture(scope="module")
def embedding_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-embed") / "serve.log"
    process, url = start_server([minilm_path(), "--served-model-name", "minilm", "--runner", "pooling",
                                 "--convert", "embed"], log)
    yield url
    stop_server(process)


def test_openai_client_embeddings_base64_and_float(embedding_server):
    client = openai.OpenAI(base_url=embedding_server + "/v1", api_key="none", max_retries=0, timeout=60)
    expected = minilm_reference(SENTENCES)
    default = client.embeddings.create(model="minilm", input=SENTENCES)  # the client asks for base64
    as_float = client.embeddings.create(model="minilm", input=SENTENCES, encoding_format="float")
    for response in (default, as_float):
        ours = torch.tensor([d.embedding for d in response.data])
        assert ours.shape == expected.shape
        assert F.cosine_similarity(ours, expected, dim=-1).min() > 0.9999
    assert default.usage.prompt_tokens == as_float.usage.prompt_tokens > len(SENTENCES)
    with pytest.raises(openai.BadRequestError, match="is empty"):
        client.embeddings.create(model="minilm", input=["fine", ""])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="hi")


@pytest_asyncio.fixture
async def minilm_client(aiohttp_client):
    client = await aiohttp_client(make_app(minilm_path(), runner="pooling", convert="embed", max_model_len=256))
    await wait_ready(client)
    return client


@pytest.mark.asyncio
async def test_rerank_orders_documents_by_reference_cosine(minilm_client):
    vectors = minilm_reference([QUERY, *DOCUMENTS])
    reference = [F.cosine_similarity(vectors[0], v, dim=0).item() for v in vectors[1:]]
    expected_order = sorted(range(len(DOCUMENTS)), key=lambda i: reference[i], reverse=True)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        response = await minilm_client.post(path, json={"query": QUERY, "documents": DOCUMENTS, "top_n": 3})
        body = await response.json()
        assert response.status == 200, body
        assert [r["index"] for r in body["results"]] == expected_order[:3]
        assert expected_order[0] == 1  # real weights: the Paris document wins
        for result in body["results"]:
            assert result["relevance_score"] == pytest.approx(reference[result["index"]], abs=1e-4)
            assert result["document"]["text"] == DOCUMENTS[result["index"]]
    response = await minilm_client.post("/score", json={"text_1": QUERY, "text_2": DOCUMENTS})
    scores = [d["score"] for d in (await response.json())["data"]]
    assert scores == pytest.approx(reference, abs=1e-4)


@pytest.mark.asyncio
async def test_pooling_route_and_errors(minilm_client):
    response = await minilm_client.post("/pooling", json={"input": "hello world", "task": "token_embed"})
    body = await response.json()
    assert response.status == 200 and body["object"] == "list" and len(body["data"][0]["data"]) > 1
    encoded = await minilm_client.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64"})
    vector = np.frombuffer(base64.b64decode((await encoded.json())["data"][0]["embedding"]), dtype="<f4")
    plain = await minilm_client.post("/v1/embeddings", json={"input": "hello"})
    assert np.allclose(vector, (await plain.json())["data"][0]["embedding"], atol=1e-7)
    cases = [
        ("/pooling", {"input": "x", "task": "score"}, "`score` task was removed"),
        ("/v1/embeddings", {"input": "x", "dimensions": 8}, "does not support Matryoshka"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "bytes"}, "encoding_format='bytes' is not supported"),
        ("/v1/embeddings", {"input": 5}, "`input` must be"),
        ("/v1/embeddings", {}, "`input` is required"),
        ("/classify", {"input": "x"}, "restart the server with --runner pooling --convert classify"),
        ("/score", {"queries": ["a", "b"], "documents": ["c", "d", "e"]}, "1:1, 1:N or N:N"),
        ("/score", {"query": "a"}, "needs two sides"),
        ("/rerank", {"query": "a", "documents": []}, "`documents` is required"),
        ("/rerank", {"query": "a", "documents": ["b"], "top_n": -1}, "top_n must be >= 0"),
        ("/v1/completions", {"prompt": "x"}, "--runner generate"),
    ]
    for path, payload, message in cases:
        response = await minilm_client.post(path, json=payload)
        body = await response.json()
        assert response.status == 400, (path, payload, body)
        assert message in body["error"]["message"], (path, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}


@pytest.mark.asyncio
async def test_generation_model_refuses_pooling_routes(aiohttp_client, tiny_llama):
    client = await aiohttp_client(make_app(tiny_llama[1]))
    await wait_ready(client)
    for path, payload in [("/v1/embeddings", {"input": "x"}), ("/rerank", {"query": "a", "documents": ["b"]}),
                          ("/classify", {"input": "x"})]:
        response = await client.post(path, json=payload)
        body = await response.json()
        assert response.status == 400 and "--runner pooling" in body["error"]["message"], body


@pytest.mark.asyncio
@pytest.mark.parametrize("num_labels", [1, 3])
async def test_cross_encoder_classify_and_score(aiohttp_client, tmp_path, num_labels):
    tokenizer = wordpiece_tokenizer()
    model = tiny_classifier("BertForSequenceClassification", num_labels, tmp_path / "clf", tokenizer)
    client = await aiohttp_client(make_app(tmp_path / "clf"))
    await wait_ready(client)
    response = await client.post("/classify", json={"input": SENTENCES[:3]})
    body = await response.json()
    expected = reference_outputs(model, [dict(tokenizer(t)) for t in SENTENCES[:3]], num_labels)
    assert torch.allclose(torch.tensor([d["probs"] for d in body["data"]]), expected, atol=1e-5)
    assert [d["label"] for d in body["data"]] == [model.config.id2label[int(p.argmax())] for p in expected]
    response = await client.post("/v1/score", json={"queries": [a for a, _ in PAIRS], "documents": [b for _, b in PAIRS]})
    body = await response.json()
    if num_labels == 1:
        expected = reference_outputs(model, [dict(tokenizer(a, b)) for a, b in PAIRS], 1)[:, 0]
        assert [d["score"] for d in body["data"]] == pytest.approx(expected.tolist(), abs=1e-5)
        assert body["usage"]["prompt_tokens"] == sum(len(tokenizer(a, b).input_ids) for a, b in PAIRS)
    else:
        assert response.status == 400 and "num_labels == 1" in body["error"]["message"]


@pytest.mark.asyncio
async def test_pooling_routes_need_the_api_key(aiohttp_client):
    from hfbridge.server import ServerSettings

    client = await aiohttp_client(make_app(minilm_path(), ServerSettings(api_keys=("k",)), runner="pooling",
                                           convert="embed", max_model_len=256))
    await wait_ready(client, headers={"Authorization": "Bearer k"})
    for path in ("/v1/embeddings", "/pooling", "/classify", "/score", "/rerank", "/v2/rerank"):
        response = await client.post(path, json={"input": "x"})
        assert response.status == 401, path
