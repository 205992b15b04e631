"""torch.compile for the native decoders, vLLM's default (`enforce_eager=False`) done the hfbridge way.

A decoder layer is two attention-free regions around one attention call: before (residual add + RMSNorm, fused
qkv projection, rotary) and after (o_proj, residual add + RMSNorm, gate_up, SiLU-and-mul, down). Those regions are
where eager PyTorch spends its time on elementwise passes over [T, hidden] tensors; Inductor fuses them. The
attention call (paged KV cache, Python loops over requests) stays eager, outside any graph.

Compiled once for every layer (they share code and shapes) with the token count T symbolic, so one graph per
region serves every batch; single-token steps (T = 1) stay eager, so no second specialised graph is ever
compiled while serving. Compilation runs on a background thread at start-up: until it is ready every step runs
eagerly, so the model serves at once and speeds up a minute later (seconds, when Inductor's on-disk cache holds
the graphs from an earlier start). Same arithmetic either way, fused or not: tests check greedy output is
identical with and without `enforce_eager`."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

logger = logging.getLogger(__name__)

# Fewest tokens in a step that takes the compiled regions. T = 1 would need its own graph (torch.compile
# specialises sizes 0 and 1), and one token's elementwise work is too small to gain from fusion.
MIN_COMPILED_TOKENS = 2


class Regions(NamedTuple):
    before_attention: Callable[..., Any]  # (layer, hidden, residual, positions, rotary) -> q, k, v, residual
    after_attention: Callable[..., Any]  # (layer, attn_out, residual) -> hidden, residual


class CompiledRegions:
    def __init__(self, eager: Regions, warm_up_inputs: Callable[[int], list[tuple]]):
        self.eager = eager
        self.compiled = Regions(*(torch.compile(fn, dynamic=True) for fn in eager))
        self.warm_up_inputs = warm_up_inputs
        self.ready = threading.Event()  # set when the compiled regions are in use
        self.done = threading.Event()  # set when compilation ended, ready or failed
        self.error: BaseException | None = None

    def for_tokens(self, num_tokens: int) -> Regions:
        return self.compiled if self.ready.is_set() and num_tokens >= MIN_COMPILED_TOKENS else self.eager

    def start(self, background: bool) -> None:
        if not background:
            self._compile()
            return
        threading.Thread(target=self._compile, name="hfbridge-compile", daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until compilation ended (True when the compiled regions are in use)."""
        self.done.wait(timeout)
        return self.ready.is_set()

    def _compile(self) -> None:
        try:
            self._warm_up()
        finally:
            self.done.set()

    def _warm_up(self) -> None:
        start = time.perf_counter()
        try:
            # Two token counts, so that T is traced as a symbol; layers 0 (no residual) and 1; under inference
            # mode like every real step (the mode is part of what the graph is guarded on).
            with torch.inference_mode():
                for num_tokens in (MIN_COMPILED_TOKENS, MIN_COMPILED_TOKENS + 1):
                    for layer, hidden, residual, positions, rotary, attn_out in self.warm_up_inputs(num_tokens):
                        torch._dynamo.mark_dynamic(hidden, 0)
                        _, _, _, res = self.compiled.before_attention(layer, hidden, residual, positions, rotary)
                        self.compiled.after_attention(layer, attn_out, res)
        except Exception as exc:  # noqa: BLE001 - a failed compile leaves the model eager, never broken
            self.error = exc
            logger.warning("torch.compile of the decoder failed; running eagerly: %s", exc)
            return
        logger.info("Compiled the decoder's attention-free regions in %.1fs", time.perf_counter() - start)
        self.ready.set()
