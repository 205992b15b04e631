"""What the server knows: its settings (fixed at start) and the serving state (the engine, once loaded)."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from hfbridge.engine.async_engine import AsyncLLMEngine
from hfbridge.engine.llm_engine import LLMEngine
from hfbridge.engine.chat_utils import load_chat_template
from hfbridge.engine.template_sandbox import TemplateLimits, TemplateSandbox
from hfbridge.server.errors import APIError
from hfbridge.server.lora import LoRAModels, LoRAModule
from hfbridge.server.metrics import ServerMetrics
from hfbridge.server.security import CorsSettings
from hfbridge.server.tool_choice import ToolSettings

T = TypeVar("T")
logger = logging.getLogger(__name__)

# The body limit, when not set, follows the context: a prompt that fills max_model_len tokens is at most about
# 4 bytes of text per token, 12 to 24 once JSON-escaped or sent as token ids ("123456, "). 32 bytes per token
# holds one full context in any of these forms with room for the other fields; a 1 MiB floor keeps small-context
# models usable for batches (embedding inputs, several prompts). Anything larger cannot be one context's prompt
# and only costs parsing and tokenizing time; raise --max-request-body-bytes for bigger batches.
BODY_BYTES_PER_TOKEN = 32
MIN_AUTO_BODY_BYTES = 1 << 20
MAX_BODY_BYTES_BEFORE_LOAD = 16 << 20  # aiohttp's own cap (the context is unknown until the model loads)
# Sequences (prompts x n) that may wait beyond the running batch before new requests get a 503 + Retry-After.
DEFAULT_MAX_WAITING_REQUESTS = 4096
RETRY_AFTER_SECONDS = 1
# Connections: vLLM's (uvicorn's) keep-alive of 5 s for an idle socket, and a bound on a request head that is slow
# to arrive (a silent or trickling client holds a socket and a parser otherwise).
DEFAULT_TIMEOUT_KEEP_ALIVE = 5.0
DEFAULT_HEADER_READ_TIMEOUT = 10.0
# A chat template sent with a request (--trust-request-chat-template) renders within this time.
DEFAULT_REQUEST_TEMPLATE_TIMEOUT = 5.0


def max_rendered_chars(max_model_len: int) -> int:
    """The longest rendered chat prompt worth tokenizing: the body limit's rule (a token is far less than 32
    characters of text), so a longer one cannot fit the context."""
    return max(MIN_AUTO_BODY_BYTES, BODY_BYTES_PER_TOKEN * max_model_len)


# The load exception's text can hold paths and config details: clients get this, the server log the rest.
LOAD_FAILED = "The model failed to load; the server log has the reason"


def _public_root(model: str, served_name: str) -> str:
    """/v1/models' `root`: the Hub id the model came from, or the served name when it is a local path."""
    return served_name if os.path.isabs(model) or os.path.exists(model) else model


@dataclass(frozen=True)
class ServerSettings:
    served_model_names: tuple[str, ...] = ()  # empty: the engine's served_model_name
    extra_model_aliases: tuple[str, ...] = ()  # also accepted in `model` (e.g. a Hub id of the default model)
    api_keys: tuple[str, ...] = ()
    # max_tokens beyond the context is clamped to what fits (vLLM 0.33's behaviour); strict rejects with a 400.
    strict_max_tokens: bool = False
    trust_request_chat_template: bool = False
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    enable_force_include_usage: bool = False
    max_request_body_bytes: int | None = None  # None: from the context (see BODY_BYTES_PER_TOKEN)
    max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS
    response_role: str = "assistant"
    cors: CorsSettings = field(default_factory=CorsSettings)
    tools: ToolSettings = field(default_factory=ToolSettings)
    timeout_keep_alive: float = DEFAULT_TIMEOUT_KEEP_ALIVE  # seconds an idle connection stays open
    header_read_timeout: float = DEFAULT_HEADER_READ_TIMEOUT  # seconds from a request head's first byte to its end
    request_chat_template_timeout: float = DEFAULT_REQUEST_TEMPLATE_TIMEOUT
    lora_modules: tuple[LoRAModule, ...] = ()  # --lora-modules: adapters served by name from the start
    allow_runtime_lora_updating: bool = False  # VLLM_ALLOW_RUNTIME_LORA_UPDATING: the load/unload routes exist


@dataclass(frozen=True)
class ModelCard:
    """The served model as routes describe it; fixed once the engine has loaded."""

    names: tuple[str, ...]  # served names; the first is echoed in responses and metric labels
    aliases: frozenset[str]  # every string accepted in a request's `model`
    root: str
    max_model_len: int
    max_logprobs: int
    default_sampling: dict[str, Any]
    chat_template: str | None  # --chat-template, else the tokenizer's own (None: chat routes answer 400)
    created: int


class ServingState:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.metrics = ServerMetrics()
        self.loras = LoRAModels()  # adapters served by name (requests pick one by `model`)
        self.engine: AsyncLLMEngine | None = None
        self.card: ModelCard | None = None
        self.load_error: BaseException | None = None
        self.loader: asyncio.Task[None] | None = None  # the background load, started with the app
        self.in_flight = 0  # sequences (prompts x n) submitted and not finished: running + waiting
        # Tokenizing and rendering chat templates take seconds on huge inputs: they run here, off the event loop.
        # One thread: a fast tokenizer must not be used from two threads at once ("Already borrowed").
        self.tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="hfbridge-tokenizer")
        # Chat templates sent with requests render in a child process (template_sandbox.py); one thread waits on it.
        self.template_sandbox: TemplateSandbox | None = None
        self.template_pool = ThreadPoolExecutor(1, thread_name_prefix="hfbridge-template")

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the tokenizer thread, so /health and every stream keep answering meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, partial(fn, *args))

    async def render_in_sandbox(self, conversation: list[dict[str, Any]], **render_kwargs: Any) -> str:
        """render_chat in the template sandbox (bounded in time, memory and output); ValidationError past a limit."""
        return await asyncio.get_running_loop().run_in_executor(
            self.template_pool, partial(self._render_in_sandbox, conversation, **render_kwargs))

    def _render_in_sandbox(self, conversation: list[dict[str, Any]], **render_kwargs: Any) -> str:
        if self.template_sandbox is None:  # its start (queued first on this thread) failed
            raise APIError(503, "Chat templates sent with requests cannot be rendered: the template sandbox did not "
                                "start (the server log has the reason)")
        return self.template_sandbox.render(conversation, **render_kwargs)

    def _start_sandbox(self, tokenizer: Any, limits: TemplateLimits) -> None:
        """On the template thread, at load: renders queue behind it, so none waits on a half-started child."""
        try:
            # Pickled on the tokenizer thread: a fast tokenizer used by two threads at once raises "Already borrowed".
            sandbox = self.tokenizer_pool.submit(TemplateSandbox, tokenizer, limits).result()
            sandbox.start()
        except Exception as e:  # noqa: BLE001 - reported on each request that needs it, and here
            logger.error("The chat-template sandbox (--trust-request-chat-template) did not start: %s", e)
            return
        self.template_sandbox = sandbox

    def shutdown(self) -> None:
        self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        self.template_pool.shutdown(wait=False, cancel_futures=True)
        if self.template_sandbox is not None:
            self.template_sandbox.close()

    @property
    def body_limit(self) -> int:
        if self.settings.max_request_body_bytes is not None:
            return self.settings.max_request_body_bytes
        if self.card is None:
            return MAX_BODY_BYTES_BEFORE_LOAD
        return max(MIN_AUTO_BODY_BYTES, BODY_BYTES_PER_TOKEN * self.card.max_model_len)

    def admit(self, num_seqs: int) -> None:
        """Take `num_seqs` seats in the queue, or a 503 with Retry-After when the waiting queue is full."""
        engine, _ = self.require_engine()
        capacity = engine.engine.config.scheduler_config.max_num_seqs + self.settings.max_waiting_requests
        if num_seqs > capacity:  # would never fit, even alone: retrying cannot help
            raise APIError(400, f"This request needs {num_seqs} sequences (prompts x n), more than the {capacity} the "
                                "server holds at once (--max-num-seqs + --max-waiting-requests); lower n or split "
                                "the request", "n")
        if self.in_flight + num_seqs > capacity:
            raise APIError(503, f"The server is at capacity ({self.in_flight} sequences running or waiting, at most "
                                f"{capacity}: --max-num-seqs + --max-waiting-requests); retry later",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.in_flight += num_seqs

    def release(self, num_seqs: int) -> None:
        self.in_flight -= num_seqs

    def set_loaded(self, engine: AsyncLLMEngine) -> None:
        model_config = engine.engine.model_config
        # As vLLM: `model` must be a served name. Without --served-model-name that is the model as given (a Hub id,
        # or the path the user typed); the resolved weights folder and its basename are never accepted, so a
        # request cannot probe where the weights live.
        names = self.settings.served_model_names or (model_config.served_model_name,)
        aliases = set(names) | set(self.settings.extra_model_aliases)
        tokenizer = engine.engine.get_tokenizer()
        chat_template = load_chat_template(model_config.chat_template) or getattr(tokenizer, "chat_template", None)
        self.card = ModelCard(
            names=tuple(names),
            aliases=frozenset(a for a in aliases if a),
            root=_public_root(model_config.model, names[0]),
            max_model_len=engine.engine.config.scheduler_config.max_model_len,
            max_logprobs=model_config.max_logprobs,
            default_sampling=dict(model_config.default_sampling),
            chat_template=chat_template,
            created=int(time.time()),
        )
        self.metrics.set_model(names[0], engine.engine)
        if self.settings.trust_request_chat_template and tokenizer is not None:
            limits = TemplateLimits(self.settings.request_chat_template_timeout,
                                    max_rendered_chars(self.card.max_model_len))
            self.template_pool.submit(self._start_sandbox, tokenizer, limits)
        self.engine = engine

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and self.engine.is_running

    def require_engine(self) -> tuple[AsyncLLMEngine, ModelCard]:
        """The engine for a route that needs it; 503 while loading (retryable), or when loading failed."""
        if self.engine is None or self.card is None:
            if self.load_error is not None:
                raise APIError(503, LOAD_FAILED)
            raise APIError(503, "The model is still loading; retry when GET /ready returns 200")
        return self.engine, self.card

    def resolve_model(self, requested: str | None) -> str:
        """The served name (or LoRA adapter name) to echo; 404 for a name that is none of ours."""
        _, card = self.require_engine()
        if requested is None or requested == "":
            return card.names[0]
        if requested in card.aliases:
            return requested if requested in card.names else card.names[0]
        if requested in self.loras.by_name:
            return requested
        # Served names only in the message (an alias such as the default model's Hub id is not listed).
        served = ", ".join([*card.names, *self.loras.by_name])
        raise APIError(404, f"The model `{requested[:200]}` does not exist. Served models: {served}.", "model")

    def add_static_loras(self, engine: LLMEngine) -> None:
        """--lora-modules, loaded and checked once the engine is built (before its thread starts): a bad adapter
        fails the start, naming it."""
        for module in self.settings.lora_modules:
            if module.name in self.loras.by_name:
                raise ValueError(f"--lora-modules names the adapter {module.name!r} twice")
            lora = self.loras.new_request(module.name, module.path, module.base_model_name)
            engine.add_lora(lora)
            self.loras.by_name[module.name] = lora


# Typed app state: routes read `request.app[STATE]`.
STATE = web.AppKey("hfbridge_state", ServingState)
