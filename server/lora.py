"""LoRA adapters on the server (vLLM's): served under their names beside the base model, picked by a request's
`model`; `--lora-modules name=path` (or vLLM's JSON form) at start, and `POST /v1/load_lora_adapter` /
`/v1/unload_lora_adapter` at run time when VLLM_ALLOW_RUNTIME_LORA_UPDATING (or HFBRIDGE_ALLOW_RUNTIME_LORA_UPDATING)
is true. Runtime adapters pass the same checks as those given at start; a bad one is a 400."""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass

from aiohttp import web

from hfbridge.lora.request import LoRARequest
from hfbridge.server.errors import APIError, read_json_object

RUNTIME_UPDATING_ENV = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "HFBRIDGE_ALLOW_RUNTIME_LORA_UPDATING")


@dataclass(frozen=True)
class LoRAModule:
    """One --lora-modules entry."""

    name: str
    path: str
    base_model_name: str | None = None

    @classmethod
    def parse(cls, text: str) -> LoRAModule:
        """`name=path`, or vLLM's JSON `{"name": ..., "path": ..., "base_model_name": ...}`."""
        text = text.strip()
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"--lora-modules {text!r} is not valid JSON ({e})") from e
            if not isinstance(data, dict) or not all(isinstance(data.get(key), str) for key in ("name", "path")):
                raise ValueError(f"--lora-modules {text!r}: the JSON form needs string `name` and `path`")
            return cls(data["name"], data["path"], data.get("base_model_name"))
        name, eq, path = text.partition("=")
        if not eq or not name or not path:
            raise ValueError(f"--lora-modules {text!r}: expected name=path or a JSON object")
        return cls(name, path)


def runtime_updating_allowed() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true") for name in RUNTIME_UPDATING_ENV)


class LoRAModels:
    """The adapters the server serves, by name. Changed on the event loop only; the engine learns of each one on
    its own thread (AsyncLLMEngine.call)."""

    def __init__(self):
        self.by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)

    def new_request(self, name: str, path: str, base_model_name: str | None = None) -> LoRARequest:
        return LoRARequest(name, next(self._ids), path, base_model_name)

    def get(self, name: str | None) -> LoRARequest | None:
        return self.by_name.get(name) if name else None


async def load_lora_adapter(request: web.Request) -> web.Response:
    from hfbridge.server.state import STATE

    state = request.app[STATE]
    body = await read_json_object(request)
    name, path = body.get("lora_name"), body.get("lora_path")
    if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
        raise APIError(400, "Both `lora_name` and `lora_path` must be given as strings", "lora_name")
    engine, card = state.require_engine()
    if name in state.loras.by_name or name in card.aliases:
        raise APIError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name")
    lora = state.loras.new_request(name, path)
    try:
        await engine.call(lambda llm_engine: llm_engine.add_lora(lora))
    except ValueError as e:
        raise APIError(400, str(e), "lora_path") from e
    state.loras.by_name[name] = lora
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    from hfbridge.server.state import STATE

    state = request.app[STATE]
    body = await read_json_object(request)
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise APIError(400, "`lora_name` must be given as a string", "lora_name")
    engine, _ = state.require_engine()
    lora = state.loras.by_name.pop(name, None)
    if lora is None:
        raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
    await engine.call(lambda llm_engine: llm_engine.remove_lora(lora.lora_int_id))
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


def add_routes(app: web.Application) -> None:
    """The runtime routes exist only when allowed (as in vLLM: otherwise a 404 like any unknown path)."""
    from hfbridge.server.connections import add_post
    from hfbridge.server.state import STATE

    if app[STATE].settings.allow_runtime_lora_updating:
        add_post(app, "/v1/load_lora_adapter", load_lora_adapter)
        add_post(app, "/v1/unload_lora_adapter", unload_lora_adapter)
