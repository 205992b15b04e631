"""The aiohttp application: an app factory, the engine's lifecycle, and the serve loop the CLI runs.

The app binds before the model loads: the engine is built in a background thread, /health answers at once,
/ready turns 200 when the engine runs, and routes that need the model answer 503 until then.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

from aiohttp import web

from hfbridge.engine.async_engine import AsyncLLMEngine
from hfbridge.engine.llm_engine import LLMEngine
from hfbridge.server import lora, routes_misc, routes_pooling, routes_responses
from hfbridge.server.auth import make_auth_middleware
from hfbridge.server.connections import ServerRunner, add_post
from hfbridge.server.errors import error_middleware
from hfbridge.server.routes_chat import create_chat_completion
from hfbridge.server.routes_completions import create_completion
from hfbridge.server.security import make_cors
from hfbridge.server.state import MAX_BODY_BYTES_BEFORE_LOAD, STATE, ServerSettings, ServingState

logger = logging.getLogger("hfbridge.server")

EngineFactory = Callable[[], LLMEngine]


def build_app(settings: ServerSettings, engine_factory: EngineFactory) -> web.Application:
    """The OpenAI-compatible app; `engine_factory` builds the LLMEngine (slow: it runs in a thread)."""
    cors_preflight, cors_headers = make_cors(settings.cors)
    # Preflights first: browsers send them without credentials, so they must not meet the auth check.
    middlewares = [cors_preflight, error_middleware]
    if settings.api_keys:
        middlewares.append(make_auth_middleware(settings.api_keys))
    middlewares.append(body_limit_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES_BEFORE_LOAD)
    app[STATE] = ServingState(settings)
    app.on_response_prepare.append(cors_headers)
    add_post(app, "/v1/completions", create_completion)
    add_post(app, "/v1/chat/completions", create_chat_completion)
    routes_misc.add_routes(app)
    routes_pooling.add_routes(app)
    routes_responses.add_routes(app)
    lora.add_routes(app)
    app.cleanup_ctx.append(partial(_engine_lifecycle, engine_factory))
    return app


@web.middleware
async def body_limit_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """The body limit of this request: the flag's, or one that follows the loaded model's context."""
    return await handler(request.clone(client_max_size=request.app[STATE].body_limit))


async def _engine_lifecycle(engine_factory: EngineFactory, app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.loader = asyncio.create_task(_load(state, engine_factory))
    yield
    state.loader.cancel()
    if state.engine is not None:
        await state.engine.shutdown()
    state.shutdown()


async def _load(state: ServingState, engine_factory: EngineFactory) -> None:
    loop = asyncio.get_running_loop()
    built: asyncio.Future[LLMEngine] = loop.create_future()

    def build() -> None:
        try:
            engine = engine_factory()
            try:
                state.add_static_loras(engine)
            except BaseException:
                engine.shutdown()
                raise
        except BaseException as e:  # noqa: BLE001 - reported through /health, /ready and the CLI's exit code
            _resolve_threadsafe(loop, built, None, e)
        else:
            _resolve_threadsafe(loop, built, engine, None)

    # A daemon thread, not the default executor: a server stopped mid-load must not wait for the load to end.
    threading.Thread(target=build, name="hfbridge-loader", daemon=True).start()
    try:
        engine = await built
    except Exception as e:  # noqa: BLE001
        logger.error("Loading the model failed: %s", e)
        state.load_error = e
        return
    async_engine = AsyncLLMEngine(engine)
    async_engine.start()
    state.set_loaded(async_engine)
    _log_ready(state)


def _resolve_threadsafe(loop, future, result, error) -> None:
    def settle() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the server stopped while the model loaded
        pass


def _log_ready(state: ServingState) -> None:
    card = state.card
    logger.info("Model ready: serving %s (max_model_len=%d)", ", ".join(card.names), card.max_model_len)
    if card.default_sampling:
        # generation_config.json silently changing defaults is vLLM complaint #7: say it out loud.
        logger.warning("Sampling defaults from the model's generation_config.json (requests override them): %s",
                       card.default_sampling)
    if not card.chat_template:
        logger.warning("The model has no chat template: /v1/chat/completions will answer 400. Restart with "
                       "--chat-template FILE, or send plain prompts to /v1/completions.")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, settings: ServerSettings) -> bool:
    """A warning (and True) when the server would be reachable from other machines without an API key."""
    if is_loopback(host) or settings.api_keys:
        return False
    logger.warning("Binding %s, reachable from other machines, without an API key: anyone who can reach this "
                   "port can use the model. Set --api-key (or HFBRIDGE_API_KEY).", host or "all interfaces")
    return True


def make_runner(app: web.Application) -> ServerRunner:
    """The runner serve() starts: the settings' keep-alive and header-read timeouts; handler_cancellation: a client
    that disconnects cancels its handler, which aborts its requests at once."""
    settings = app[STATE].settings
    return ServerRunner(app, handler_cancellation=True, keepalive_timeout=settings.timeout_keep_alive,
                        header_read_timeout=settings.header_read_timeout)


async def serve(app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
    """Run until SIGINT/SIGTERM (exit 0) or until the model fails to load (exit 1); HTTPS with `ssl_context`."""
    state = app[STATE]
    warn_if_exposed(host, state.settings)
    runner = make_runner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as e:  # port in use, address not on this machine, ...
            logger.error("Cannot listen on %s port %d: %s", host, port, e.strerror or e)
            return 1
        logger.info("Listening on %s://%s:%d (GET /ready answers 200 once the model is loaded)",
                    "https" if ssl_context is not None else "http", host if ":" not in host else f"[{host}]", port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([stopper, state.loader], return_when=asyncio.FIRST_COMPLETED)
        if state.load_error is None:
            await _until_stopped_or_dead(stopper, state)
        logger.info("Shutting down")
    finally:
        await runner.cleanup()
    engine_died = state.engine is not None and state.engine.dead_error is not None
    return 1 if state.load_error is not None or engine_died else 0


async def _until_stopped_or_dead(stopper: asyncio.Task, state: ServingState) -> None:
    """Wait for SIGINT/SIGTERM; a dead engine (e.g. a lost tensor-parallel worker) stops the server too."""
    while not stopper.done():
        if state.engine is not None and state.engine.dead_error is not None:
            logger.error("The engine stopped (%s); exiting", state.engine.dead_error)
            return
        await asyncio.wait([stopper], timeout=0.5)
