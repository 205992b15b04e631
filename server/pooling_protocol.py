"""Request bodies of the pooling routes (embeddings, pooling, classify, score, rerank) -> typed requests.

Type checks only, with messages naming the field; value checks stay in PoolingParams and the engine."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hfbridge.server.errors import APIError
from hfbridge.server.protocol import as_bool, as_int, as_prompt_list, as_str

MAX_INPUTS = 2048  # OpenAI's limit for one embeddings request
ENCODING_FORMATS = ("float", "base64")
# Score routes name their two sides in several ways across vLLM versions; all are accepted.
SCORE_SIDES = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))
_ACTIVATION_ALIASES = ("use_activation", "normalize", "softmax", "activation")


@dataclass(frozen=True)
class PoolingOptions:
    """What every pooling route may set."""

    model: str | None
    use_activation: bool | None
    truncate_prompt_tokens: int | None
    add_special_tokens: bool
    request_id: str | None
    priority: int  # lower first under --scheduling-policy priority


@dataclass(frozen=True)
class EmbedRequest(PoolingOptions):
    inputs: list[str | list[int]]
    encoding_format: str
    dimensions: int | None
    task: str | None  # /pooling only


@dataclass(frozen=True)
class ScoreRequest(PoolingOptions):
    texts_1: list[str]
    texts_2: list[str]


@dataclass(frozen=True)
class RerankRequest(PoolingOptions):
    query: str
    documents: list[str]
    top_n: int


def _options(body: dict[str, Any]) -> dict[str, Any]:
    activation = next((body[k] for k in _ACTIVATION_ALIASES if body.get(k) is not None), None)
    truncate = body.get("truncate_prompt_tokens")
    if truncate is not None:
        truncate = as_int("truncate_prompt_tokens", truncate)
        if truncate == 0:
            truncate = None
        elif truncate < -1:
            raise APIError(400, f"truncate_prompt_tokens must be an integer >= 1 or -1, got {truncate}",
                           "truncate_prompt_tokens")
    return dict(
        model=None if body.get("model") is None else as_str("model", body["model"]),
        use_activation=None if activation is None else as_bool("use_activation", activation),
        truncate_prompt_tokens=truncate,
        add_special_tokens=True if body.get("add_special_tokens") is None else as_bool(
            "add_special_tokens", body["add_special_tokens"]),
        request_id=None if body.get("request_id") is None else as_str("request_id", body["request_id"]),
        priority=0 if body.get("priority") is None else as_int("priority", body["priority"]),
    )


def _inputs(name: str, value: Any) -> list[str | list[int]]:
    """Like completion prompts, but an empty input is refused (OpenAI refuses "" too)."""
    items = as_prompt_list(name, value, MAX_INPUTS)
    for i, item in enumerate(items):
        if len(item) == 0:
            raise APIError(400, f"`{name}[{i}]` is empty; every input needs at least one token", name)
    return items


def parse_embed_request(body: dict[str, Any], allow_task: bool = False) -> EmbedRequest:
    if body.get("input") is None:
        raise APIError(400, "`input` is required: a string, a list of strings or token ids", "input")
    encoding = "float" if body.get("encoding_format") is None else as_str("encoding_format", body["encoding_format"])
    if encoding not in ENCODING_FORMATS:
        raise APIError(400, f"encoding_format={encoding!r} is not supported; use one of {list(ENCODING_FORMATS)}",
                       "encoding_format")
    task = None
    if allow_task and body.get("task") is not None:
        task = as_str("task", body["task"])
    return EmbedRequest(
        **_options(body), inputs=_inputs("input", body["input"]), encoding_format=encoding,
        dimensions=None if body.get("dimensions") is None else as_int("dimensions", body["dimensions"]), task=task,
    )


def _texts(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise APIError(400, f"`{name}` must be a string or a list of strings", name)
    if len(value) > MAX_INPUTS:
        raise APIError(400, f"At most {MAX_INPUTS} texts per request, got {len(value)}", name)
    return value


def parse_score_request(body: dict[str, Any]) -> ScoreRequest:
    for first, second in SCORE_SIDES:
        if body.get(first) is not None and body.get(second) is not None:
            return ScoreRequest(**_options(body), texts_1=_texts(first, body[first]), texts_2=_texts(second, body[second]))
    names = ", ".join(f"`{a}` + `{b}`" for a, b in SCORE_SIDES)
    raise APIError(400, f"A score request needs two sides: one of {names}", SCORE_SIDES[0][0])


def parse_rerank_request(body: dict[str, Any]) -> RerankRequest:
    if not isinstance(body.get("query"), str):
        raise APIError(400, "`query` is required: a string", "query")
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents:
        raise APIError(400, "`documents` is required: a non-empty list of strings or {\"text\": ...} objects",
                       "documents")
    if len(documents) > MAX_INPUTS:  # never cut silently: the client would rank a subset without knowing it
        raise APIError(400, f"At most {MAX_INPUTS} documents per rerank request, got {len(documents)}",
                       "documents")
    texts = []
    for i, doc in enumerate(documents):
        text = doc.get("text") if isinstance(doc, dict) else doc
        if not isinstance(text, str):
            raise APIError(400, f"`documents[{i}]` must be a string or an object with a string `text`", "documents")
        texts.append(text)
    top_n = 0 if body.get("top_n") is None else as_int("top_n", body["top_n"])
    if top_n < 0:
        raise APIError(400, f"top_n must be >= 0 (0 returns every document), got {top_n}", "top_n")
    return RerankRequest(**_options(body), query=body["query"], documents=texts, top_n=top_n)
