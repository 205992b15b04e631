"""The pooling routes: /v1/embeddings, /pooling, /classify, /score (/v1/score), /rerank (/v1, /v2).

Each one checks that the served model does the task (a 400 naming the flag to restart with, never a 500),
runs its prompts as pooling requests, and answers in vLLM's shapes."""
from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import numpy as np
import torch
from aiohttp import web

from hfbridge.errors import ValidationError
from hfbridge.pooling.pooling_outputs import PoolingRequestOutput
from hfbridge.pooling.pooling_params import PoolingParams
from hfbridge.pooling.scoring import plan_scoring
from hfbridge.server.connections import add_post
from hfbridge.server.errors import APIError, read_json_object
from hfbridge.server.pooling_protocol import (
    PoolingOptions,
    parse_embed_request,
    parse_rerank_request,
    parse_score_request,
)
from hfbridge.server.state import STATE, ServingState

_FLAG_FOR_TASK = {"embed": "--convert embed", "classify": "--convert classify"}


def _require_task(state: ServingState, task: str, route: str) -> None:
    engine, card = state.require_engine()
    if task in engine.engine.supported_tasks:
        return
    served = engine.engine.supported_tasks[0]
    runner = "a generative model" if served == "generate" else f"a {served} model"
    raise APIError(
        400, f"{route} needs a model that can {task}, but {card.names[0]} is served as {runner}; restart the "
             f"server with --runner pooling {_FLAG_FOR_TASK.get(task, '')}".rstrip(), "model",
    )


async def _run(state: ServingState, prefix: str, options: PoolingOptions, prompts: list[Any],
               params: PoolingParams) -> list[PoolingRequestOutput]:
    """All prompts as pooling requests; the ones in flight are aborted if the client goes away."""
    engine, _ = state.require_engine()
    response_id = f"{prefix}-{options.request_id or uuid.uuid4().hex}"
    params.truncate_prompt_tokens = options.truncate_prompt_tokens
    requests = [(f"{response_id}-{i}", {"prompt_token_ids": p} if isinstance(p, list) else p, params.clone(),
                 options.add_special_tokens, options.priority) for i, p in enumerate(prompts)]
    state.admit(len(requests))  # 503 + Retry-After when the queue is full
    streams: list[Any] = []
    try:
        # One engine command for every input: 2,048 embedding inputs share steps instead of one step each.
        streams = await engine.add_requests(requests)
        timers = [state.metrics.timer() for _ in streams]
        outputs = []
        for stream, timer in zip(streams, timers):
            async for output in stream:
                last = output
            timer.on_output(0, "stop")
            outputs.append(last)
        return outputs
    except ValueError as e:  # a ValidationError from the engine: the client's input (400)
        raise APIError.from_validation(e) from e
    finally:
        for stream in streams:
            if not stream.finished:
                engine.abort(stream.request_id)
        state.release(len(requests))


def _head(kind: str, prefix: str, model: str, options: PoolingOptions) -> dict[str, Any]:
    return {"id": f"{prefix}-{options.request_id or uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": model}


def _usage(outputs: list[PoolingRequestOutput]) -> dict[str, int]:
    tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def encode_vector(data: torch.Tensor, encoding_format: str) -> list | str:
    """float: a JSON list; base64: little-endian float32 bytes (what the openai client asks for by default)."""
    if encoding_format == "base64":
        return base64.b64encode(data.float().numpy().astype("<f4").tobytes()).decode("ascii")
    return data.float().tolist()


async def create_embeddings(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = parse_embed_request(await read_json_object(request))
    model = state.resolve_model(body.model)
    _require_task(state, "embed", "/v1/embeddings")
    outputs = await _run(state, "embd", body, body.inputs,
                         PoolingParams(task="embed", use_activation=body.use_activation, dimensions=body.dimensions))
    data = [{"index": i, "object": "embedding", "embedding": encode_vector(o.outputs.data, body.encoding_format)}
            for i, o in enumerate(outputs)]
    return web.json_response({**_head("list", "embd", model, body), "data": data, "usage": _usage(outputs)})


async def create_pooling(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = parse_embed_request(await read_json_object(request), allow_task=True)
    model = state.resolve_model(body.model)
    engine, _ = state.require_engine()
    main_task = engine.engine.supported_tasks[0]  # embed or classify; "generate" is refused just below
    task = body.task or (main_task if main_task != "generate" else "embed")
    try:
        params = PoolingParams(task=task, use_activation=body.use_activation, dimensions=body.dimensions)
    except ValidationError as e:  # e.g. task "score" / "encode", removed in vLLM 0.33
        raise APIError.from_validation(e) from e
    _require_task(state, task, "/pooling")
    outputs = await _run(state, "pool", body, body.inputs, params)
    data = [{"index": i, "object": "pooling", "data": encode_vector(o.outputs.data, body.encoding_format)}
            for i, o in enumerate(outputs)]
    return web.json_response({**_head("list", "pool", model, body), "data": data, "usage": _usage(outputs)})


async def create_classification(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = parse_embed_request(await read_json_object(request))
    model = state.resolve_model(body.model)
    _require_task(state, "classify", "/classify")
    engine, _ = state.require_engine()
    outputs = await _run(state, "classify", body, body.inputs,
                         PoolingParams(task="classify", use_activation=body.use_activation))
    id2label = getattr(engine.engine.model_config.hf_config, "id2label", None) or {}
    data = []
    for i, out in enumerate(outputs):
        probs = out.outputs.data.float().tolist()
        best = int(np.argmax(probs))
        data.append({"index": i, "label": id2label.get(best, str(best)), "probs": probs, "num_classes": len(probs)})
    return web.json_response({**_head("list", "classify", model, body), "data": data, "usage": _usage(outputs)})


async def _scores(state: ServingState, options: PoolingOptions, texts_1: list[str], texts_2: list[str]):
    """One score per pair, and the pooling outputs that produced them (for usage)."""
    engine, _ = state.require_engine()
    try:
        plan = await state.off_loop(plan_scoring, texts_1, texts_2, engine.engine.supported_tasks,
                                    engine.engine.model_config.hf_config, engine.engine.get_tokenizer())
    except ValueError as e:
        raise APIError(400, str(e)) from e
    if plan.task == "embed":
        _require_task(state, "embed", "scoring")
    outputs = await _run(state, "score", options, plan.prompts,
                         PoolingParams(task=plan.task, use_activation=options.use_activation))
    return plan.scores([o.outputs.data for o in outputs]), outputs


async def create_score(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = parse_score_request(await read_json_object(request))
    model = state.resolve_model(body.model)
    scores, outputs = await _scores(state, body, body.texts_1, body.texts_2)
    data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
    return web.json_response({**_head("list", "score", model, body), "data": data, "usage": _usage(outputs)})


async def create_rerank(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = parse_rerank_request(await read_json_object(request))
    model = state.resolve_model(body.model)
    scores, outputs = await _scores(state, body, [body.query], body.documents)
    ranked = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    if body.top_n:
        ranked = ranked[: body.top_n]
    results = [{"index": i, "document": {"text": body.documents[i]}, "relevance_score": scores[i]} for i in ranked]
    head = _head("list", "rerank", model, body)
    return web.json_response({"id": head["id"], "model": model, "usage": _usage(outputs), "results": results})


def add_routes(app: web.Application) -> None:
    add_post(app, "/v1/embeddings", create_embeddings)
    add_post(app, "/pooling", create_pooling)
    add_post(app, "/classify", create_classification)
    for path in ("/score", "/v1/score"):
        add_post(app, path, create_score)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        add_post(app, path, create_rerank)
