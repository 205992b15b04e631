"""The small routes: model list, probes, version, tokenizer access and metrics."""
from __future__ import annotations

from typing import Any

from aiohttp import web

from hfbridge.server import metrics
from hfbridge.server.connections import add_post
from hfbridge.server.errors import APIError, error_response, read_json_object
from hfbridge.server.protocol import as_bool, as_int_list, as_str, parse_chat_request
from hfbridge.server.routes_chat import render_messages, render_with_request_template
from hfbridge.server.state import LOAD_FAILED, STATE
from hfbridge.version import __version__

ENGINE_STOPPED = "The engine stopped; the server log has the reason"  # the probes need no auth: no details


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _, card = state.require_engine()
    data = [
        {
            "id": name, "object": "model", "created": card.created, "owned_by": "hfbridge", "root": card.root,
            "parent": None, "max_model_len": card.max_model_len,
            # The sampling defaults generation_config.json imposes, so nobody has to guess (vLLM complaint #7).
            "default_sampling_params": card.default_sampling,
            "permission": [{"id": f"modelperm-{name}", "object": "model_permission", "created": card.created,
                            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                            "organization": "*", "group": None, "is_blocking": False}],
        }
        for name in card.names
    ]
    # Adapters, as vLLM lists them: their parent is the base model (root: the name, never a server path)
    data += [{"id": name, "object": "model", "created": card.created, "owned_by": "hfbridge", "root": name,
              "parent": lora.base_model_name or card.names[0], "max_model_len": card.max_model_len,
              "permission": data[0]["permission"] if data else []}
             for name, lora in state.loras.by_name.items()]
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    """Liveness: 200 while the process works, loading included; 503 once loading failed or the engine died."""
    state = request.app[STATE]
    if state.load_error is not None:
        return error_response(503, LOAD_FAILED)
    if state.engine is not None and not state.engine.is_running:
        return error_response(503, ENGINE_STOPPED)
    return web.Response(status=200)


async def ready(request: web.Request) -> web.Response:
    """Readiness: 503 until the model is loaded and the engine runs; route traffic only on 200."""
    state = request.app[STATE]
    if state.is_ready:
        return web.json_response({"status": "ready"})
    try:
        state.require_engine()
    except APIError as e:
        return error_response(503, e.message)
    return error_response(503, ENGINE_STOPPED)


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json_object(request)
    state.resolve_model(body.get("model"))
    engine, card = state.require_engine()
    tokenizer = engine.engine.get_tokenizer()
    if body.get("messages") is not None:
        chat = parse_chat_request({**body, "tool_choice": "none"})  # tools only shape the rendered text here
        add_special = chat.add_special_tokens
    elif body.get("prompt") is not None:
        text = as_str("prompt", body["prompt"])
        add_special = _optional_bool(body, "add_special_tokens", True)
    else:
        raise APIError(400, "Send `prompt` (a string) or `messages` (a chat)", "prompt")
    want_strs = _optional_bool(body, "return_token_strs", False)
    own_template = await render_with_request_template(state, chat) if body.get("messages") is not None else None

    def run() -> tuple[list[int], list[str] | None]:  # on the tokenizer thread: seconds for a huge prompt
        if body.get("messages") is None:
            rendered = text
        else:
            rendered = own_template if own_template is not None else render_messages(state, card, chat)
        ids = list(tokenizer(rendered, add_special_tokens=add_special).input_ids)
        return ids, tokenizer.convert_ids_to_tokens(ids) if want_strs else None

    ids, token_strs = await state.off_loop(run)
    return web.json_response(
        {"count": len(ids), "max_model_len": card.max_model_len, "tokens": ids, "token_strs": token_strs}
    )


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json_object(request)
    state.resolve_model(body.get("model"))
    engine, _ = state.require_engine()
    if body.get("tokens") is None:
        raise APIError(400, "`tokens` is required: a list of token ids", "tokens")
    ids = as_int_list("tokens", body["tokens"])
    vocab_size = engine.engine.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"Token id(s) {bad[:5]} are out of vocabulary (size {vocab_size})", "tokens")
    return web.json_response({"prompt": await state.off_loop(engine.engine.get_tokenizer().decode, ids)})


async def prometheus_metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    engine = state.engine.engine if state.engine is not None else None
    return web.Response(text=metrics.render(state.metrics, engine), content_type="text/plain",
                        headers={"X-Content-Type-Options": "nosniff"}, charset="utf-8")


def _optional_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    return default if body.get(name) is None else as_bool(name, body[name])


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    for path in ("/health", "/ping"):
        app.router.add_get(path, health)
    for path in ("/ready", "/readyz"):
        app.router.add_get(path, ready)
    app.router.add_get("/version", version)
    add_post(app, "/tokenize", tokenize)
    add_post(app, "/detokenize", detokenize)
    app.router.add_get("/metrics", prometheus_metrics)
