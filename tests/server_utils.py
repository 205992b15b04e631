"""Helpers for the server tests: an in-process app on the tiny Llama, a real `hfbridge serve` process, SSE."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from hfbridge import EngineArgs, LLMEngine
from hfbridge.server import STATE, ServerSettings, build_app

MAX_MODEL_LEN = 128


def engine_factory(folder: Any, **engine_kwargs: Any):
    kwargs = {"max_model_len": MAX_MODEL_LEN, "dtype": "float32", **engine_kwargs}
    return lambda: LLMEngine.from_engine_args(EngineArgs(model=str(folder), **kwargs))


def make_app(folder: Any, settings: ServerSettings | None = None, **engine_kwargs: Any):
    return build_app(settings or ServerSettings(), engine_factory(folder, **engine_kwargs))


async def wait_ready(client: Any, timeout: float = 30.0, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = await client.get("/ready", headers=headers)
        if response.status == 200:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("the server did not become ready")


def engine_of(client: Any) -> LLMEngine:
    return client.app[STATE].engine.engine


async def wait_idle(client: Any, timeout: float = 10.0) -> None:
    """Until the engine has no unfinished request (aborts reach the engine thread asynchronously)."""
    engine = engine_of(client)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.get_num_unfinished_requests() == 0:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{engine.get_num_unfinished_requests()} requests still unfinished")


def parse_sse(text: str) -> list[Any]:
    """`data:` payloads in order: decoded JSON objects, and the final "[DONE]" as a string."""
    events = []
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(process: subprocess.Popen, url: str, timeout: float, ssl_context: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"hfbridge serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2, context=ssl_context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"hfbridge serve was not ready within {timeout} s")


def start_server(args: list[str], log_path, env: dict | None = None, ready_timeout: float = 120,
                 ssl_context: Any = None):
    """Start `hfbridge serve ARGS` on a free loopback port; returns (process, base URL). With `ssl_context`
    (a client context trusting the server's certificate) the URL is https."""
    port = free_port()
    with open(log_path, "w") as log:  # the child keeps its own handle
        process = subprocess.Popen(
            [sys.executable, "-m", "hfbridge", "serve", *args, "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )
    url = f"{'https' if ssl_context is not None else 'http'}://127.0.0.1:{port}"
    try:
        wait_until_ready(process, url, ready_timeout, ssl_context)
    except BaseException:
        stop_server(process)
        raise RuntimeError(f"server failed to start; its log:\n{open(log_path).read()}") from None
    return process, url


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
