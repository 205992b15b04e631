"""torch.compile on a background thread: the eager code serves until the compiled code is warm.

Compiling costs tens of seconds on a small CPU (seconds when Inductor's on-disk cache holds the graphs from an
earlier start), which must count neither against start-up nor against a request's latency. `BackgroundCompile`
runs a warm-up (calls of the compiled functions on inputs shaped like the real ones, under inference mode like
every real step, since the mode is part of what a graph is guarded on) and says when it is done.

The thread is not a daemon: a process must not exit while Inductor runs (torch aborts the interpreter then), so
exit waits for the graph being compiled; `stop()` (the executor's shutdown calls it) skips the graphs not begun."""
from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


class BackgroundCompile:
    def __init__(self, what: str, warm_up: Callable[[], None]):
        """warm_up: calls the compiled functions; it should check `stopping` between calls."""
        self.what = what
        self.warm_up = warm_up
        self.stopping = threading.Event()
        self.ready = threading.Event()  # set when the compiled code is in use
        self.done = threading.Event()  # set when compilation ended, ready or failed
        self.error: BaseException | None = None

    def start(self, background: bool = True) -> None:
        if background:
            threading.Thread(target=self._run, name=f"hfbridge-compile-{self.what}").start()
        else:
            self._run()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until compilation ended; True when the compiled code is in use."""
        self.done.wait(timeout)
        return self.ready.is_set()

    def stop(self) -> None:
        self.stopping.set()

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            self.warm_up()
            if self.stopping.is_set():
                return
        except Exception as exc:  # noqa: BLE001 - a failed compile leaves the code eager, never broken
            self.error = exc
            if not threading.main_thread().is_alive():  # the process is exiting: Inductor refuses new work
                return
            logger.warning("torch.compile of %s failed; it runs eagerly: %s", self.what, exc)
        else:
            logger.info("Compiled %s in %.1fs", self.what, time.perf_counter() - start)
            self.ready.set()
        finally:
            self.done.set()


def graph_op(qualname: str, schema: str, impl: Callable, fake: Callable) -> Callable:
    """`impl` (Python code that reaches C through ctypes, which tracing cannot follow) as an operator for
    torch.compile graphs: `impl` runs on CPU tensors, `fake` gives the output shapes while tracing. Returns a
    function that calls the operator where torch.compile traces and `impl` itself in eager code: no dispatcher
    there (microseconds a call), and no torch._dynamo import on the first call (about 1 s of start-up). Inference
    only: no autograd formula.

    Registered with torch.library's define / impl / register_fake rather than custom_op: custom_op wraps every
    call in guards of its own (torch._dynamo disabled, an autograd check), tens of microseconds more per call from
    a compiled graph, where a decode step makes several such calls per layer (figures: docs/kernel-measurements.md)."""
    torch.library.define(qualname, schema)
    torch.library.impl(qualname, "CPU", impl)
    torch.library.register_fake(qualname, fake)
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default

    @functools.wraps(impl)
    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else impl(*args)

    return call
