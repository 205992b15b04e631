"""torch.compile for the native decoders, vLLM's default (`enforce_eager=False`) done the hfbridge way.

A decoder layer is two attention-free regions around one attention call: before (residual add + RMSNorm, fused
qkv projection, rotary) and after (o_proj, residual add + RMSNorm, gate_up, SiLU-and-mul, down). Those regions are
where eager PyTorch spends its time on elementwise passes over [T, hidden] tensors; Inductor fuses them. The
attention call (paged KV cache, Python loops over requests) stays outside these graphs.

Compiled once for every layer (they share code and shapes) with the token count T symbolic, so one graph per
region serves every batch; single-token steps (T = 1) stay eager, so no second specialised graph is ever
compiled while serving. Pure decode steps, one token per request, skip these regions: decode_graph.py runs
them whole. Compilation runs in the background (hfbridge/compilation.py): until it is ready every
step runs eagerly. Same arithmetic either way, fused or not: tests check greedy output is identical with and
without `enforce_eager`."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from hfbridge.compilation import COMPILE_OPTIONS, BackgroundCompile, constant_floats

# Fewest tokens in a step that takes the compiled regions. T = 1 would need its own graph (torch.compile
# specialises sizes 0 and 1), and one token's elementwise work is too small to gain from fusion.
MIN_COMPILED_TOKENS = 2


class Regions(NamedTuple):
    before_attention: Callable[..., Any]  # (layer, hidden, residual, positions, rotary) -> q, k, v, residual
    after_attention: Callable[..., Any]  # (layer, attn_out, residual) -> hidden, residual


class CompiledRegions(BackgroundCompile):
    def __init__(self, eager: Regions, warm_up_inputs: Callable[[int], list[tuple]]):
        super().__init__("the decoder's attention-free regions", self._warm_up)
        self.eager = eager
        self.compiled: Regions | None = None  # built on the compile thread: torch.compile imports Inductor (~1 s)
        self.warm_up_inputs = warm_up_inputs

    def for_tokens(self, num_tokens: int) -> Regions:
        return self.compiled if self.ready.is_set() and num_tokens >= MIN_COMPILED_TOKENS else self.eager

    def _warm_up(self) -> None:
        # Two token counts, so that T is traced as a symbol (odd primes: sizes equal at trace time would be assumed
        # equal forever, "duck sizing"); layers 0 (no residual yet) and 1.
        self.compiled = Regions(*(torch.compile(fn, dynamic=True, options=COMPILE_OPTIONS) for fn in self.eager))
        with torch.inference_mode(), constant_floats():
            for num_tokens in (17, 19):
                for layer, hidden, residual, positions, rotary, attn_out in self.warm_up_inputs(num_tokens):
                    if self.should_stop():
                        return
                    torch._dynamo.mark_dynamic(hidden, 0)
                    _, _, _, res = self.compiled.before_attention(layer, hidden, residual, positions, rotary)
                    self.compiled.after_attention(layer, attn_out, res)
