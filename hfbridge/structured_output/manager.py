"""The engine's structured-output state: grammars compiled off the engine thread, one matcher per constrained
request, and one preallocated token bitmask filled for the constrained rows of each step.

A constrained request waits here (vLLM's WAITING_FOR_FSM) until its grammar is compiled; the scheduler never
sees it before, so everyone else is served meanwhile. Compiled grammars are cached by constraint: a request whose
grammar is cached goes to the scheduler at once. Matchers advance with each sampled token (preemption recomputes
tokens the matcher already accepted, and samples none of them again, so it never needs a rollback).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

import torch

from hfbridge.core.request import Request
from hfbridge.core.scheduler_output import GrammarBitmask, ScheduledRequest
from hfbridge.errors import ValidationError
from hfbridge.structured_output.grammar import parse_grammar
from hfbridge.structured_output.reasoning import ReasoningEnd
from hfbridge.sample.structured_outputs_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 60.0  # a request whose grammar takes longer fails (400); the compile itself finishes and is cached
MAX_CACHED_GRAMMARS = 256


@dataclass
class _Waiting:
    request: Request
    compiled: Future
    deadline: float


class StructuredOutputManager:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], max_num_seqs: int,
                 compile_timeout_s: float = COMPILE_TIMEOUT_S, reasoning: ReasoningEnd | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # of the model's logits, which may exceed len(tokenizer)
        self.stop_token_ids = sorted(stop_token_ids)
        self.max_num_seqs = max_num_seqs
        self.compile_timeout_s = compile_timeout_s
        self.reasoning = reasoning  # a reasoning model's end tag: its grammars start after it
        self.wake: Callable[[], None] | None = None  # called from the compile thread when a compile ends
        self._lock = threading.Lock()  # guards the two caches (validate runs on callers' threads)
        self._parsed: OrderedDict[tuple, Any] = OrderedDict()  # key -> xgrammar Grammar
        self._compiled: OrderedDict[tuple, Future] = OrderedDict()  # key -> Future[CompiledGrammar]
        self._pool: ThreadPoolExecutor | None = None  # one compile thread, started with the first constraint
        self._compiler: Any = None  # xgrammar GrammarCompiler, built on the compile thread
        self._batch: Any = None  # xgrammar BatchGrammarMatcher (fills the step's rows in C++)
        self._bitmask: torch.Tensor | None = None  # [max_num_seqs, ceil(V / 32)] int32
        # engine thread only
        self.waiting: dict[str, _Waiting] = {}
        self.matchers: dict[str, Any] = {}
        self.thinking: set[str] = set()  # constrained requests still reasoning: unconstrained until the end tag

    # -- any thread
    def validate(self, params: StructuredOutputsParams) -> None:
        """Parse the constraint (milliseconds; cached): ValidationError before anything is queued."""
        if self.tokenizer is None:
            raise ValidationError("Structured outputs requires a tokenizer (skip_tokenizer_init=False)",
                                  parameter="structured_outputs")
        self._grammar(params)

    def _grammar(self, params: StructuredOutputsParams) -> Any:
        key = params.key
        with self._lock:
            grammar = self._parsed.get(key)
            if grammar is not None:
                self._parsed.move_to_end(key)
                return grammar
        grammar = parse_grammar(params)
        with self._lock:
            self._parsed[key] = grammar
            while len(self._parsed) > MAX_CACHED_GRAMMARS:
                self._parsed.popitem(last=False)
        return grammar

    # -- engine thread
    def add(self, request: Request) -> bool:
        """Start (or find) the request's grammar; True when it is compiled and the request can be scheduled now."""
        compiled = self._compile(request.sampling_params.structured_outputs)
        if compiled.done() and compiled.exception() is None:
            self._start_matcher(request, compiled.result())
            return True
        self.waiting[request.request_id] = _Waiting(request, compiled, time.monotonic() + self.compile_timeout_s)
        return False

    def _compile(self, params: StructuredOutputsParams) -> Future:
        key = params.key
        with self._lock:
            future = self._compiled.get(key)
            if future is not None:
                self._compiled.move_to_end(key)
                return future
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="hfbridge-grammar")
            future = self._pool.submit(self._compile_now, params)
            self._compiled[key] = future
            while len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        future.add_done_callback(lambda _: self.wake() if self.wake is not None else None)
        return future

    def _compile_now(self, params: StructuredOutputsParams) -> Any:  # on the compile thread
        start = time.perf_counter()
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_token_ids or None)
            # one thread: the engine's steps keep the other cores
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        compiled = self._compiler.compile_grammar(self._grammar(params))
        logger.debug("Compiled a %s grammar in %.3fs", params.kind, time.perf_counter() - start)
        return compiled

    def _start_matcher(self, request: Request, compiled: Any) -> None:
        import xgrammar as xgr

        self.matchers[request.request_id] = xgr.GrammarMatcher(compiled)
        if self.reasoning is not None and not self.reasoning.ended_in(request.all_token_ids):
            self.thinking.add(request.request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_settled(self) -> bool:
        """Whether a waiting request can move on (compiled, failed, or past its deadline)."""
        now = time.monotonic()
        return any(w.compiled.done() or now > w.deadline for w in self.waiting.values())

    def wait(self, timeout: float) -> None:
        """Block until a waiting request's compile ends, or `timeout` seconds."""
        if self.waiting:
            wait_futures([w.compiled for w in self.waiting.values()], timeout, return_when="FIRST_COMPLETED")

    def take_settled(self) -> tuple[list[Request], dict[str, Exception]]:
        """Requests whose grammar is now compiled (their matchers started), and those that failed, with why."""
        ready, failed, now = [], {}, time.monotonic()
        for request_id, waiting in list(self.waiting.items()):
            if waiting.compiled.done():
                error = waiting.compiled.exception()
                if error is None:
                    self._start_matcher(waiting.request, waiting.compiled.result())
                    ready.append(waiting.request)
                else:
                    failed[request_id] = error if isinstance(error, ValidationError) else ValidationError(
                        f"The structured outputs grammar could not be compiled: {error}", parameter="structured_outputs")
            elif now > waiting.deadline:
                failed[request_id] = ValidationError(
                    f"The structured outputs grammar took more than {self.compile_timeout_s:g} s to compile; "
                    "simplify the schema", parameter="structured_outputs")
            else:
                continue
            del self.waiting[request_id]
        return ready, failed

    def bitmask(self, scheduled: list[ScheduledRequest]) -> GrammarBitmask | None:
        """The allowed next tokens of the step's constrained rows that sample (chunks that do not, need none)."""
        ids = [s.request.request_id for s in scheduled if s.produces_output and s.request.request_id in self.matchers
               and s.request.request_id not in self.thinking]
        if not ids:
            return None
        if self._bitmask is None:
            import xgrammar as xgr

            self._bitmask = xgr.allocate_token_bitmask(self.max_num_seqs, self.vocab_size)
            self._batch = xgr.BatchGrammarMatcher(max_threads=max(1, torch.get_num_threads()))
        bits = self._bitmask[: len(ids)]
        self._batch.batch_fill_next_token_bitmask([self.matchers[i] for i in ids], bits)
        return GrammarBitmask(ids, bits)

    def accept(self, requests: list[Request]) -> tuple[set[str], dict[str, Exception]]:
        """Advance the matchers of requests that got a token: (those whose grammar has ended, those that failed)."""
        terminated: set[str] = set()
        failed: dict[str, Exception] = {}
        for request in requests:
            matcher = self.matchers.get(request.request_id)
            if matcher is None:
                continue
            if request.request_id in self.thinking:  # reasoning: free, until this token ends it
                if self.reasoning.ends_with(request.all_token_ids):
                    self.thinking.discard(request.request_id)
                continue
            token = request.output_token_ids[-1]
            if not matcher.accept_token(token):
                failed[request.request_id] = RuntimeError(f"the grammar refused token {token}, which it had allowed")
            elif matcher.is_terminated():
                terminated.add(request.request_id)
        return terminated, failed

    def remove(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self.waiting.pop(request_id, None)
            self.matchers.pop(request_id, None)
            self.thinking.discard(request_id)

    def shutdown(self) -> None:
        """Queued compiles are dropped; one already running ends on its own (milliseconds to seconds)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
