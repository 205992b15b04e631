"""torch.compile on a background thread: the eager code serves until the compiled code is warm.

Compiling costs tens of seconds to minutes on a small CPU (seconds when Inductor's on-disk cache holds the graphs
from an earlier start), which must count neither against start-up nor against a request's latency.
`BackgroundCompile` runs a warm-up (calls of the compiled functions on inputs shaped like the real ones, under
inference mode like every real step, since the mode is part of what a graph is guarded on) and says when it is
done.

A good citizen of the process it lives in:
- it logs when it starts, every CHECKPOINT_LOG_S while it runs, and when it ends;
- it yields to requests: a step pauses it (`hold_for_step`) until the engine has been idle for IDLE_RESUME_S.
  Both threads share the GIL, which a compiling thread would otherwise hold for a switch interval (5 ms) each time
  a step's torch call returns, several seconds a step. The pause is a profile hook of the compile thread (checked
  on each Python call, where the GIL can be let go), which slows the compile itself (measured in
  docs/kernel-measurements.md) but never a request. On Linux the thread (and the compiler processes it starts)
  also runs at the lowest CPU priority;
- it never holds up an exit. The thread is not a daemon (a daemon thread inside Inductor's C++ when the
  interpreter finalizes aborts the process: "terminate called without an active exception"); instead, when the
  interpreter begins to exit, `abandon()` has the thread's profile hook raise CompileAbandoned at the next Python
  call (Inductor is mostly Python; a C compiler call in flight finishes first), never inside the import system,
  logging or threading, whose locks are not all released by an exception (an exception raised at an arbitrary
  instruction, PyThreadState_SetAsyncExc, left the import lock held and the exit hung). `stop()` (an engine's
  shutdown while the process goes on) only skips the graphs not begun: an interrupted compile leaves Inductor's
  state unfit for the next one."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_LOG_S = 15.0  # the least time between two "still compiling" lines
IDLE_RESUME_S = 0.5  # a paused compile goes on once no step has run for this long
ABANDON_WAIT_S = 10.0  # how long an exit waits for an abandoned compile to unwind (a C compiler call in flight)


class CompileAbandoned(BaseException):
    """Raised inside a compile thread to end it (the process is exiting). A BaseException, so that torch's own
    `except Exception` handlers let it through."""


# Inductor options of every hfbridge graph. Inductor keeps a fused kernel's intermediates of a 16-bit model in
# float32; rounding them where eager torch rounds keeps the compiled tokens those of eager code (and of
# Transformers) in bfloat16, as they are in float32.
COMPILE_OPTIONS = {"emulate_precision_casts": True}


class _ConstantFloats:
    """`constant_floats()`: the Dynamo setting every warm-up traces under: the Python floats a graph reads (an
    attention's scaling, off its module or as an argument) are constants of the graph. Traced as symbols, they are
    floats Inductor cannot keep as such, and Dynamo traced each graph a second time ("Restarting analysis due to
    _tensorify_python_scalars"), missing AOTAutograd's cache on the first try: about half of a start's compile
    time. The setting is process-wide: warm-ups on several threads share it, and the value before the first is put
    back when the last ends (nested patches restoring on their own would leave it to whichever ends last)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._before = False

    @contextlib.contextmanager
    def __call__(self):
        import torch._dynamo

        with self._lock:
            if self._users == 0:
                self._before = torch._dynamo.config.specialize_float
                torch._dynamo.config.specialize_float = True
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    torch._dynamo.config.specialize_float = self._before


constant_floats = _ConstantFloats()


class BackgroundCompile:
    def __init__(self, what: str, warm_up: Callable[[], None]):
        """warm_up: calls the compiled functions; between calls it asks `should_stop()`."""
        self.what = what
        self.warm_up = warm_up
        self.stopping = threading.Event()
        self.ready = threading.Event()  # set when the compiled code is in use
        self.done = threading.Event()  # set when compilation ended: ready, failed, stopped or abandoned
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._started = self._last_log = 0.0
        self._calls = 0
        self._held = False  # a step ran lately: the compile thread waits in its profile hook
        self._held_until = 0.0  # time.monotonic() when the hold ends unless another step renews it
        self._abandoning = False
        self.paused_s = 0.0  # how long the compile waited for steps

    def hold_for_step(self) -> None:
        """Called as a step starts: the compile pauses now and goes on IDLE_RESUME_S after the last step."""
        if self._thread is not None and not self.done.is_set():
            self._held_until = time.monotonic() + IDLE_RESUME_S
            self._held = True

    def start(self, background: bool = True) -> None:
        self._started = self._last_log = time.perf_counter()
        if not background:
            self._run()
            return
        logger.info("Compiling %s in the background (enforce_eager=False): steps run eagerly until it is ready; "
                    "--enforce-eager skips it", self.what)
        self._thread = threading.Thread(target=self._run, name=f"hfbridge-compile-{self.what}")
        self._thread.start()
        _abandon_at_exit(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until compilation ended; True when the compiled code is in use."""
        self.done.wait(timeout)
        return self.ready.is_set()

    def stop(self) -> None:
        """Skip the graphs not begun; the one being compiled finishes (the process goes on)."""
        self.stopping.set()

    def abandon(self, timeout: float = ABANDON_WAIT_S) -> bool:
        """End the compile now (the process is exiting): CompileAbandoned is raised in its thread at its next
        Python call. True when the thread ended within `timeout`."""
        self._abandoning = True
        self.stopping.set()
        thread = self._thread
        if thread is None or not thread.is_alive():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def should_stop(self) -> bool:
        """Asked by the warm-up between its calls: logs how far it is, at most every CHECKPOINT_LOG_S."""
        self._calls += 1
        now = time.perf_counter()
        if now - self._last_log >= CHECKPOINT_LOG_S and not self.stopping.is_set():
            self._last_log = now
            logger.info("Still compiling %s: warm-up call %d after %.0fs", self.what, self._calls, now - self._started)
        return self.stopping.is_set()

    def _gate(self, frame, event, arg) -> None:
        """The compile thread's profile hook: two attribute tests per Python call while nothing holds it."""
        if self._held:
            start = time.monotonic()
            while time.monotonic() < self._held_until and not self.stopping.is_set():
                time.sleep(0.02)
            self._held = False
            self.paused_s += time.monotonic() - start
        if self._abandoning and event == "call" and _safe_to_raise(frame):
            raise CompileAbandoned

    def _run(self) -> None:
        try:
            self._lower_priority()
            if self._thread is not None:
                sys.setprofile(self._gate)
            self.warm_up()
            if not self.stopping.is_set():
                logger.info("Compiled %s in %.1fs (%.1fs of it paused for requests)", self.what,
                            time.perf_counter() - self._started, self.paused_s)
                self.ready.set()
        except CompileAbandoned:
            logger.info("Abandoned the compile of %s: the process is exiting", self.what)
        except Exception as exc:  # noqa: BLE001 - a failed compile leaves the code eager, never broken
            self.error = exc
            # Inductor's thread pools refuse to start once the interpreter shuts down ("can't register atexit
            # after shutdown"), which can come before our own exit hook has said to stop: not a failure.
            exiting = isinstance(exc, RuntimeError) and "shutdown" in str(exc)
            if threading.main_thread().is_alive() and not self.stopping.is_set() and not exiting:
                logger.warning("torch.compile of %s failed; it runs eagerly: %s", self.what, exc)
        finally:
            sys.setprofile(None)
            self.done.set()

    def _lower_priority(self) -> None:
        """Linux: a thread has a nice value of its own (setpriority on its thread id), inherited by the compiler
        processes it starts. Elsewhere the id names no process: nothing is changed."""
        if self._thread is not None and sys.platform.startswith("linux"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except OSError:
                pass


# Code whose locks an exception may leave held (`acquire()` before a `try`): never interrupted.
_UNSAFE_FILES = ("<frozen importlib", "importlib/", "logging/", "threading.py")


def _safe_to_raise(frame) -> bool:
    """No frame between the thread's own _run and `frame` runs such code."""
    while frame is not None and frame.f_code is not BackgroundCompile._run.__code__:
        if any(part in frame.f_code.co_filename for part in _UNSAFE_FILES):
            return False
        frame = frame.f_back
    return True


def _abandon_at_exit(compile: BackgroundCompile) -> None:
    """Abandon `compile` when the interpreter begins to exit, before it waits for non-daemon threads (threading's
    own exit hook, which concurrent.futures uses for the same reason). A weak reference: an engine shut down and
    dropped does not stay in memory."""
    ref = weakref.ref(compile)

    def abandon() -> None:
        running = ref()
        if running is not None:
            running.abandon()

    try:
        threading._register_atexit(abandon)
    except (AttributeError, RuntimeError):  # another Python, or the interpreter is already exiting
        pass


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
