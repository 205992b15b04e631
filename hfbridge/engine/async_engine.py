"""AsyncLLMEngine: the synchronous LLMEngine driven by a dedicated thread, fed from an asyncio event loop.

The engine is not thread-safe, so only its thread ever touches it: the event loop hands it commands (add,
abort) through a list guarded by a condition variable, and the thread hands outputs back with
`loop.call_soon_threadsafe` into one queue per request. With nothing to do the thread sleeps on the
condition; it never spins.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from hfbridge.engine.llm_engine import EngineStepError, ExecutorDeadError, LLMEngine
from hfbridge.outputs import RequestOutput
from hfbridge.sample.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shutdown, or an error it could not recover from)."""


class RequestStream:
    """The outputs of one request, in order; iteration ends after the finished output."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.finished = False
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:  # event-loop thread only
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            self.finished = item.finished
            yield item


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._cond = threading.Condition()
        self._commands: list[Callable[[], None]] = []
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False  # asked to stop
        self._closed = False  # the thread takes no more commands
        self.dead_error: BaseException | None = None

    # -- lifecycle (event loop)
    def start(self) -> None:
        assert self._thread is None, "AsyncLLMEngine.start() called twice"
        self._loop = asyncio.get_running_loop()
        self.engine.structured_outputs.wake = self._wake  # a compiled grammar lets its requests be scheduled
        self._thread = threading.Thread(target=self._run, name="hfbridge-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the thread (pending requests end with EngineDeadError) and release the engine."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self.engine.shutdown()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_error is None

    # -- requests (event loop)
    async def add_request(
        self, request_id: str, prompt: Any, params: SamplingParams, add_special_tokens: bool = True, priority: int = 0,
        lora_request: Any = None,
    ) -> RequestStream:
        """Returns once the engine accepted the request; raises the engine's ValidationError if it did not.

        Iterate the stream for its outputs; call `abort` if you stop listening before it finished.
        """
        (stream,) = await self.add_requests([(request_id, prompt, params, add_special_tokens, priority, lora_request)])
        return stream

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """fn(engine) on the engine thread, between steps (loading a LoRA adapter, say); its result or its error."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running") from self.dead_error
        done: asyncio.Future[Any] = self._loop.create_future()

        def run() -> None:
            try:
                result = fn(self.engine)
            except Exception as e:  # noqa: BLE001 - handed to the caller
                self._call_soon(_settle, done, e)
                return
            self._call_soon(_settle, done, None, result)

        if not self._submit(run):
            raise EngineDeadError("the engine is shutting down")
        return await done

    async def add_requests(self, requests: list[tuple]) -> list[RequestStream]:
        """Add several (request_id, prompt, params, add_special_tokens, priority[, lora_request]) at once: one command
        for the engine thread, so a request's prompts join the same step instead of one round trip (and step) each.

        All or none: if the engine refuses one, the ones added before it are aborted and the error is raised.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running") from self.dead_error
        streams = [RequestStream(request_id) for request_id, *_ in requests]
        accepted: asyncio.Future[None] = self._loop.create_future()

        def add_all() -> None:
            added: list[str] = []
            try:
                for (request_id, prompt, params, add_special_tokens, priority, *lora), stream in zip(requests, streams):
                    self.engine.add_request(request_id, prompt, params, add_special_tokens=add_special_tokens,
                                            priority=priority, lora_request=lora[0] if lora else None)
                    self._streams[request_id] = stream
                    added.append(request_id)
            except Exception as e:  # noqa: BLE001 - handed to the caller, who maps it to an HTTP status
                for request_id in added:
                    del self._streams[request_id]
                if added:
                    self.engine.abort_request(added)
                self._call_soon(_settle, accepted, e)
                return
            self._call_soon(_settle, accepted, None)

        if not self._submit(add_all):
            raise EngineDeadError("the engine is shutting down")
        try:
            await accepted
        except asyncio.CancelledError:
            for stream in streams:  # queued behind the add: undoes it
                self.abort(stream.request_id)
            raise
        return streams

    def abort(self, request_id: str) -> None:
        """Abort a request; its KV blocks are freed as soon as the engine thread reads the command (at the
        latest after the step in flight). Safe to call for unknown or finished requests, and from `finally`."""

        def abort() -> None:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self.engine.abort_request(request_id)

        self._submit(abort)

    async def generate(
        self, request_id: str, prompt: Any, params: SamplingParams, add_special_tokens: bool = True
    ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs; leaving the loop early (break, cancel) aborts it."""
        stream = await self.add_request(request_id, prompt, params, add_special_tokens)
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort(request_id)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # -- the engine thread
    def _submit(self, command: Callable[[], None]) -> bool:
        """Queue a command for the engine thread; False once the thread stopped taking commands."""
        with self._cond:
            if self._closed:
                return False
            self._commands.append(command)
            self._cond.notify()
            return True

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop closed under us (process exit); nobody is listening
            pass

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._commands or self._stopping or self.engine.has_ready_work()):
                        # Idle (or only waiting for grammars to compile, which wake it): wake each second to check
                        # the workers (a dead rank turns /ready 503 at once) and grammars' compile deadlines.
                        if not self._cond.wait(timeout=1.0):
                            self.engine.check_health()
                    if self._stopping:
                        break
                    commands, self._commands = self._commands, []
                for command in commands:
                    command()
                if self.engine.has_ready_work():
                    self._step()
        except BaseException as e:  # noqa: BLE001 - the thread must report, never die silently
            logger.exception("The engine thread failed; the server cannot generate any more")
            self.dead_error = e
        finally:
            self._drain(self.dead_error or EngineDeadError("the engine is shutting down"))

    def _drain(self, error: BaseException) -> None:
        """Run the commands queued before the stop (so every add is answered), then end every request."""
        with self._cond:
            self._closed = True
            commands, self._commands = self._commands, []
        for command in commands:
            try:
                command()
            except Exception:  # noqa: BLE001 - a broken engine may refuse; the requests still get the error
                logger.debug("command failed while stopping", exc_info=True)
        self._close_all(error)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except ExecutorDeadError:
            raise  # fatal: the thread stops, every stream ends with the error, /ready turns 503, the server exits
        except EngineStepError as e:
            # The engine already aborted the step's requests (and dropped the prefix-cache entries the step was
            # to write): end their streams with the error; every other request goes on.
            # One line at ERROR naming the requests (the server logs each one's failure under the same ids); the
            # traceback at DEBUG.
            logger.error("Engine step failed (%s); ending its %d requests: %s", e.__cause__, len(e.request_ids),
                         ", ".join(e.request_ids[:8]) + (", ..." if len(e.request_ids) > 8 else ""))
            logger.debug("Engine step failed", exc_info=e.__cause__)
            failed = [(stream, e) for request_id in e.request_ids if (stream := self._streams.pop(request_id, None))]
            if failed := failed + self._request_errors():
                self._call_soon(_deliver, failed)
            return
        except Exception as e:  # noqa: BLE001
            # Failed outside the model step (bookkeeping): no request's state can be trusted; end them all.
            logger.error("Engine step failed outside the model (%s: %s); ending the %d requests in flight",
                         type(e).__name__, e, len(self._streams))
            logger.debug("Engine step failed outside the model", exc_info=e)
            self._close_all(e)
            return
        deliveries: list[tuple[RequestStream, RequestOutput | BaseException]] = []
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:  # aborted while the step ran
                continue
            if output.finished:
                del self._streams[output.request_id]
            deliveries.append((stream, output))
        if deliveries := deliveries + self._request_errors():
            self._call_soon(_deliver, deliveries)

    def _request_errors(self) -> list[tuple[RequestStream, BaseException]]:
        """The streams of requests that failed alone (their grammar, say), each with its error."""
        errors = self.engine.take_request_errors().items()
        return [(stream, error) for request_id, error in errors if (stream := self._streams.pop(request_id, None))]

    def _close_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        if not streams:
            return
        try:
            self.engine.abort_request(list(streams))
        except Exception:  # noqa: BLE001 - the listeners must hear about the error even if the engine is broken
            logger.exception("aborting requests failed")
        self._call_soon(_deliver, [(s, error) for s in streams.values()])


def _deliver(deliveries: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, item in deliveries:
        stream.put(item)


def _settle(future: asyncio.Future[Any], error: BaseException | None, result: Any = None) -> None:
    if future.done():  # cancelled by a caller that went away
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
