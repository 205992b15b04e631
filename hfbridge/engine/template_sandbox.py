"""Chat templates sent with a request (the server's --trust-request-chat-template) render in a child process, within
limits: a render past its time limit is stopped by killing the child (the next render starts a new one), one that
needs more memory than the child may take fails there, and a text past the size limit never leaves the child.
Jinja's sandbox keeps a template from reaching Python's internals, but not from looping or allocating for minutes;
no thread can be stopped from outside, a process can. The model's own template renders in-process, as before."""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from hfbridge.engine.chat_utils import render_chat
from hfbridge.errors import ValidationError

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # a new child imports Transformers and loads the tokenizer: seconds on a small CPU


@dataclass(frozen=True)
class TemplateLimits:
    timeout_s: float  # per render, counted from when the child has the request
    max_chars: int  # of the rendered text
    max_memory_bytes: int = 1 << 30  # what a render may allocate beyond the child's own footprint


class TemplateSandbox:
    """One child process, one render at a time (callers queue on a lock, each bounded by the limits)."""

    def __init__(self, tokenizer: Any, limits: TemplateLimits):
        self.limits = limits
        self._tokenizer = pickle.dumps(tokenizer)  # each new child loads this copy
        self._lock = threading.Lock()
        self._child: tuple[multiprocessing.process.BaseProcess, Connection] | None = None

    def start(self) -> None:
        """Start the child now (blocking), so the first render does not wait for it."""
        with self._lock:
            self._running_child()

    def render(self, conversation: list[dict[str, Any]], **render_kwargs: Any) -> str:
        """render_chat(tokenizer, conversation, **render_kwargs) in the child; ValidationError past a limit or when
        the template fails on these messages."""
        limits = self.limits
        with self._lock:
            _, conn = self._running_child()
            conn.send((conversation, render_kwargs))
            if not conn.poll(limits.timeout_s):
                self._stop_child()
                raise ValidationError(f"The chat template took longer than {limits.timeout_s:g} s to render and was "
                                      "stopped; simplify the template", parameter="chat_template")
            try:
                status, payload = conn.recv()
            except (EOFError, OSError):  # the child died mid-render (the kernel's OOM killer, a crash in C)
                self._stop_child()
                raise ValidationError("The chat template stopped the process that renders it",
                                      parameter="chat_template") from None
        if status == "ok":
            return payload
        if status == "too_long":
            raise ValidationError(f"The chat template rendered {payload} characters, more than the {limits.max_chars} "
                                  "that can fit the model's context", parameter="chat_template")
        if status == "memory":
            raise ValidationError(f"The chat template needed more than {limits.max_memory_bytes >> 20} MiB to render",
                                  parameter="chat_template")
        message, parameter = payload
        raise ValidationError(message, parameter=parameter)

    def close(self) -> None:
        with self._lock:
            self._stop_child()

    def _running_child(self) -> tuple[multiprocessing.process.BaseProcess, Connection]:
        if self._child is not None and self._child[0].is_alive():
            return self._child
        self._stop_child()
        context = multiprocessing.get_context("spawn")  # never fork a process that runs threads (the engine's)
        conn, child_conn = context.Pipe()
        process = context.Process(target=_serve, name="hfbridge-template-sandbox", daemon=True,
                                  args=(child_conn, self._tokenizer, self.limits.max_chars,
                                        self.limits.max_memory_bytes))
        process.start()
        child_conn.close()
        self._child = (process, conn)
        if not conn.poll(START_TIMEOUT_S) or conn.recv() != "ready":
            self._stop_child()
            raise RuntimeError(f"The chat-template sandbox did not start within {START_TIMEOUT_S:g} s")
        return self._child

    def _stop_child(self) -> None:
        if self._child is not None:
            process, conn = self._child
            self._child = None
            process.kill()
            process.join(timeout=5)
            conn.close()


def _serve(conn: Connection, tokenizer_bytes: bytes, max_chars: int, max_memory_bytes: int) -> None:
    """The child: render each (conversation, kwargs) it receives, until the parent goes away."""
    tokenizer = pickle.loads(tokenizer_bytes)
    _limit_memory(max_memory_bytes)
    conn.send("ready")
    while True:
        try:
            conversation, render_kwargs = conn.recv()
        except (EOFError, OSError):
            return
        try:
            text = render_chat(tokenizer, conversation, **render_kwargs)
            reply = ("ok", text) if len(text) <= max_chars else ("too_long", len(text))
        except MemoryError:
            reply = ("memory", None)
        except ValidationError as e:
            reply = ("invalid", (e.args[0], e.parameter))
        except Exception as e:  # noqa: BLE001 - whatever the template raises is about the request's input
            reply = ("invalid", (f"The chat template could not render these messages: {type(e).__name__}: "
                                 f"{str(e)[:1000]}", "messages"))
        conn.send(reply)


def _limit_memory(max_extra_bytes: int) -> None:
    """The child's address space: what it holds now plus max_extra_bytes (Linux; elsewhere no limit)."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            held = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (held + max_extra_bytes, resource.getrlimit(resource.RLIMIT_AS)[1]))
    except (ImportError, OSError, ValueError) as e:
        logger.warning("The chat-template sandbox runs without a memory limit: %s", e)
